import numpy as np
import pytest

from raglora.errors import RagloraError
from retriever.index import build_index, load_index
from retriever.search import reciprocal_rank_fusion


@pytest.fixture
def index(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "index", embedder, chunk_size=300, chunk_overlap=30, show_progress=False)
    return load_index(tmp_path / "index", embedder)


def test_each_mode_finds_the_obvious_answer(index):
    for mode in ("dense", "bm25", "hybrid"):
        hits = index.search("attic insulation mineral wool", k=3, mode=mode)
        assert hits[0].chunk.title == "Insulation", mode
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))


def test_hybrid_is_the_rrf_of_the_dense_and_bm25_rankings(index, embedder):
    query = "roof tiles frost permit"
    q = embedder.encode([query])[0]
    dense_ranking = np.argsort(-(index.vectors @ q), kind="stable").tolist()[:10]
    bm25_ranking = [index.chunks.index(h.chunk) for h in index.search(query, k=10, mode="bm25")]
    expected = reciprocal_rank_fusion([dense_ranking, bm25_ranking], [1.0, 2.0], k=5)[:4]
    hits = index.search(query, k=4, mode="hybrid", rrf_k=5, dense_weight=1.0, bm25_weight=2.0, candidates=10)
    assert [h.chunk.chunk_id for h in hits] == [index.chunks[i].chunk_id for i, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected])
    assert all(h.dense_score is not None and h.bm25_score is not None for h in hits)


def test_filter_is_applied_before_the_top_k_cut(index):
    unfiltered = index.search("roof tiles repair", k=3, candidates=3)
    assert all(h.chunk.metadata.get("category") == "roofing" for h in unfiltered)
    for mode in ("dense", "bm25", "hybrid"):
        hits = index.search("roof tiles repair", k=3, candidates=3, mode=mode, filters={"category": "permits"})
        assert hits, mode
        assert {h.chunk.metadata["category"] for h in hits} == {"permits"}


def test_filter_values_can_be_lists_and_source_is_filterable(index):
    hits = index.search("renovation", k=20, mode="dense", filters={"category": ["kitchen", "permits"]})
    assert {h.chunk.metadata["category"] for h in hits} == {"kitchen", "permits"}
    md = [h for h in index.search("heat pump", k=20, mode="dense") if h.chunk.source.endswith("energy.md")][0]
    hits = index.search("anything at all", k=20, mode="dense", filters={"source": md.chunk.source})
    assert hits and {h.chunk.source for h in hits} == {md.chunk.source}
    assert index.search("roof", k=5, filters={"category": "no-such-category"}) == []


def test_unknown_filter_field_is_an_error(index):
    with pytest.raises(RagloraError, match="unknown filter field 'colour'"):
        index.search("roof", k=3, filters={"colour": "red"})


@pytest.mark.parametrize(
    ("query", "kwargs", "message"),
    [("   ", {"k": 3}, "empty query"), ("roof", {"k": 0}, "positive"), ("roof", {"k": 3, "mode": "magic"}, "mode")],
)
def test_bad_queries_are_errors(index, query, kwargs, message):
    with pytest.raises(RagloraError, match=message):
        index.search(query, **kwargs)


def test_bm25_works_without_an_embedder_but_dense_needs_one(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, chunk_size=300, chunk_overlap=30, show_progress=False)
    index = load_index(tmp_path / "ix")
    assert index.search("kitchen worktop stone", k=1, mode="bm25")[0].chunk.metadata["category"] == "kitchen"
    with pytest.raises(RagloraError, match="needs an embedder"):
        index.search("kitchen", k=1, mode="hybrid")


def test_hit_to_dict_carries_the_citation(index):
    d = index.search("heat pump service", k=1)[0].to_dict()
    assert {"text", "source", "title", "score", "chunk_id", "metadata", "start", "end", "rank"} <= set(d)
    assert d["chunk_id"].startswith(d["source"])
