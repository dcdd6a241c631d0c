"""The scale benchmark's realistic vectors (bench/realistic_vectors.py) and a tiny run of its search() measurement
through real index folders, with the fake embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_embedder import FakeEmbedder

from bench import realistic_vectors as rv
from raglora.errors import RagloraError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project():
    texts = rv.project_texts(REPO / "data", [str(REPO / "data" / "kb")], chunk_size=800, chunk_overlap=100)
    emb = FakeEmbedder(dimension=32)
    base, questions = emb.encode(texts.base), emb.encode(texts.queries)
    nbrs = rv.neighbours(base)
    return texts, base, questions, nbrs, rv.calibrate(base, nbrs, seed=0)


def test_project_texts_hold_out_the_questions_they_query_with(project):
    texts = project[0]
    assert len(texts.base) > 1000 and len(texts.queries) > 50
    assert not set(texts.queries) & set(texts.base)
    assert len(set(texts.base)) == len(texts.base)


def test_vectors_are_unit_rows_with_the_real_base_first(project):
    _, base, _, nbrs, spread = project
    x = rv.realistic_vectors(base, len(base) + 5000, nbrs=nbrs, sigma=spread.sigma, seed=1)
    assert x.shape == (len(base) + 5000, base.shape[1]) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(x[: len(base)], base)


def test_same_seed_same_vectors_into_a_file_other_seed_differs(project, tmp_path):
    _, base, _, nbrs, spread = project
    n = len(base) + 2 * rv.CHUNK_ROWS // 16
    a = rv.realistic_vectors(base, n, nbrs=nbrs, sigma=spread.sigma, seed=3)
    out = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=a.shape)
    rv.realistic_vectors(base, n, nbrs=nbrs, sigma=spread.sigma, seed=3, out=out)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), a)
    b = rv.realistic_vectors(base, n, nbrs=nbrs, sigma=spread.sigma, seed=4)
    assert not np.array_equal(a[len(base) :], b[len(base) :])


def test_synthetic_vectors_are_new_points_at_the_real_spread(project):
    _, base, _, nbrs, spread = project
    synthetic = rv.realistic_vectors(base, len(base) + 3000, nbrs=nbrs, sigma=spread.sigma, seed=5)[len(base) :]
    nearest_real = rv.distance(rv._nearest(synthetic, base, 1, self_excluded=False)[0][:, 0])
    assert nearest_real.min() > 0.05  # no copy of a real vector
    nearest_other = rv.distance(rv._nearest(synthetic, synthetic, 1, self_excluded=True)[0][:, 0])
    assert nearest_other.min() > 0.05  # nor of each other
    assert np.median(nearest_real) == pytest.approx(spread.real_nn, rel=0.1)  # calibrated on another sample
    assert spread.sigma > 0


def test_queries_are_held_out_questions_then_mixtures_never_a_base_vector(project):
    _, base, questions, _, spread = project
    q, n_real = rv.realistic_queries(questions, base, len(questions) + 40, sigma=spread.sigma, seed=0)
    assert q.shape == (len(questions) + 40, base.shape[1]) and n_real == len(questions)
    np.testing.assert_array_equal(q[:n_real], questions)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert (q @ base.T).max() < rv.SAME
    again, _ = rv.realistic_queries(questions, base, len(questions) + 40, sigma=spread.sigma, seed=0)
    np.testing.assert_array_equal(q, again)


@pytest.fixture
def fake_embedder(monkeypatch):
    import retriever.embedder

    monkeypatch.chdir(REPO)  # the benchmark reads data/ and configs/ relative to the repo root
    monkeypatch.setattr(retriever.embedder, "load_embedder", lambda *a, **k: FakeEmbedder(dimension=32))


def test_scale_run_measures_search_on_flat_and_ivf(fake_embedder, tmp_path):
    from bench import retrieval

    argv = ["--skip-corpus", "--scale", "3000", "--types", "ivf", "--queries", "20", "--faiss-threads", "1",
            "--work-dir", str(tmp_path),
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert retrieval.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    res = doc["results"]
    flat, ivf = res["scale"]["3000/flat"], res["scale"]["3000/ivf"]
    assert flat["built_type"] == "flat" and ivf["built_type"] == "ivf"
    assert flat["faiss_threads"] == ivf["faiss_threads"] == 1
    assert flat["recall@10"] == 1.0 and flat["speedup_vs_exact"] == 1.0
    recalls = [r["recall@10"] for r in ivf["sweep"]]
    assert [r["setting"] for r in ivf["sweep"]] == [{"nprobe": p} for p in (8, 16, 32, 64)]
    assert min(recalls) < 1.0  # the vectors are not trivially separable: few lists miss true neighbours
    assert recalls == sorted(recalls)  # more lists probed, more found
    for row in (flat, ivf):
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["build_s"] > 0
        assert row["rss_anon_mb"] > 0 and row["resident_gb_per_1m"] > 0
    assert res["realistic_vectors"]["vectors"] == 3000 and res["realistic_vectors"]["real_queries"] == 20
    assert set(res["scale_goals"]) == {"recall_at_speed", "ivfpq_memory"}
    assert res["scale_goals"]["ivfpq_memory"]["met"] is None  # not asked for, so not measured
    assert any("search() at 3,000" in title for title in doc["tables"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the work folder is removed


def test_unknown_index_type_is_a_clear_error(fake_embedder, tmp_path):
    from bench import retrieval

    with pytest.raises(RagloraError, match="unknown index type"):
        retrieval.main(["--skip-corpus", "--scale", "3000", "--types", "annoy", "--out-dir", str(tmp_path)])
