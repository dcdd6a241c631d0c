"""Retrieval quality: did a gold passage come back, and how high? (hit@k and reciprocal rank).

The one home of the retrieval metrics: `raglora eval` scores each question with `retrieval_hits` (kept per question
so it can be bootstrapped), `bench/retrieval_quality.py` and the retriever tests use the aggregate
`retrieval_metrics`. A question's gold is one id or a collection of ids (every chunk of the gold document counts);
a question with no defined gold reads nan ("n/a"), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence

from raglora.errors import RagloraError

Gold = str | Collection[str] | None


def _gold_set(gold: Gold) -> frozenset[str]:
    if gold is None:
        return frozenset()
    if isinstance(gold, str):
        return frozenset([gold]) if gold else frozenset()
    return frozenset(g for g in gold if g)


def hit_ks(k: int) -> tuple[int, ...]:
    """The hit@k cut-offs worth reporting when k passages are retrieved: 1 and k (hit@5 of 3 passages is nonsense)."""
    if k <= 0:
        raise RagloraError(f"retrieval k must be positive, got {k}")
    return tuple(sorted({1, k}))


def retrieval_hits(ranked: Sequence[str], gold: Gold, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Per-question hit@k (1.0/0.0) and reciprocal rank ("mrr") of the first ranked id that is gold.

    nan for every value when the question has no defined gold. The mean of "mrr" over questions is the MRR.
    """
    targets = _gold_set(gold)
    ks = list(ks)
    if any(k <= 0 for k in ks):
        raise RagloraError(f"retrieval_hits: every k must be positive, got {ks}")
    if not targets:
        return {**{f"hit@{k}": math.nan for k in ks}, "mrr": math.nan}
    rank = next((i + 1 for i, s in enumerate(ranked) if s in targets), None)
    hits = {f"hit@{k}": float(rank is not None and rank <= k) for k in ks}
    hits["mrr"] = 1.0 / rank if rank else 0.0
    return hits


def retrieval_metrics(ranked_sources: list[list[str]], gold: list[Gold], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """hit@k: share of queries whose gold is in the top k. mrr: mean of 1/rank of the first gold (0 if absent).

    Returns {"n": queries with a defined gold, "hit@1": ..., "hit@5": ..., "mrr": ...}; queries without gold are
    left out (every value is nan when none has one).
    """
    if len(ranked_sources) != len(gold):
        raise RagloraError(f"retrieval_metrics: {len(ranked_sources)} rankings but {len(gold)} gold sources")
    if not gold:
        raise RagloraError("retrieval_metrics: no queries to evaluate")
    if any(k <= 0 for k in ks):
        raise RagloraError(f"retrieval_metrics: every k must be positive, got {list(ks)}")
    per_query = [retrieval_hits(r, g, ks) for r, g in zip(ranked_sources, gold, strict=True) if _gold_set(g)]
    metrics: dict = {"n": len(per_query)}
    for name in [*(f"hit@{k}" for k in ks), "mrr"]:
        metrics[name] = sum(q[name] for q in per_query) / len(per_query) if per_query else math.nan
    return metrics
