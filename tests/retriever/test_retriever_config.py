import pytest
from pydantic import ValidationError

from retriever.config import IndexConfig, RetrievalConfig


def test_defaults_match_the_documented_contract():
    ic, rc = IndexConfig(), RetrievalConfig()
    assert ic.docs == ["data/kb"] and ic.embedder == "packaged:all-mpnet-base-v2"
    assert (ic.chunk_size, ic.chunk_overlap, ic.faq_include_question, ic.index_type) == (800, 100, False, "auto")
    assert (rc.k, rc.mode, rc.rrf_k, rc.candidates) == (3, "dense", 60, 50)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": 0},
        {"chunk_overlap": -1},
        {"chunk_size": 100, "chunk_overlap": 100},
        {"index_type": "annoy"},
        {"batch_size": 0},
        {"unknown_key": 1},
    ],
)
def test_invalid_index_settings_are_rejected(kwargs):
    with pytest.raises(ValidationError):
        IndexConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"mode": "sparse"},
        {"candidates": 0},
        {"mode": "hybrid", "dense_weight": 0, "bm25_weight": 0},
        {"extra": True},
    ],
)
def test_invalid_retrieval_settings_are_rejected(kwargs):
    with pytest.raises(ValidationError):
        RetrievalConfig(**kwargs)
