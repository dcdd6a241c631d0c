"""Every benchmark in its tiniest mode with the tiny random model (tests/tiny_model.py) and a fake embedder: the
scripts run end to end, write reports/bench-style JSON with tables, and run_all assembles the README."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_embedder import FakeEmbedder
from tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the benchmarks read data/ relative to the repo root


def _report(out: Path, name: str) -> dict:
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["name"] == name and doc["tables"] and doc["machine"]["torch"]
    for table in doc["tables"].values():
        assert table.startswith("| ")
    return doc


def test_train_throughput(tiny, tmp_path):
    from bench import train_throughput

    argv = ["--in-process", "--steps", "1", "--base", tiny, "--val-examples", "4",
            "--batch-size", "2", "--train-rows", "8", "--workloads", "plain", "--full-steps", "1",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert train_throughput.main(argv) == 0
    results = _report(tmp_path, "train_throughput")["results"]
    sides = {"ours", "ours-packed", "trl", "hf-grouped", "hf"}
    res = results["workloads"]["plain"]
    assert set(res["sides"]) == sides
    assert res["summary"]["best_peer"] in ("trl", "hf", "hf-grouped")
    assert set(res["summary"]["peers"]) == {"trl", "hf-grouped", "hf"}
    lora, full = results["full_vs_lora"]["lora"], results["full_vs_lora"]["full"]
    assert full["trainable_params"] > lora["trainable_params"]
    assert full["grads_and_adam_mb"] > lora["grads_and_adam_mb"] and lora["saved_activations_mb"] >= 0
    assert 0 < res["summary"]["baseline_epoch_random_padding_efficiency"] <= 1
    for side in res["sides"].values():
        assert side["steps"] == 1 and side["real_tokens"] > 0 and side["val_loss"] > 0
    # the full-epoch equality run: every side saw every example of the last stage once
    eq = results["equality"]
    assert eq["stage"] == "subdomain" and set(eq["sides"]) == sides
    assert set(eq["check"]) == sides - {"ours"}
    real = {side: r["real_tokens"] for side, r in eq["sides"].items()}
    assert len(set(real.values())) == 1, real
    assert all(r["steps"] > 1 for r in eq["sides"].values())
    assert eq["summary"]["best_peer"] in ("trl", "hf", "hf-grouped")  # the like-for-like speed comparison
    # re-judging the saved report measures nothing and gives the same tables
    before = _report(tmp_path, "train_throughput")
    assert train_throughput.main(["--from-json", str(tmp_path / "train_throughput.json")]) == 0
    after = _report(tmp_path, "train_throughput")
    assert after["tables"] == before["tables"] and after["machine"] == before["machine"]
    from bench.run_all import headlines

    lines = headlines({"train_throughput": {"results": results}})
    assert any(line.startswith("LoRA training (plain workload)") for line in lines)
    assert any(line.startswith("Loss equality after one epoch of subdomain") for line in lines)


def _side(tps: float, loss: float) -> dict:
    return {"tokens_per_s": tps, "val_loss": loss}


def test_a_peer_whose_loss_diverges_gets_no_speed_figure():
    from bench.train_throughput import compare, loss_check

    epoch = {"ours": _side(100, 3.0), "trl": _side(90, 3.3), "hf-grouped": _side(60, 3.02)}
    check = loss_check(epoch)
    assert not check["trl"]["equal"] and check["hf-grouped"]["equal"]
    res = {"ours": _side(120, 3.0), "trl": _side(110, 3.1), "hf-grouped": _side(60, 3.0)}
    summary = compare(res, 1.5, check)
    assert summary["peers"]["trl"]["speedup"] is None and "FAILED" in summary["peers"]["trl"]["status"]
    assert summary["best_peer"] == "hf-grouped" and summary["speedup_tokens_per_s"] == 2.0
    assert summary["speedup_goal_met"]


def test_a_missing_trl_skips_its_row_with_the_reason(monkeypatch, tiny, tmp_path):
    from bench import train_throughput

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    assert "trl is not installed" in train_throughput.trl_missing()
    argv = ["--in-process", "--steps", "1", "--base", tiny, "--val-examples", "2", "--batch-size", "2",
            "--train-rows", "4", "--workloads", "plain", "--sides", "ours,trl", "--no-epoch", "--no-full",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert train_throughput.main(argv) == 0
    doc = _report(tmp_path, "train_throughput")
    summary = doc["results"]["workloads"]["plain"]["summary"]
    assert summary["best_peer"] is None and summary["peers"]["trl"]["status"].startswith("skipped: trl is not")
    assert "skipped" in next(iter(doc["tables"].values()))


def test_generation(tiny, tmp_path):
    from bench import generation

    argv = ["--base", tiny, "--adapters", str(tmp_path / "none"), "--questions", "2", "--tokens", "3",
            "--repeats", "1", "--out-dir", str(tmp_path)]  # fmt: skip
    assert generation.main(argv) == 0
    res = _report(tmp_path, "generation")["results"]
    assert res["merged_equals_stacked_tokens"] is True
    assert res["batched_vs_sequential"]["identical_outputs"] == 2
    assert len(res["latency"]) == 4


def test_adapter_strategies(tiny, tmp_path):
    from bench import adapter_strategies

    argv = ["--base", tiny, "--adapters", str(tmp_path / "none"), "--questions", "2", "--tokens", "3",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert adapter_strategies.main(argv) == 0
    rows = _report(tmp_path, "adapter_strategies")["results"]["strategies"]
    assert set(rows) == {"merged", "stack", "cumulative"}
    # merged holds a model copy per stage; cumulative's chain adapters (ranks 16+32+48) outweigh stack's 3 x 16
    assert rows["merged"]["tensor_mb"] > rows["cumulative"]["tensor_mb"] > rows["stack"]["tensor_mb"]
    for r in rows.values():
        assert r["same_answers_as_merged"] == 2 and r["decode_ms_per_token"] > 0


class _FakeST:
    def __init__(self, emb: FakeEmbedder):
        self.emb = emb

    def encode(self, texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True):
        return self.emb.encode(list(texts))


def test_retrieval(tmp_path, monkeypatch):
    import retriever.embedder
    from bench import retrieval

    fake = FakeEmbedder(dimension=32)
    fake.model = _FakeST(fake)
    monkeypatch.setattr(retriever.embedder, "load_embedder", lambda *a, **k: fake)
    argv = ["--quick", "--kb-rows", "30", "--queries", "5", "--scale", "3000", "--out-dir", str(tmp_path)]
    assert retrieval.main(argv) == 0
    res = _report(tmp_path, "retrieval")["results"]
    assert res["build"]["chunks"] == 30
    assert set(res["query"]["latency"]) == {
        "raglora dense",
        "raglora bm25",
        "raglora hybrid",
        "LangChain FAISS similarity_search",
    }
    assert res["scale"]["3000/flat"]["recall@10"] == 1.0
    assert 0 <= res["scale"]["3000/hnsw"]["recall@10"] <= 1


def test_api_load(tiny, tmp_path):
    from bench import api_load

    argv = ["--quick", "--base", tiny, "--index", "none", "--adapters", str(tmp_path / "none"), "--clients", "2",
            "--requests", "2", "--tokens", "3", "--batching", "on", "--out-dir", str(tmp_path)]  # fmt: skip
    assert api_load.main(argv) == 0
    res = _report(tmp_path, "api_load")["results"]
    assert res["errors_total"] == 0
    assert res["levels"]["on/2"]["requests"] == 2


def test_end_to_end_and_readme(tmp_path):
    from bench import end_to_end, run_all

    assert end_to_end.main(["--quick", "--stages", "data", "--out-dir", str(tmp_path)]) == 0
    res = _report(tmp_path, "end_to_end")["results"]
    assert res["stages"]["data"]["rc"] == 0 and res["stages"]["data"]["peak_rss_mb"] > 0
    assert run_all.main(["--readme-only", "--out-dir", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "## Machine" in readme and "## end_to_end" in readme


def test_shared_helpers():
    from bench.common import latency_summary, md_table, percentile, ratio

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert latency_summary([0.001] * 3)["p95_ms"] == 1.0
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0) is None
    assert md_table(["a"], [[np.float64(1.5).item()]]).splitlines()[2] == "| 1.50 |"
    assert sys.executable


def test_the_grouped_trainer_peer_really_groups_by_length(tmp_path):
    from transformers import TrainingArguments

    from bench.train_throughput import grouping_args

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", **grouping_args(TrainingArguments)
    )
    assert getattr(args, "train_sampling_strategy", None) == "group_by_length" or getattr(
        args, "group_by_length", False
    )
