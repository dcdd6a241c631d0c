"""RAFT-style retrieval-aware training examples (Zhang et al., 2024, "RAFT: Adapting Language Model to
Domain Specific RAG").

A seeded `fraction` of the FAQ examples gets retrieved context in the prompt, rendered exactly as at serving
time (`finetune.prompt.build_messages` with the RAG system prompt): the gold FAQ entry plus `n_distractors`
other chunks from the retriever (never the gold one), shuffled. For a seeded `p_no_gold` share of those the
gold entry is left out. Following the paper, the target then stays the reference answer (`no_gold_target=
"answer"`: the model learns to rely on domain knowledge it memorised when retrieval misses); with
"refusal" it is `finetune.prompt.REFUSAL_ANSWER` instead (matches the RAG system prompt's instruction).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from finetune.data import raft_messages
from finetune.prompt import REFUSAL_ANSWER


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rsplit(" ", 1)[0] + " …"


def _ctx(chunk, n_chars: int) -> dict:
    return {"title": getattr(chunk, "title", "") or "", "text": _clip(chunk.text, n_chars), "source": chunk.source}


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
) -> tuple[list[dict], dict]:
    """Examples with RAFT conversations in "messages" (others unchanged) and counts of what was built.

    Eligible examples are single-turn rows with question, answer and an FAQ id (`faq_id`, else `id`).
    `fits(messages)` (optional) says whether a conversation fits the token budget; distractors are dropped
    one at a time until it does, so the gold passage and the answer are never truncated away.
    """
    rng = random.Random(f"raft:{seed}")
    eligible = [i for i, e in enumerate(examples) if e.get("question") and e.get("answer")]
    chosen = sorted(rng.sample(eligible, round(fraction * len(eligible))))
    no_gold = set(rng.sample(chosen, round(p_no_gold * len(chosen))))
    by_source: dict[str, object] = {}
    for chunk in getattr(index, "chunks", None) or []:
        by_source.setdefault(chunk.source, chunk)
    stats = {"raft_examples": 0, "with_gold": 0, "without_gold": 0, "gold_from_index": 0, "distractors": 0}
    stats["dropped_distractors_for_length"] = 0
    out = [dict(e) for e in examples]
    for i in chosen:
        ex = examples[i]
        gold_id = str(ex.get("faq_id") or ex.get("id"))
        hits = index.search(ex["question"], k=n_distractors + 8, mode=search_mode)
        distractors = [_ctx(h.chunk, context_chars) for h in hits if str(h.chunk.source) != gold_id][:n_distractors]
        contexts = list(distractors)
        with_gold = i not in no_gold
        if with_gold:
            gold_chunk = next((h.chunk for h in hits if str(h.chunk.source) == gold_id), None) or by_source.get(gold_id)
            if gold_chunk is not None:
                gold = _ctx(gold_chunk, context_chars)
                stats["gold_from_index"] += 1
            else:  # not in the index: the row itself, titled like the index titles FAQ rows (by category)
                gold = {
                    "title": ex.get("category") or "",
                    "text": _clip(ex["answer"], context_chars),
                    "source": gold_id,
                }
            contexts.append(gold)
        rng.shuffle(contexts)
        answer = ex["answer"] if with_gold or no_gold_target == "answer" else REFUSAL_ANSWER
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


def _strip(ctx: dict) -> dict:
    return {"title": ctx["title"], "text": ctx["text"]}
