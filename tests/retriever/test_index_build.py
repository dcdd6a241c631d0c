import json

import numpy as np
import pytest
from fake_embedder import FakeEmbedder
from kb_helpers import GUIDE_MD, faq_rows, write_jsonl

from raglora.errors import RagloraError
from retriever.index import build_index, load_index

SETTINGS = {"chunk_size": 300, "chunk_overlap": 30, "show_progress": False}


def test_build_writes_a_complete_manifest(kb, tmp_path, embedder):
    report = build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    assert (report.n_documents, report.n_chunks, report.embedded, report.reused, report.removed) == (13, 13, 13, 0, 0)
    names = {p.name for p in (tmp_path / "ix").iterdir()}
    assert {"manifest.json", "chunks.jsonl", "vectors.npy", "faiss.index"} <= names
    m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert m["embedder"] == {"name": "fake-embedder", "dimension": 64, "normalised": True}
    assert m["chunking"] == {"chunk_size": 300, "chunk_overlap": 30, "faq_include_question": False}
    assert m["counts"] == {"documents": 13, "chunks": 13} and m["index_type"] == "flat"
    assert {"faiss-cpu", "sentence-transformers", "bm25s"} <= set(m["versions"])
    assert {d["source"] for d in m["documents"]} >= {"roofing-001", (kb / "guides" / "energy.md").as_posix()}
    assert all(d["doc_hash"] and d["chunk_ids"] for d in m["documents"])
    vectors = np.load(tmp_path / "ix" / "vectors.npy")
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_unchanged_rebuild_embeds_nothing(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    calls = embedder.calls
    manifest = (tmp_path / "ix" / "manifest.json").read_bytes()
    report = build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    assert (report.embedded, report.reused, report.removed) == (0, 13, 0)
    assert embedder.calls == calls
    assert (tmp_path / "ix" / "manifest.json").read_bytes() == manifest  # untouched: digests stay stable
    report = build_index([kb], tmp_path / "ix", embedder, **SETTINGS, index_type="hnsw")
    assert report.embedded == 0 and load_index(tmp_path / "ix").manifest["index_type"] == "hnsw"


def test_editing_one_document_reembeds_only_its_chunks(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    before = load_index(tmp_path / "ix")
    rows = faq_rows()
    rows[1]["answer"] = "Completely new answer about slate roofs and copper flashing."
    write_jsonl(kb / "faq.jsonl", rows)
    (kb / "guides" / "energy.md").write_text(GUIDE_MD.replace("500 millimetres", "450 millimetres"), encoding="utf-8")
    embedder.texts_encoded.clear()

    report = build_index([kb], tmp_path / "ix", embedder, **SETTINGS)

    assert (report.embedded, report.reused, report.removed) == (2, 11, 2)
    assert len(embedder.texts_encoded) == 2
    assert embedder.texts_encoded[0].startswith("Completely new answer")
    assert "450 millimetres" in embedder.texts_encoded[1]
    after = load_index(tmp_path / "ix", embedder)
    unchanged = [i for i, c in enumerate(after.chunks) if c.chunk_id not in ("roofing-002",) and "450" not in c.text]
    old_rows = {c.chunk_id: before.vectors[i] for i, c in enumerate(before.chunks)}
    assert all(np.array_equal(after.vectors[i], old_rows[after.chunks[i].chunk_id]) for i in unchanged)
    assert after.search("slate roofs copper flashing", k=1)[0].chunk.chunk_id == "roofing-002"


def test_deleting_a_document_removes_its_chunks(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    (kb / "guides" / "energy.md").unlink()
    report = build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    assert (report.n_chunks, report.embedded, report.removed) == (10, 0, 3)
    index = load_index(tmp_path / "ix", embedder)
    assert not any(c.source.endswith("energy.md") for c in index.chunks)
    assert all(h.chunk.title != "Insulation" for h in index.search("attic insulation", k=10))


def test_changed_embedder_or_chunking_forces_a_full_rebuild(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    other = FakeEmbedder(dimension=32, name="other-embedder")
    report = build_index([kb], tmp_path / "ix", other, **SETTINGS)
    assert (report.embedded, report.reused) == (13, 0)
    assert any("other-embedder" in w and "rebuilding" in w for w in report.warnings)
    report = build_index([kb], tmp_path / "ix", other, **{**SETTINGS, "chunk_size": 100})
    assert report.reused == 0 and any("chunking settings changed" in w for w in report.warnings)


def test_manifest_embedder_mismatch_names_both_embedders(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    with pytest.raises(RagloraError, match=r"built with embedder 'fake-embedder' \(dimension 64\).*'renamed'"):
        load_index(tmp_path / "ix", FakeEmbedder(name="renamed"))
    with pytest.raises(RagloraError, match=r"dimension 64.*dimension 32"):
        load_index(tmp_path / "ix", FakeEmbedder(dimension=32))


def test_save_then_load_gives_identical_top_k(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    first, second = load_index(tmp_path / "ix", embedder), load_index(tmp_path / "ix", embedder)
    q = embedder.encode(["roof tiles winter frost"])[0]
    exact = np.argsort(-(first.vectors @ q), kind="stable")[:5]
    for mode in ("dense", "bm25", "hybrid"):
        a = [h.to_dict() for h in first.search("roof tiles winter frost", k=5, mode=mode)]
        b = [h.to_dict() for h in second.search("roof tiles winter frost", k=5, mode=mode)]
        assert a == b
    dense = first.search("roof tiles winter frost", k=5, mode="dense")
    assert [h.chunk.chunk_id for h in dense] == [first.chunks[i].chunk_id for i in exact]


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_each_index_type_builds_loads_and_answers(tmp_path, embedder, index_type):
    rows = [{"id": f"r{i}", "category": "c", "text": f"topic{i} " * 3 + f"shared words row {i}"} for i in range(40)]
    write_jsonl(tmp_path / "kb" / "rows.jsonl", rows)
    report = build_index(
        [tmp_path / "kb"], tmp_path / "ix", embedder, **SETTINGS, index_type=index_type, ivf_nlist=4, hnsw_m=8
    )
    assert report.index_type == index_type and not report.warnings
    index = load_index(tmp_path / "ix", embedder)
    assert index.manifest["index_type"] == index_type
    assert index.search("topic17", k=1, mode="dense")[0].chunk.chunk_id == "r17"


def test_ivf_with_too_few_vectors_falls_back_to_flat_with_a_warning(kb, tmp_path, embedder):
    report = build_index([kb], tmp_path / "ix", embedder, **SETTINGS, index_type="ivf", ivf_nlist=256)
    assert report.index_type == "flat"
    assert any("ivf_nlist=256" in w and "flat" in w for w in report.warnings)
    assert load_index(tmp_path / "ix", embedder).search("heat pump", k=1)[0].chunk.title == "Heat pumps"


def test_build_refuses_to_replace_a_folder_that_is_not_an_index(kb, tmp_path, embedder):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(RagloraError, match="refusing to overwrite"):
        build_index([kb], precious, embedder, **SETTINGS)
    assert (precious / "notes.txt").read_text() == "keep me"
