"""End to end with the real packaged embedder on real FAQ rows (answers only are indexed)."""

import pytest
from kb_helpers import write_jsonl

from retriever.embedder import load_embedder
from retriever.evaluate import retrieval_metrics
from retriever.index import build_index, load_index


@pytest.mark.integration
def test_faq_questions_retrieve_their_own_answers_in_hybrid_mode(tmp_path):
    import zaragoza_construction_faq

    rows = zaragoza_construction_faq.load(lang="en")[::17][:30]
    write_jsonl(tmp_path / "kb" / "faq.jsonl", rows)
    embedder = load_embedder("packaged:all-MiniLM-L6-v2")
    report = build_index(
        [tmp_path / "kb"], tmp_path / "ix", embedder, chunk_size=800, chunk_overlap=100, show_progress=False
    )
    assert report.n_chunks == len(rows) == 30
    index = load_index(tmp_path / "ix", embedder)
    ranked = [[h.chunk.source for h in index.search(r["q"], k=10, mode="hybrid")] for r in rows]
    metrics = retrieval_metrics(ranked, [r["id"] for r in rows], ks=(1, 5))
    assert metrics["hit@5"] >= 0.9, metrics
    assert rows[0]["id"] in ranked[0][:5]
