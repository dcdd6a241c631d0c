"""Retrieval quality: did the gold source come back, and how high? (hit@k and mean reciprocal rank)."""

from __future__ import annotations

from collections.abc import Sequence

from retriever.errors import RagloraError


def retrieval_metrics(ranked_sources: list[list[str]], gold: list[str], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """hit@k: share of queries whose gold source is in the top k. mrr: mean of 1/rank of the gold (0 if absent).

    Returns {"n": queries, "hit@1": ..., "hit@5": ..., "mrr": ...}. Only the first occurrence of gold counts.
    """
    if len(ranked_sources) != len(gold):
        raise RagloraError(f"retrieval_metrics: {len(ranked_sources)} rankings but {len(gold)} gold sources")
    if not gold:
        raise RagloraError("retrieval_metrics: no queries to evaluate")
    if any(k <= 0 for k in ks):
        raise RagloraError(f"retrieval_metrics: every k must be positive, got {list(ks)}")
    ranks = []
    for ranking, target in zip(ranked_sources, gold, strict=True):
        ranks.append(ranking.index(target) + 1 if target in ranking else None)
    n = len(gold)
    metrics: dict = {"n": n}
    for k in ks:
        metrics[f"hit@{k}"] = sum(1 for r in ranks if r is not None and r <= k) / n
    metrics["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n
    return metrics
