"""RAFT-style retrieval-aware training examples (Zhang et al., 2024, "RAFT: Adapting Language Model to
Domain Specific RAG"), with cited targets and hand-overs (Trust-Align, Song et al., ICLR 2025).

A seeded `fraction` of the Q/A examples gets retrieved context in the prompt, rendered exactly as at serving
time (`finetune.prompt.build_messages` with the RAG system prompt).

* Gold rows: the gold passage plus the `n_distractors` best-ranked other chunks, shuffled. The target is the
  reference answer with the gold passage's number `[n]` (its place in the final context list, after any
  distractor dropped for length) before the end punctuation of every sentence the passage supports ("... needs
  a permit [2]."), judged by `pipeline.metrics.Judge`, the judge evaluation and serving use; when it supports
  no sentence, the marker goes at the end of the answer. A gold passage that is the row's own answer (no chunk
  found) supports every sentence.
* Distractor-only rows (a seeded `p_no_gold` share): retrieval's top `n_distractors + 1` hits with the row's
  gold chunks removed, by source/id and by content as evaluation's gold_removed set and the answerability gate
  remove them. So they show as many passages as a gold row, just as relevant-looking: this *is* evaluation's
  "gold removed" case asked of a training question (no separate kind of row is needed). The target is the
  project's no-answer reply (`no_gold_target="refusal"`, the default: the bot hands over when the documents do
  not answer), or, as in the RAFT paper, the reference answer (`"answer"`: the model learns to answer from
  memory when retrieval misses); a stage per variant shows the trade-off in the report.

Bracketed numbers in a reference answer that are not citations ("see [3]", "[2019]") are rewritten as "(3)"
(`finetune.prompt.defuse_citations`) before the markers go in, so every [n] in a target is the gold passage.

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
import re
from collections.abc import Callable, Iterable

from finetune.data import raft_messages
from finetune.prompt import REFUSAL_ANSWER, cite, defuse_citations


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
    no_gold_target: str = "refusal",
    search_mode: str = "hybrid",
    context_chars: int = 600,
    fits: Callable[[list[dict]], bool] | None = None,
    gold_finder=None,
    exclude_chunks: Iterable[str] = (),
    withhold_chunks: Iterable[str] | None = None,
    refusal_answer: str = REFUSAL_ANSWER,
    judge=None,
) -> tuple[list[dict], dict]:
    """Examples with RAFT conversations in "messages" (others unchanged) and counts of what was built.

    Eligible examples are single-turn rows with question and answer. `gold_finder` (default: a GoldFinder over
    `index.chunks`) locates each row's gold chunks; `exclude_chunks` are never distractors, `withhold_chunks`
    (default: all of `exclude_chunks`) are never shown at all. `judge` (a `pipeline.metrics.Judge`; default
    `raft_judge(index)`) decides which answer sentences the gold passage supports.
    `fits(messages)` (optional) says whether a conversation fits the token budget; distractors are dropped
    one at a time until it does, so the gold passage and the answer are never truncated away.
    """
    from retriever.gold import GoldFinder

    if no_gold_target not in ("answer", "refusal"):
        raise ValueError(f"no_gold_target must be 'answer' or 'refusal', got {no_gold_target!r}")
    judge = judge if judge is not None else raft_judge(index)
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
        removed_content_gold=0,
        dropped_distractors_for_length=0,
    )
    stats.update(
        no_gold_target=no_gold_target,
        refusal_targets=0,
        answer_targets_without_gold=0,
        cited_targets=0,
        citation_markers=0,
        markers_per_cited_target=0.0,
        cited_sentences=0,
        answer_sentences=0,
        cited_at_end_unsupported=0,
        gold_numbers={},  # how often the gold passage is [1], [2], ... in the prompt as shown
        citation_like_rewritten=0,
        judge=describe_judge(judge),
    )
    out = [dict(e) for e in examples]
    for i in chosen:
        ex = examples[i]
        answer = defuse_citations(ex["answer"])
        stats["citation_like_rewritten"] += int(answer != ex["answer"])
        gold_ids, how = find_gold(finder, ex)
        with_gold = i not in no_gold
        own = set(gold_ids)
        if not with_gold:  # gold removed as evaluation's gold_removed set and the gate remove it
            removed = set(finder.all_gold(gold_row(ex)))
            stats["removed_content_gold"] += len(removed - own)
            own |= removed
        hits = _search(index, ex["question"], n_distractors + int(not with_gold), search_mode, len(chunks))
        candidates = []  # retrieval's ranking without the row's own gold chunks and the held-out gold
        for h in hits:
            cid = _chunk_id(h.chunk)
            if cid in own:
                continue
            if cid in excluded:
                stats["skipped_held_out_distractors"] += 1
                continue
            candidates.append(h.chunk)
        sentences = answer_sentences(answer)
        if with_gold:
            distractors = [_ctx(c, context_chars) for c in candidates[:n_distractors]]
            hit_chunks = {_chunk_id(h.chunk): h.chunk for h in hits}
            ranked = [c for c in hit_chunks if c in own] + gold_ids  # best-ranked first
            usable = [c for c in ranked if c in hit_chunks or c in by_id]
            gold_chunk = next(((hit_chunks.get(c) or by_id[c]) for c in usable if c not in withheld), None)
            if gold_chunk is not None:
                gold = _ctx(gold_chunk, context_chars)
                stats["gold_from_index"] += 1
                stats["gold_by_source" if how == "source" else "gold_by_content"] += 1
                texts = [answer[a:b].strip() for a, b in sentences]
                supported = [bool(x) for x in judge.support(texts, [gold["text"]])[:, 0]] if texts else []
            else:  # no gold passage in the index (or only held-out ones): the row itself, titled like Q/A rows
                gold = {
                    "title": ex.get("category") or "",
                    "text": _clip(answer, context_chars),
                    "source": str(ex.get("source") or ex.get("faq_id") or ex.get("id")),
                }
                stats["gold_fallback"] += 1
                stats["gold_withheld_held_out"] += int(bool(usable))
                supported = [True] * len(sentences)  # the passage is the answer itself
            contexts = [*distractors, gold]
        else:
            # the realistic "gold removed" case: the best-ranked other passages, as many as a gold row shows
            distractors = [_ctx(c, context_chars) for c in candidates[: n_distractors + 1]]
            gold, supported = None, []
            contexts = list(distractors)
        rng.shuffle(contexts)

        def target(ctxs: list[dict], gold=gold, supported=supported, answer=answer, sentences=sentences) -> str:
            if gold is None:
                return refusal_answer if no_gold_target == "refusal" else answer
            n = next(k for k, c in enumerate(ctxs, 1) if c is gold)
            return cite_answer(answer, sentences, supported, n)

        msgs = raft_messages(ex, [_strip(c) for c in contexts], system_prompt, target(contexts))
        keep = 0 if gold is not None else 1  # a distractor-only prompt keeps one passage: "gold removed", not "none"
        while fits is not None and not fits(msgs) and sum(c is not gold for c in contexts) > keep:
            drop = next(c for c in reversed(contexts) if c is not gold)
            contexts.remove(drop)
            stats["dropped_distractors_for_length"] += 1
            msgs = raft_messages(ex, [_strip(c) for c in contexts], system_prompt, target(contexts))
        info = {"gold": with_gold, "sources": [c["source"] for c in contexts]}
        if gold is not None:
            n = next(k for k, c in enumerate(contexts, 1) if c is gold)
            marked = sum(supported) or int(bool(sentences))  # unsupported everywhere: one marker at the end
            info.update(target="cited_answer", gold_number=n, cited_sentences=marked)
            stats["gold_numbers"][str(n)] = stats["gold_numbers"].get(str(n), 0) + 1
            stats["cited_targets"] += int(bool(marked))
            stats["citation_markers"] += marked
            stats["cited_sentences"] += sum(supported)
            stats["answer_sentences"] += len(sentences)
            stats["cited_at_end_unsupported"] += int(bool(sentences) and not any(supported))
        elif no_gold_target == "refusal":
            info["target"] = "refusal"
            stats["refusal_targets"] += 1
        else:
            info["target"] = "answer"
            stats["answer_targets_without_gold"] += 1
        out[i] = {**ex, "messages": msgs, "raft": info}
        stats["raft_examples"] += 1
        stats["with_gold" if with_gold else "without_gold"] += 1
        stats["distractors"] += sum(1 for c in contexts if c is not gold)
    if stats["cited_targets"]:
        stats["markers_per_cited_target"] = round(stats["citation_markers"] / stats["cited_targets"], 3)
    return out, stats


# ---------------------------------------------------------------------------------------------- citations

# Sentence ends as `pipeline.metrics.split_sentences` finds them (. ! ? and the like, then closing quotes or
# brackets, then a space and a capital or an opening quote; and every line break), as spans of the original text
# so that markers can go in without touching the answer's wording.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*")
_OPENERS = frozenset("\"'(\u201c\u2018\u00bf\u00a1")
_LINE = re.compile(r"[^\r\n\u2028\u2029]+")
_TRAILING_END = re.compile(r"([.!?\u2026\u3002\uff01\uff1f]+)([\"'\u201d\u2019)\]]*)$")
_HAS_WORD = re.compile(r"[^\W_]")


def answer_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text` that holds a letter or digit, trailing spaces excluded."""
    spans = []
    for line in _LINE.finditer(text):
        start = line.start()
        for m in _SENTENCE_END.finditer(text, line.start(), line.end()):
            gap = re.match(r"[^\S\r\n\u2028\u2029]+", text[m.end() : line.end()])
            nxt = text[m.end() + len(gap.group()) : m.end() + len(gap.group()) + 1] if gap else ""
            if nxt and (nxt.isupper() or nxt in _OPENERS):
                spans.append((start, m.end()))
                start = m.end()
        spans.append((start, line.end()))
    out = []
    for a, b in spans:
        piece = text[a:b]
        a += len(piece) - len(piece.lstrip())
        b -= len(piece) - len(piece.rstrip())
        if _HAS_WORD.search(text[a:b]):
            out.append((a, b))
    return out


