"""The Qdrant backend in its embedded (local) mode: FAISS-flat parity, incremental updates, filters, hybrid, bad input.

Each test builds a fresh collection in tmp_path with the fake embedder; the real packaged model appears only in the
integration test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_embedder import FakeEmbedder
from kb_helpers import faq_rows, write_jsonl

from raglora.errors import RagloraError
from retriever.chunking import chunk_documents
from retriever.config import QdrantConfig
from retriever.documents import load_documents
from retriever.index import load_index
from retriever.search import build_bm25, tokenize
from retriever.vectordb import SPARSE, build_collection, open_collection, point_id, previous_questions

SETTINGS = {"chunk_size": 300, "chunk_overlap": 30, "faq_include_question": False}
WORDS = ["roof", "tile", "gutter", "permit", "kitchen", "boiler", "window", "insulation", "drain", "paint"]
WORDS += ["floor", "stair", "wall", "damp"]


def build(kb: Path, out: Path, embedder, cfg: QdrantConfig | None = None, warnings: list | None = None):
    docs, _ = load_documents([kb])
    chunks = chunk_documents(docs, chunk_size=SETTINGS["chunk_size"], chunk_overlap=SETTINGS["chunk_overlap"])
    return build_collection(
        out, docs, chunks, embedder, cfg, settings=SETTINGS, language="en", show_progress=False, warnings=warnings
    )


def store(out: Path, embedder=None):
    return open_collection(out, json.loads((out / "manifest.json").read_text()), embedder)


def ids(hits) -> list[str]:
    return [h.chunk.chunk_id for h in hits]


def test_build_writes_a_manifest_and_one_point_per_chunk(kb, tmp_path, embedder):
    assert build(kb, tmp_path / "ix", embedder) == (13, 0)
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["backend"] == "qdrant" and manifest["qdrant"] == {"path": "qdrant", "collection": "raglora"}
    assert manifest["embedder"]["name"] == "fake-embedder" and manifest["counts"]["chunks"] == 13
    assert {"category", "kind", "section"} <= set(manifest["metadata_keys"]) and manifest["bm25"]["avgdl"] > 0
    s = store(tmp_path / "ix", embedder)
    assert len(s) == 13 and len(s.chunks) == 13
    assert [c.chunk_id for c in s.chunks] == [c for d in manifest["documents"] for c in d["chunk_ids"]]


def _big_kb(root: Path) -> Path:
    """60 FAQ rows built from overlapping vocabularies, so rankings are not trivially separable."""
    rng = np.random.default_rng(3)
    rows = [
        {"id": f"q-{i:03d}", "question": f"q{i}?", "answer": " ".join(rng.choice(WORDS, 12)), "category": WORDS[i % 5]}
        for i in range(60)
    ]
    write_jsonl(root / "faq.jsonl", rows)
    return root


def test_top5_matches_the_faiss_flat_index_for_95_percent_of_queries(tmp_path, embedder):
    from retriever.index import build_index, load_index

    kb = _big_kb(tmp_path / "kb")
    build(kb, tmp_path / "qd", embedder)
    build_index([kb], tmp_path / "fa", embedder, **SETTINGS, index_type="flat", show_progress=False)
    qdrant, faiss = store(tmp_path / "qd", embedder), load_index(tmp_path / "fa", embedder)
    queries = [f"{a} {b}" for a in WORDS for b in WORDS[::3] if a != b]
    same = sum(ids(qdrant.search(q, k=5, mode="dense")) == ids(faiss.search(q, k=5, mode="dense")) for q in queries)
    assert same / len(queries) >= 0.95, f"{same}/{len(queries)} queries agree"
    q = queries[0]
    assert [h.dense_score for h in qdrant.search(q, k=5, mode="dense")] == pytest.approx(
        [h.dense_score for h in faiss.search(q, k=5, mode="dense")], abs=1e-5
    )


def test_keyword_scores_equal_bm25s_on_the_same_tokens(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    s = store(tmp_path / "ix", embedder)
    texts = [c.index_text for c in s.chunks]
    reference = build_bm25(texts, "en")
    for query in ("roof tiles crack in frost", "permit for an extension", "heat pump noise noise"):
        expected = np.asarray(reference.get_scores(tokenize([query], "en")[0]))
        ranking = dict(s.keyword_ranking(query, 50))
        got = np.array([ranking.get(c.chunk_id, 0.0) for c in s.chunks])
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert s.keyword_ranking("zzz unknownword", 5) == []


def test_changing_one_document_embeds_only_its_chunk_and_removed_chunks_are_gone(kb, tmp_path):
    embedder = FakeEmbedder()
    build(kb, tmp_path / "ix", embedder)
    rows = faq_rows()
    rows[1]["answer"] = "Completely new answer about slate roofs and copper flashing."
    write_jsonl(kb / "faq.jsonl", rows[:-1])  # kitchen-002 removed
    embedder.texts_encoded.clear()

    assert build(kb, tmp_path / "ix", embedder) == (1, 1)
    assert embedder.texts_encoded == [rows[1]["answer"]]
    s = store(tmp_path / "ix", embedder)
    assert len(s) == 12 and "kitchen-002" not in {c.chunk_id for c in s.chunks}
    assert ids(s.search("slate roofs copper flashing", k=1, mode="hybrid")) == ["roofing-002"]
    assert "worktop" not in " ".join(h.chunk.text for h in s.search("worktop stone wood oiling", k=12))
    embedder.texts_encoded.clear()
    assert build(kb, tmp_path / "ix", embedder) == (0, 0) and embedder.texts_encoded == []


def test_a_chunk_that_moves_to_another_id_reuses_its_vector(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    rows = faq_rows()
    rows[0]["id"] = "roofing-renamed"
    write_jsonl(kb / "faq.jsonl", rows)
    embedder.texts_encoded.clear()
    assert build(kb, tmp_path / "ix", embedder) == (0, 1)
    assert embedder.texts_encoded == []
    assert ids(store(tmp_path / "ix", embedder).search(rows[0]["answer"], k=1)) == ["roofing-renamed"]


def test_questions_are_embedded_with_the_text_and_kept_for_the_next_build(kb, tmp_path, embedder):
    docs, _ = load_documents([kb])
    chunks = chunk_documents(docs, chunk_size=300, chunk_overlap=30)
    chunks[0].questions = ["Why does my ceiling drip after a frost?"]
    build_collection(tmp_path / "ix", docs, chunks, embedder, None, settings=SETTINGS, language="en", warnings=[])
    assert "Why does my ceiling drip after a frost?" in embedder.texts_encoded[0]
    assert previous_questions(tmp_path / "ix", None) == {chunks[0].content_hash: chunks[0].questions}
    assert previous_questions(tmp_path / "none", None) == {}
    hit = store(tmp_path / "ix", embedder).search("ceiling drip", k=1, mode="bm25")[0]
    assert hit.chunk.chunk_id == chunks[0].chunk_id and hit.chunk.questions == chunks[0].questions


def test_a_filter_applies_before_the_top_k_cut(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    s = store(tmp_path / "ix", embedder)
    query = "roof tiles roof tiles frost winter stone"  # the kitchen rows rank 6th or lower in every mode
    for mode in ("dense", "bm25", "hybrid"):
        assert not any(i.startswith("kitchen") for i in ids(s.search(query, k=3, mode=mode)))
        hits = s.search(query, k=3, mode=mode, filters={"category": "kitchen"})
        assert hits and {h.chunk.metadata["category"] for h in hits} == {"kitchen"}
    hits = s.search(query, k=10, filters={"category": ["kitchen", "permits"], "kind": "faq"})
    assert {h.chunk.metadata["category"] for h in hits} == {"kitchen", "permits"} and len(hits) == 4
    hits = s.search(query, k=5, filters={"section": 2})  # an integer in the metadata, matched as the FAISS path does
    assert [h.chunk.metadata["section"] for h in hits] == [2]


def test_an_unknown_filter_field_names_the_known_ones(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    s = store(tmp_path / "ix", embedder)
    with pytest.raises(RagloraError, match=r"unknown filter field 'colour'.*category.*chunk_id"):
        s.search("roof", filters={"colour": "red"})
    with pytest.raises(RagloraError, match="has no values"):
        s.search("roof", filters={"category": []})


def test_excluded_chunks_are_never_returned(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    s = store(tmp_path / "ix", embedder)
    top = ids(s.search("roof tiles frost", k=3, mode="hybrid"))
    for mode in ("dense", "bm25", "hybrid"):
        hits = ids(s.search("roof tiles frost", k=3, mode=mode, exclude=top[:2]))
        assert hits and not set(hits) & set(top[:2])


def test_hybrid_fuses_the_sparse_bm25_ranking_with_the_dense_one(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    s = store(tmp_path / "ix", embedder)
    point = s.client.retrieve(s.collection, ids=[point_id("roofing-001")], with_vectors=True)[0]
    assert SPARSE in point.vector and len(point.vector[SPARSE].indices) > 3
    hits = s.search("mortar ridge", k=3, mode="hybrid")
    assert hits[0].chunk.chunk_id == "roofing-006"
    assert hits[0].bm25_score > 0 and hits[0].dense_score is not None
    assert all(h.bm25_score is not None for h in hits)
    assert s.keyword_scores("mortar ridge", ["roofing-006", "kitchen-001"]) == [hits[0].bm25_score, 0.0]
    assert s.dense_scores(embedder.encode(["mortar ridge"])[0], ["roofing-006"]) == pytest.approx(
        [hits[0].dense_score], abs=1e-6
    )


def test_another_embedder_is_refused_and_the_old_collection_still_answers(kb, tmp_path, embedder):
    build(kb, tmp_path / "ix", embedder)
    manifest = (tmp_path / "ix" / "manifest.json").read_bytes()
    for other in (FakeEmbedder(dimension=32, name="other"), FakeEmbedder(name="same-size-other-model")):
        with pytest.raises(RagloraError, match=r"holds vectors of embedder 'fake-embedder'.*index.qdrant.collection"):
            build(kb, tmp_path / "ix", other)
    assert (tmp_path / "ix" / "manifest.json").read_bytes() == manifest
    assert ids(store(tmp_path / "ix", embedder).search("mortar ridge", k=1)) == ["roofing-006"]
    with pytest.raises(RagloraError, match="built with embedder 'fake-embedder'"):
        load_index(tmp_path / "ix", FakeEmbedder(dimension=32, name="other"))


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_qdrant_url_that_is_down_is_one_clear_error(kb, tmp_path, embedder):
    url = f"http://127.0.0.1:{_unused_port()}"
    cfg = QdrantConfig(url=url, timeout_s=1)
    with pytest.raises(RagloraError, match=rf"^cannot reach Qdrant at {url}: "):
        build(kb, tmp_path / "ix", embedder, cfg)
    assert not (tmp_path / "ix" / "manifest.json").exists()
    build(kb, tmp_path / "local", embedder)
    manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    manifest["qdrant"] = {"url": url, "collection": "raglora"}
    with pytest.raises(RagloraError, match=rf"^cannot reach Qdrant at {url}: "):
        open_collection(tmp_path / "local", manifest, embedder)


def test_a_qdrant_server_that_does_not_answer_times_out_with_one_clear_error(kb, tmp_path, embedder):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RagloraError, match=rf"^cannot reach Qdrant at {url}: timed out$"):
            build(kb, tmp_path / "ix", embedder, QdrantConfig(url=url, timeout_s=0.5))


def test_embedded_storage_in_use_by_another_process_is_a_clear_error(kb, tmp_path):
    holder = "import sys, time; from qdrant_client import QdrantClient; c = QdrantClient(path=sys.argv[1]); "
    holder += "print('ready', flush=True); time.sleep(60)"
    storage = tmp_path / "ix" / "qdrant"
    storage.mkdir(parents=True)
    (storage / "meta.json").write_text('{"collections": {}, "aliases": {}}')
    proc = subprocess.Popen([sys.executable, "-c", holder, str(storage)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        with pytest.raises(RagloraError, match=r"embedded Qdrant storage .* is in use by another process"):
            build(kb, tmp_path / "ix", FakeEmbedder())
    finally:
        proc.kill()
        proc.wait()


class MemoEmbedder:
    """Encodes each distinct text once: both backends then index and query the very same vectors, in half the time."""

    def __init__(self, embedder):
        self.embedder, self.name, self.dimension = embedder, embedder.name, embedder.dimension
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts, *, batch_size=64, show_progress=False):
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.embedder.encode(new, batch_size=batch_size), strict=True))
        return np.stack([self.memo[t] for t in texts])


@pytest.mark.integration
def test_real_minilm_top5_matches_faiss_flat_on_held_out_questions(tmp_path):
    """The packaged MiniLM on the demo knowledge base: Qdrant and FAISS flat agree on ≥ 95 % of top-5 lists."""
    from retriever.embedder import load_embedder
    from retriever.index import build_index, load_index

    repo = Path(__file__).resolve().parents[2]
    questions = []
    for name in ("data/domain/test.jsonl", "data/subdomain/test.jsonl"):
        if (repo / name).exists():
            rows = [json.loads(line) for line in (repo / name).read_text().splitlines() if line.strip()]
            questions += [r["question"] for r in rows if r.get("question")]
    if not questions:
        pytest.skip("no held-out questions in data/")
    embedder = MemoEmbedder(load_embedder("packaged:all-MiniLM-L6-v2"))
    settings = {"chunk_size": 800, "chunk_overlap": 100, "faq_include_question": False}
    docs, _ = load_documents([repo / "data" / "kb"])
    chunks = chunk_documents(docs, chunk_size=800, chunk_overlap=100)
    build_collection(
        tmp_path / "qd", docs, chunks, embedder, None, settings=settings, language="en", show_progress=False
    )
    build_index([repo / "data" / "kb"], tmp_path / "fa", embedder, **settings, index_type="flat", show_progress=False)
    qdrant, faiss = store(tmp_path / "qd", embedder), load_index(tmp_path / "fa", embedder)
    same = sum(ids(qdrant.search(q, k=5, mode="dense")) == ids(faiss.search(q, k=5, mode="dense")) for q in questions)
    print(f"Qdrant vs FAISS flat, same top-5: {same}/{len(questions)} held-out questions")
    assert same / len(questions) >= 0.95, f"{same}/{len(questions)} held-out questions agree"


def test_the_cli_and_the_langchain_retriever_work_unchanged_on_qdrant(kb, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from retriever.index import load_index
    from retriever.langchain import RagloraRetriever

    monkeypatch.setattr("retriever.embedder.load_embedder", lambda name, device="cpu": FakeEmbedder())
    out = tmp_path / "ix"
    qdrant = ["--set", "index.backend=qdrant", "--set", "index.chunk_size=300", "--set", "index.chunk_overlap=30"]
    assert main(["index", "--docs", str(kb), "--out", str(out), *qdrant]) == 0
    assert "13 chunks (13 embedded" in capsys.readouterr().out
    assert main(["search", "--index", str(out), "--k", "1", "--json", "mortar ridge tiles"]) == 0
    assert "roofing-006" in capsys.readouterr().out
    retriever = RagloraRetriever(index=load_index(out, FakeEmbedder()), k=2, mode="hybrid", ef_search=64, nprobe=8)
    docs = retriever.invoke("mortar ridge tiles")
    assert len(docs) == 2 and docs[0].metadata["chunk_id"] == "roofing-006"
