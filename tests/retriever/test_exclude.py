"""`exclude` removes chunks before the top-k cut: evaluation's gold-removed questions depend on it."""

from retriever.index import build_index, load_index
from tests.fake_embedder import FakeEmbedder


def _index(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.md").write_text(f"# Topic {i}\n\nRoof tiles and gutters, note {i}.\n", encoding="utf-8")
    embedder = FakeEmbedder()
    build_index([docs], tmp_path / "index", embedder, chunk_size=200, chunk_overlap=0, show_progress=False)
    return load_index(tmp_path / "index", embedder)


def test_excluded_chunks_never_come_back_and_k_is_still_filled(tmp_path):
    index = _index(tmp_path)
    for mode in ("dense", "bm25", "hybrid"):
        first = index.search("roof tiles gutters", k=3, mode=mode)
        gone = {h.chunk.chunk_id for h in first}
        again = index.search("roof tiles gutters", k=3, mode=mode, exclude=gone)
        assert len(again) == 3, mode
        assert not gone & {h.chunk.chunk_id for h in again}, mode
