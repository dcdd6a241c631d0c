import pytest

from raglora.errors import RagloraError
from retriever.evaluate import retrieval_metrics
from retriever.search import reciprocal_rank_fusion


def test_rrf_matches_hand_computation():
    # dense: 1, 2, 3   bm25: 3, 1   k = 10
    # 1: 1/11 + 1/12 = 0.17424   2: 1/12 = 0.08333   3: 1/13 + 1/11 = 0.16783
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], [1.0, 1.0], k=10)
    assert [i for i, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 11 + 1 / 12)
    assert fused[1][1] == pytest.approx(1 / 13 + 1 / 11)
    assert fused[2][1] == pytest.approx(1 / 12)


def test_rrf_weights_scale_each_ranking():
    # weights 1 and 3, k = 60: a = 1/61, b = 3/61 → b first
    fused = reciprocal_rank_fusion([["a"], ["b"]], [1.0, 3.0], k=60)
    assert fused == [("b", pytest.approx(3 / 61)), ("a", pytest.approx(1 / 61))]


def test_rrf_ties_keep_first_seen_order_and_bad_input_is_an_error():
    assert [i for i, _ in reciprocal_rank_fusion([[5], [7]], [1.0, 1.0])] == [5, 7]
    assert reciprocal_rank_fusion([[], []], [1.0, 1.0]) == []
    with pytest.raises(RagloraError):
        reciprocal_rank_fusion([[1]], [1.0, 1.0])


def test_retrieval_metrics_by_hand():
    ranked = [["a", "b", "c"], ["x", "y", "a"], ["q", "r", "s"], ["g"]]
    gold = ["a", "a", "b", "g"]
    m = retrieval_metrics(ranked, gold, ks=(1, 3))
    # ranks: 1, 3, absent, 1
    assert m == {
        "n": 4,
        "hit@1": pytest.approx(2 / 4),
        "hit@3": pytest.approx(3 / 4),
        "mrr": pytest.approx((1 + 1 / 3 + 0 + 1) / 4),
    }
    assert set(retrieval_metrics(ranked, gold)) == {"n", "hit@1", "hit@5", "hit@10", "mrr"}


def test_retrieval_metrics_rejects_mismatched_or_empty_input():
    with pytest.raises(RagloraError, match="2 rankings but 1"):
        retrieval_metrics([["a"], ["b"]], ["a"])
    with pytest.raises(RagloraError):
        retrieval_metrics([], [])
