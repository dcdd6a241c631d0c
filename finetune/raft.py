"""RAFT-style retrieval-aware training examples (Zhang et al., 2024, "RAFT: Adapting Language Model to
Domain Specific RAG").

A seeded `fraction` of the Q/A examples gets retrieved context in the prompt, rendered exactly as at serving
time (`finetune.prompt.build_messages` with the RAG system prompt): the gold passage plus `n_distractors`
other chunks from the retriever, shuffled. For a seeded `p_no_gold` share of those the gold passage is left
out. Following the paper, the target then stays the reference answer (`no_gold_target="answer"`: the model
learns to rely on domain knowledge it memorised when retrieval misses); with "refusal" it is the project's
no-answer reply instead (matches the RAG system prompt's instruction).

Gold passage of a row: `retriever.gold.GoldFinder` (chunks whose source is the row's `source`/id, else the
chunk that best contains the answer); when none is found, the row's own answer stands in (counted as
`gold_fallback`). No chunk in `exclude_chunks` (the gold chunks of held-out validation/test rows) is ever a
distractor. A chunk in `withhold_chunks` (a held-out row's own Q/A chunk: it *is* the held-out answer) is never
shown at all, not even as a training row's gold passage (a near-duplicate answer can make it the content match
of a training row; the row's own answer then stands in, counted as `gold_withheld_held_out`). A document
passage that a held-out row also cites stays usable as a training row's gold: it is knowledge, not the held-out
answer. So no held-out question or answer reaches a training prompt through RAFT. Distractors are never the
row's own gold chunks either.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from finetune.data import raft_messages
from finetune.prompt import REFUSAL_ANSWER


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rsplit(" ", 1)[0] + " …"


def _ctx(chunk, n_chars: int) -> dict:
    return {"title": getattr(chunk, "title", "") or "", "text": _clip(chunk.text, n_chars), "source": chunk.source}


def _chunk_id(chunk) -> str:
    return str(getattr(chunk, "chunk_id", None) or chunk.source)


def gold_row(example: dict) -> dict:
    """The fields GoldFinder reads: `source`, `id` (an FAQ id wins over the row id) and the reference answer."""
    answer = example.get("answer")
    if not answer:  # multi-turn: the last assistant turn
        answer = next((m["content"] for m in reversed(example.get("messages") or []) if m["role"] == "assistant"), None)
    return {"source": example.get("source"), "id": example.get("faq_id") or example.get("id"), "answer": answer}


def find_gold(finder, example: dict) -> tuple[list[str], str | None]:
    """(gold chunk ids, how they were found: "source" | "content" | None)."""
    row = gold_row(example)
    ids = finder.by_source(row)
    if ids:
        return ids, "source"
    ids = finder.by_content(row["answer"])
    return (ids, "content") if ids else ([], None)


def held_out_row_chunks(finder, rows: Iterable[dict]) -> set[str]:
    """The chunks that hold a held-out row itself (a Q/A knowledge base indexes each row under its id)."""
    return {c for row in rows for c in finder.by_id(row.get("id"))}


def held_out_gold_chunks(finder, rows: Iterable[dict]) -> set[str]:
    """Every chunk that is gold for one of the held-out rows (never a RAFT distractor)."""
    out: set[str] = set()
    for row in rows:
        out.update(find_gold(finder, row)[0])
    return out


def build_raft_examples(
    examples: list[dict],
    *,
    index,
    fraction: float,
    n_distractors: int,
    p_no_gold: float,
    system_prompt: str,
    seed: int | str,
    no_gold_target: str = "answer",
    search_mode: str = "hybrid",
    context_chars: int = 600,
    fits: Callable[[list[dict]], bool] | None = None,
    gold_finder=None,
    exclude_chunks: Iterable[str] = (),
    withhold_chunks: Iterable[str] | None = None,
    refusal_answer: str = REFUSAL_ANSWER,
) -> tuple[list[dict], dict]:
    """Examples with RAFT conversations in "messages" (others unchanged) and counts of what was built.

    Eligible examples are single-turn rows with question and answer. `gold_finder` (default: a GoldFinder over
    `index.chunks`) locates each row's gold chunks; `exclude_chunks` are never distractors, `withhold_chunks`
    (default: all of `exclude_chunks`) are never shown at all.
    `fits(messages)` (optional) says whether a conversation fits the token budget; distractors are dropped
    one at a time until it does, so the gold passage and the answer are never truncated away.
    """
    from retriever.gold import GoldFinder

    chunks = list(getattr(index, "chunks", None) or [])
    finder = gold_finder if gold_finder is not None else GoldFinder(chunks)
    by_id = {_chunk_id(c): c for c in chunks}
    excluded = set(exclude_chunks)
    withheld = excluded if withhold_chunks is None else set(withhold_chunks)
    rng = random.Random(f"raft:{seed}")
    eligible = [i for i, e in enumerate(examples) if e.get("question") and e.get("answer")]
    chosen = sorted(rng.sample(eligible, round(fraction * len(eligible))))
    no_gold = set(rng.sample(chosen, round(p_no_gold * len(chosen))))
    stats = {"raft_examples": 0, "with_gold": 0, "without_gold": 0, "gold_from_index": 0, "distractors": 0}
    stats.update(gold_by_source=0, gold_by_content=0, gold_fallback=0, gold_withheld_held_out=0)
    stats.update(
        excluded_gold_chunks=len(excluded),
        withheld_chunks=len(withheld),
        skipped_held_out_distractors=0,
        dropped_distractors_for_length=0,
    )
    out = [dict(e) for e in examples]
    for i in chosen:
        ex = examples[i]
        gold_ids, how = find_gold(finder, ex)
        own = set(gold_ids)
        hits = _search(index, ex["question"], n_distractors, search_mode, len(chunks))
        distractors = []
        for h in hits:
            cid = _chunk_id(h.chunk)
            if cid in own:
                continue
            if cid in excluded:
                stats["skipped_held_out_distractors"] += 1
                continue
            if len(distractors) < n_distractors:
                distractors.append(_ctx(h.chunk, context_chars))
        contexts = list(distractors)
        with_gold = i not in no_gold
        if with_gold:
            hit_chunks = {_chunk_id(h.chunk): h.chunk for h in hits}
            ranked = [c for c in hit_chunks if c in own] + gold_ids  # best-ranked first
            usable = [c for c in ranked if c in hit_chunks or c in by_id]
            gold_chunk = next(((hit_chunks.get(c) or by_id[c]) for c in usable if c not in withheld), None)
            if gold_chunk is not None:
                gold = _ctx(gold_chunk, context_chars)
                stats["gold_from_index"] += 1
                stats["gold_by_source" if how == "source" else "gold_by_content"] += 1
            else:  # no gold passage in the index (or only held-out ones): the row itself, titled like Q/A rows
                gold = {
                    "title": ex.get("category") or "",
                    "text": _clip(ex["answer"], context_chars),
                    "source": str(ex.get("source") or ex.get("faq_id") or ex.get("id")),
                }
                stats["gold_fallback"] += 1
                stats["gold_withheld_held_out"] += int(bool(usable))
            contexts.append(gold)
        rng.shuffle(contexts)
        answer = ex["answer"] if with_gold or no_gold_target == "answer" else refusal_answer
        msgs = raft_messages(ex, [_strip(c) for c in contexts], system_prompt, answer)
        while fits is not None and not fits(msgs) and any(c in distractors for c in contexts):
            drop = next(c for c in reversed(contexts) if c in distractors)
            contexts.remove(drop)
            stats["dropped_distractors_for_length"] += 1
            msgs = raft_messages(ex, [_strip(c) for c in contexts], system_prompt, answer)
        out[i] = {
            **ex,
            "messages": msgs,
            "raft": {
                "gold": with_gold,
                "sources": [c["source"] for c in contexts],
                "target": "answer" if answer == ex["answer"] else "refusal",
            },
        }
        stats["raft_examples"] += 1
        stats["with_gold" if with_gold else "without_gold"] += 1
        stats["distractors"] += sum(1 for c in contexts if c in distractors)
    return out, stats


def _search(index, question: str, n_distractors: int, mode: str, n_chunks: int) -> list:
    """Retriever hits for the question, enough of them to leave n_distractors after exclusions."""
    return index.search(question, k=max(n_distractors + 8, min(4 * (n_distractors + 8), n_chunks or 0)), mode=mode)


def _strip(ctx: dict) -> dict:
    return {"title": ctx["title"], "text": ctx["text"]}