def cite_answer(answer: str, sentences: list[tuple[int, int]], supported: list[bool], n: int) -> str:
    """`answer` with " [n]" before the end punctuation of each supported sentence ("... permit [2]."; after a
    closing quote or bracket: '... "permit." [2]'); when none is supported, after the last sentence."""
    if not sentences:
        return answer
    marks = [s for s, ok in zip(sentences, supported, strict=True) if ok] or [sentences[-1]]
    out = answer
    for a, b in reversed(marks):
        m = _TRAILING_END.search(out[a:b])
        at = b if m is None or m.group(2) else b - len(m.group(1))
        out = f"{out[:at]} {cite(n)}{out[at:]}"
    return out


def raft_judge(index, *, calibration_pairs: int = 0, seed: int = 0, threshold: float | None = None):
    """The groundedness judge for RAFT targets: `pipeline.metrics.Judge` with the index's embedder when it has
    one (threshold calibrated on the index's chunks with `calibration_pairs` pairs, as evaluation does; 0 keeps
    the judge's default; a given `threshold` is used as it is), else its n-gram rule alone."""
    from pipeline.metrics import Judge, calibrate_judge

    embedder = getattr(index, "embedder", None)
    if embedder is None:
        return Judge(embed=None)

    def embed(texts):
        return embedder.encode(list(texts), batch_size=64)

    if threshold is not None:
        return Judge(embed=embed, threshold=threshold)
    if calibration_pairs <= 0:
        return Judge(embed=embed)
    texts = [c.text for c in getattr(index, "chunks", None) or []]
    calibration = calibrate_judge(texts, embed, calibration_pairs, seed=seed)
    return Judge(embed=embed, threshold=float(calibration.get("threshold", Judge(embed=None).threshold)))


def describe_judge(judge) -> str:
    if getattr(judge, "embed", None) is None:
        return f"n-gram rule ({judge.overlap:g} of content-word {judge.ngram}-grams)"
    return f"embedding similarity >= {judge.threshold:.3f} or {judge.overlap:g} of content-word {judge.ngram}-grams"


def _search(index, question: str, n_distractors: int, mode: str, n_chunks: int) -> list:
    """Retriever hits for the question, enough of them to leave n_distractors after exclusions."""
    return index.search(question, k=max(n_distractors + 8, min(4 * (n_distractors + 8), n_chunks or 0)), mode=mode)


def _strip(ctx: dict) -> dict:
    return {"title": ctx["title"], "text": ctx["text"]}
