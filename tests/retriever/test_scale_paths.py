"""The query path at scale: candidates only, exact scores from stored rows, auto/IVF-PQ layouts, ANN knobs,
lazy chunks and cheap load checks."""

import json
import os

import numpy as np
import pytest
from fake_embedder import FakeEmbedder
from kb_helpers import write_jsonl

from pipeline.cli import main
from raglora.errors import RagloraError
from retriever import chunk_store
from retriever import index as index_module
from retriever.chunking import Chunk
from retriever.index import (
    AUTO_ANN_FROM,
    AUTO_PQ_FROM,
    build_from_vectors,
    build_index,
    choose_layout,
    load_index,
    verify_index,
)
from retriever.search import search

DIM = 32


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres: neighbourhoods an ANN index can find (uniform noise has none)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fake_chunks(n: int) -> list[Chunk]:
    return [
        Chunk(f"c{i}", f"text {i}", f"doc{i % 7}", "t", 0, 6, f"h{i}", f"d{i % 7}", {"shard": str(i % 4)})
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same 12,000 vectors as flat, IVF, HNSW and IVF-PQ indexes."""
    root = tmp_path_factory.mktemp("scale")
    vectors = clustered(12_000)
    chunks = fake_chunks(len(vectors))
    folders = {}
    for kind in ("flat", "ivf", "hnsw", "ivfpq"):
        build_from_vectors(root / kind, chunks, vectors, "fake", index_type=kind, ivf_nlist=64, pq_m=8, hnsw_m=8)
        folders[kind] = root / kind
    return vectors, folders


def queries(vectors: np.ndarray, n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(1)
    q = vectors[rng.integers(0, len(vectors), n)] + 0.1 * rng.normal(size=(n, vectors.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def ids_of(index, q, **kw) -> list[str]:
    return [h.chunk.chunk_id for h in search(index, "", query_vector=q, k=10, mode="dense", **kw)]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_a_dense_search_reads_only_its_candidates_rows_and_scores_them_exactly(built, kind):
    vectors, folders = built
    index = load_index(folders[kind])
    assert isinstance(index.vectors, np.memmap)  # no RAM copy of every vector
    read = []
    real = index.rows
    index.rows = lambda ids: read.append(len(ids)) or real(ids)
    q = queries(vectors, 1)[0]
    hits = search(index, "", query_vector=q, k=10, mode="dense", candidates=50)
    assert 0 < sum(read) <= 50 * (index_module.PQ_REFINE if kind == "ivfpq" else 1)
    for h in hits:
        assert h.dense_score == pytest.approx(float(vectors[int(h.chunk.chunk_id[1:])] @ q), abs=1e-5)
    assert [h.dense_score for h in hits] == sorted((h.dense_score for h in hits), reverse=True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_ann_indexes_find_the_exact_top_10_through_search(built, kind):
    vectors, folders = built
    exact, ann = load_index(folders["flat"]), load_index(folders[kind])
    recall = np.mean([len(set(ids_of(exact, q)) & set(ids_of(ann, q))) / 10 for q in queries(vectors)])
    assert recall >= 0.9, f"{kind} recall@10 {recall:.2f}"


def test_nprobe_all_lists_makes_ivf_exact_and_out_of_range_is_refused(built):
    vectors, folders = built
    exact, ivf = load_index(folders["flat"]), load_index(folders["ivf"])
    for q in queries(vectors, 5):
        assert ids_of(ivf, q, nprobe=64) == ids_of(exact, q)
    with pytest.raises(RagloraError, match=r"nprobe 65 is out of range for this index: 1\.\.64"):
        ids_of(ivf, queries(vectors, 1)[0], nprobe=65)
    assert ids_of(exact, queries(vectors, 1)[0], nprobe=65)  # a flat index has no lists: the knob is ignored


def test_ef_search_reaches_the_hnsw_search(built, monkeypatch):
    import faiss

    vectors, folders = built
    index = load_index(folders["hnsw"])
    seen = []
    real = faiss.SearchParametersHNSW

    def spy(**kw):
        seen.append(kw)
        return real(**kw)

    monkeypatch.setattr(faiss, "SearchParametersHNSW", spy)
    ids_of(index, queries(vectors, 1)[0], ef_search=300)
    assert seen == [{"efSearch": 300}]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_a_broad_filter_goes_through_the_ann_index_and_applies_before_the_cut(built, kind, monkeypatch):
    vectors, folders = built
    monkeypatch.setattr(index_module, "EXACT_FILTERED_MAX", 0)  # force the ID-selector path
    index = load_index(folders[kind])
    for q in queries(vectors, 5):
        hits = search(index, "", query_vector=q, k=10, mode="dense", filters={"shard": "3"}, nprobe=64, ef_search=256)
        assert len(hits) == 10 and all(h.chunk.metadata["shard"] == "3" for h in hits)


def test_choose_layout_picks_by_corpus_size_and_refuses_an_untrainable_ivfpq():
    assert choose_layout(AUTO_ANN_FROM - 1, 384, "auto", None, None).index_type == "flat"
    ivf = choose_layout(1_000_000, 384, "auto", None, None)
    assert (ivf.index_type, ivf.nlist) == ("ivf", 4000)
    pq = choose_layout(AUTO_PQ_FROM, 384, "auto", None, None)
    assert (pq.index_type, pq.pq_m) == ("ivfpq", 48)
    assert choose_layout(20_000, 768, "ivfpq", None, None).pq_m == 96
    with pytest.raises(RagloraError, match=r"ivfpq needs at least 9,984 vectors to train.*got 500"):
        choose_layout(500, 384, "ivfpq", None, None)
    with pytest.raises(RagloraError, match="pq_m 7 must divide the embedding dimension 384"):
        choose_layout(20_000, 384, "ivfpq", None, 7)


def test_an_untrainable_ivfpq_build_leaves_the_old_index_answering(tmp_path):
    rows = [{"id": f"r{i}", "category": "c", "text": f"topic{i} shared words row {i}"} for i in range(40)]
    write_jsonl(tmp_path / "kb" / "rows.jsonl", rows)
    embedder = FakeEmbedder()
    build_index([tmp_path / "kb"], tmp_path / "ix", embedder, chunk_size=300, chunk_overlap=0, show_progress=False)
    with pytest.raises(RagloraError, match="ivfpq needs at least"):
        build_index(
            [tmp_path / "kb"],
            tmp_path / "ix",
            embedder,
            chunk_size=300,
            chunk_overlap=0,
            show_progress=False,
            index_type="ivfpq",
        )
    assert load_index(tmp_path / "ix", embedder).search("topic17", k=1)[0].chunk.chunk_id == "r17"


def test_large_chunk_files_are_read_lazily_with_the_same_results(built, monkeypatch):
    vectors, folders = built
    eager = load_index(folders["ivf"])
    monkeypatch.setattr(chunk_store, "EAGER_BYTES", 0)
    lazy = load_index(folders["ivf"])
    assert isinstance(lazy.chunks, chunk_store.ChunkStore) and isinstance(eager.chunks, list)
    assert list(lazy.chunks) == eager.chunks and lazy.chunks[-1] == eager.chunks[-1]
    q = queries(vectors, 1)[0]
    for kw in ({}, {"filters": {"source": "doc3"}}, {"exclude": ["c1", "c2"]}):
        a = search(eager, "", query_vector=q, k=5, mode="dense", **kw)
        b = search(lazy, "", query_vector=q, k=5, mode="dense", **kw)
        assert [h.to_dict() for h in a] == [h.to_dict() for h in b]


def test_loading_checks_sizes_and_mtimes_and_hashes_only_on_demand(built, tmp_path, monkeypatch):
    import shutil

    _, folders = built
    folder = tmp_path / "copy"
    shutil.copytree(folders["flat"], folder, copy_function=shutil.copy2)  # copy2 keeps mtimes
    hashed = []
    real = index_module.file_sha256
    monkeypatch.setattr(index_module, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    load_index(folder)
    assert hashed == []
    verify_index(folder)
    assert sorted(hashed) == ["chunks.jsonl", "faiss.index", "vectors.npy"]

    # Same size, same mtime, different bytes: only the on-demand check can see it.
    target = folder / "vectors.npy"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_index(folder)
    with pytest.raises(RagloraError, match="vectors.npy: checksum does not match"):
        verify_index(folder)
    os.utime(target)  # a new mtime: the next plain load checks the hash itself
    with pytest.raises(RagloraError, match="checksum does not match"):
        load_index(folder)


def test_index_verify_command_reports_and_exits_non_zero_on_a_corrupt_index(built, tmp_path, capsys):
    import shutil

    _, folders = built
    folder = tmp_path / "ix"
    shutil.copytree(folders["flat"], folder, copy_function=shutil.copy2)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"paths": {"index_dir": str(folder)}}))
    assert main(["index", "--config", str(config), "--verify"]) == 0
    assert "every file matches" in capsys.readouterr().out
    target = folder / "chunks.jsonl"
    stat = target.stat()
    target.write_bytes(target.read_bytes().replace(b"text 1", b"text 9", 1))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(["index", "--config", str(config), "--verify"]) != 0
    assert "chunks.jsonl: checksum does not match" in capsys.readouterr().err


def test_rows_read_with_pread_equal_the_stored_rows(built):
    vectors, folders = built
    index = load_index(folders["ivf"])
    ids = np.array([0, 5, 4095, 11_999])
    assert np.array_equal(index.rows(ids), vectors[ids])


def test_a_query_vector_of_the_wrong_dimension_is_refused(built):
    _, folders = built
    with pytest.raises(RagloraError, match=r"dimension 32"):
        search(load_index(folders["flat"]), "", query_vector=np.ones(5, dtype=np.float32), k=3, mode="dense")
