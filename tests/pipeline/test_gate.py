"""The answerability gate (pipeline/gate.py): retrieval features, fitting on validation data, the threshold for a
target false-refusal rate, the too-few-examples fallback, JSON round trip and the CLI (fake embedder, tiny data)."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from fake_embedder import FakeEmbedder

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.datasets import datasets_from_config, write_datasets
from pipeline.gate import (
    FEATURES,
    choose_threshold,
    fit_gate,
    gate_examples,
    load_gate,
    retrieval_features,
    stale_reason,
)
from raglora.errors import RagloraError
from raglora.files import read_jsonl
from retriever.index import build_index, load_index
from retriever.search import bm25_scores


def _words(rng: random.Random, n: int) -> list[str]:
    """n distinct made-up words: each knowledge-base row gets its own vocabulary."""
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)))
    return sorted(out)


def _project(root, *, kb_rows: int = 60, chat_rows: int = 60):
    """A company with a Q/A knowledge base (kb: true) and an off-topic conversation source, split by `raglora data`
    and indexed with the fake embedder. Returns (config, index)."""
    rng = random.Random(0)
    words = _words(rng, 4 * kb_rows + 2 * chat_rows)
    faq = [
        {
            "id": f"faq-{i:03d}",
            "question": f"How long is the {words[4 * i]} {words[4 * i + 1]} warranty?",
            "answer": f"The {words[4 * i]} {words[4 * i + 1]} warranty covers {words[4 * i + 2]} "
            f"{words[4 * i + 3]} parts for five years.",
        }
        for i in range(kb_rows)
    ]
    base = 4 * kb_rows
    chat = [
        {
            "id": f"chat-{i:03d}",
            "question": f"Tell me a joke about {words[base + 2 * i]} cats",
            "answer": f"A {words[base + 2 * i + 1]} cat walked into a bar.",
        }
        for i in range(chat_rows)
    ]
    (root / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in faq))
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (root / "unanswerable.jsonl").write_text(json.dumps({"question": "What is your phone number?"}) + "\n")
    (root / "raglora.yaml").write_text(
        """
paths: {data_dir: data, index_dir: artifacts/index, gate_dir: artifacts/gate}
data:
  validation_fraction: 0.4
  test_fraction: 0.1
  out_of_kb_file: unanswerable.jsonl
  sources:
    - {name: chat, path: chat.jsonl}
    - {name: faq, path: faq.jsonl, kb: true}
index: {docs: [data/kb], embedder: fake}
finetune:
  stages:
    - {name: talk, sources: [chat]}
    - {name: support, sources: [faq]}
"""
    )
    cfg = load_config(root / "raglora.yaml")
    files, info, settings = datasets_from_config(cfg)
    write_datasets(cfg.paths.data_dir, files, settings=settings, info=info)
    embedder = FakeEmbedder()
    build_index(cfg.index.docs, cfg.paths.index_dir, embedder, chunk_size=800, chunk_overlap=0, show_progress=False)
    return cfg, load_index(cfg.paths.index_dir, embedder)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return _project(tmp_path_factory.mktemp("gate-project"))


@pytest.fixture(scope="module")
def fitted(project, tmp_path_factory):
    cfg, index = project
    out = tmp_path_factory.mktemp("gate") / "gate"
    return fit_gate(cfg, out_dir=out, index=index, progress=False), out


def test_features_match_a_hand_computation_on_the_fake_embedder(project):
    cfg, index = project
    query = "How long is the warranty?"
    feats = retrieval_features(index, query)
    assert set(FEATURES) <= set(feats)
    cosines = np.sort(index.vectors @ index.embedder.encode([query])[0])[::-1]  # every chunk, best first
    top50 = cosines[:50].astype(np.float64)
    assert feats["dense_top1"] == pytest.approx(cosines[0], abs=1e-6)
    assert feats["dense_margin"] == pytest.approx(cosines[0] - cosines[1], abs=1e-6)
    assert feats["dense_z"] == pytest.approx((top50[0] - top50.mean()) / top50.std(), abs=1e-4)
    assert 0 <= feats["bm25_top"] <= 1 and 0 <= feats["overlap_at_5"] <= 1 and feats["top1_agree"] in (0, 1)


def test_bm25_top_is_the_best_score_over_the_querys_idf_ceiling_and_exclusion_moves_every_feature(project):
    cfg, index = project
    row = next(c for c in index.chunks if c.source == "faq-000")
    rare = row.text.split()[1]  # the row's own made-up word: in this chunk only (document frequency 1)
    feats = retrieval_features(index, rare)
    raw = bm25_scores(index.bm25, rare, len(index.chunks), index.language).max()
    n = len(index.chunks)
    assert feats["bm25_top"] == pytest.approx(raw / math.log(1 + (n - 1 + 0.5) / (1 + 0.5)), rel=1e-5)
    assert feats["top1_agree"] == 1.0
    # a word in no chunk is the rarest possible: it raises the ceiling, so the same match counts for less
    assert retrieval_features(index, f"{rare} qqqxyz")["bm25_top"] < feats["bm25_top"] / 2
    without = retrieval_features(index, rare, exclude=[row.chunk_id])
    assert without["bm25_top"] == 0.0 and without["top1_agree"] == 0.0  # nothing else holds the word
    cosines = np.sort(index.vectors @ index.embedder.encode([rare])[0])[::-1]
    assert without["dense_top1"] == pytest.approx(cosines[1], abs=1e-6)  # the best chunk left


def test_fit_separates_answerable_from_gold_removed_and_off_topic(fitted):
    manifest, out = fitted
    assert manifest["fitted"] and (out / "gate.json").is_file() and (out / "manifest.json").is_file()
    n = manifest["n"]
    assert n["answerable"] >= 20 and n["gold_removed"] == n["answerable"] and n["off_topic"] >= 20
    assert manifest["auc"] > 0.95 and manifest["cv_auc"] > 0.9
    assert manifest["refusal"]["gold_removed"] > 0.8 and manifest["refusal"]["off_topic"] > 0.8
    assert manifest["examples"]["answerable_sources"] == ["faq"]
    assert manifest["examples"]["off_topic_sources"] == ["chat"]
    assert manifest["index"]["manifest_sha256"] and manifest["data_version"]["dataset_version"]
    assert set(manifest["coefficients"]) == set(FEATURES)
    tradeoff = manifest["tradeoff"]  # a looser target never refuses fewer unanswerable questions
    looser = [tradeoff[t]["refusal_gold_removed"] for t in sorted(tradeoff)]
    assert looser == sorted(looser) and all(tradeoff[t]["false_refusal"] <= float(t) for t in tradeoff)


def test_a_gate_fitted_on_another_index_is_reported_stale(project, fitted, tmp_path):
    _, index = project
    _, out = fitted
    assert stale_reason(out, index.path) is None
    (tmp_path / "manifest.json").write_text('{"format": "raglora-index"}')
    assert "rerun `raglora gate`" in stale_reason(out, tmp_path)


def test_off_topic_questions_come_from_train_rows_only(project, fitted):
    cfg, _ = project
    examples, _ = gate_examples(cfg, project[1])
    data = Path(cfg.paths.data_dir)
    held = {
        row["question"] for split in ("validation", "test") for _, row in read_jsonl(data / "talk" / f"{split}.jsonl")
    }
    off = {e["question"] for e in examples if e["kind"] == "off_topic"}
    assert off and not off & held
    answerable = {e["id"] for e in examples if e["kind"] == "answerable"}
    validation = {row["id"] for _, row in read_jsonl(data / "support" / "validation.jsonl")}
    assert answerable == validation


def test_threshold_meets_the_target_false_refusal_on_validation(project, fitted):
    cfg, index = project
    manifest, out = fitted
    gate = load_gate(out)
    examples, _ = gate_examples(cfg, index)
    positives = [e for e in examples if e["label"] == 1]
    refused = [not gate.decide(index, e["question"]).answerable for e in positives]
    assert sum(refused) / len(refused) == pytest.approx(manifest["false_refusal"])
    assert manifest["false_refusal"] <= cfg.gate.target_false_refusal


def test_choose_threshold_is_the_highest_meeting_the_target():
    p = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 0.95])
    assert choose_threshold(p, 0.0) == 0.1  # refuse none
    assert choose_threshold(p, 0.1) == 0.2  # refuse 1 of 10: 0.1 < 0.2
    assert choose_threshold(p, 0.25) == 0.3  # floor(2.5) = 2 refusals allowed
    t = choose_threshold(p, 0.25)
    assert (p < t).mean() <= 0.25 and (p < np.nextafter(t, 1)).mean() > 0.25  # any higher one refuses more


def test_too_few_examples_warn_write_no_gate_and_fall_back(project, tmp_path):
    cfg, index = project
    out = tmp_path / "gate"
    fit_gate(cfg, out_dir=out, index=index, progress=False)
    assert load_gate(out) is not None  # a gate from an earlier fit...
    strict = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"min_per_class": 1000})})
    manifest = fit_gate(strict, out_dir=out, index=index, progress=False)
    assert not manifest["fitted"] and "too few examples" in manifest["warning"]
    assert "serve.handoff_threshold" in manifest["warning"] and manifest["fallback"] == {
        "serve.handoff_threshold": cfg.serve.handoff_threshold
    }
    assert not (out / "gate.json").exists() and load_gate(out) is None  # ...is removed, not left stale
    assert json.loads((out / "manifest.json").read_text())["fitted"] is False


def test_json_round_trip_gives_identical_decisions(project, fitted, tmp_path):
    cfg, index = project
    _, out = fitted
    gate = load_gate(out)
    (tmp_path / "gate.json").write_text(json.dumps(gate.to_dict()))
    again = load_gate(tmp_path)
    assert again == gate
    for q in ["How long is the warranty?", "Tell me a joke", "What is the capital of France?", index.chunks[3].text]:
        a, b = gate.decide(index, q), again.decide(index, q)
        assert (a.answerable, a.p_answerable, a.features) == (b.answerable, b.p_answerable, b.features)
    feats = retrieval_features(index, "Tell me a joke")
    assert (
        gate.decide(index, "ignored", retrieval=feats).p_answerable == gate.decide(index, "Tell me a joke").p_answerable
    )


def test_everything_excluded_is_unanswerable(project, fitted):
    _, index = project
    gate = load_gate(fitted[1])
    decision = gate.decide(index, "warranty", exclude=[c.chunk_id for c in index.chunks])
    assert not decision.answerable and decision.p_answerable == 0.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "corrupt gate file"),
        ('{"format": "raglora-gate", "format_version": 1}', "corrupt gate file"),
        ("[1, 2]", "not a raglora gate"),
    ],
)
def test_a_damaged_gate_file_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "gate.json").write_text(text)
    with pytest.raises(RagloraError, match=message):
        load_gate(tmp_path)


def test_a_gate_with_other_features_or_a_bad_threshold_is_refused(fitted, tmp_path):
    raw = json.loads((fitted[1] / "gate.json").read_text())
    for bad in ({**raw, "features": list(reversed(raw["features"]))}, {**raw, "threshold": 1.5}):
        (tmp_path / "gate.json").write_text(json.dumps(bad))
        with pytest.raises(RagloraError, match="corrupt gate file"):
            load_gate(tmp_path)
    assert load_gate(tmp_path / "nothing-here") is None


def test_gate_config_defaults_and_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "raglora.yaml").write_text("gate: {target_false_refusal: 0.1}\n")
    cfg = load_config(tmp_path / "bot" / "raglora.yaml")
    assert cfg.paths.gate_dir == str(tmp_path / "bot" / "artifacts" / "gate")
    assert (cfg.gate.target_false_refusal, cfg.gate.min_per_class) == (0.1, 20)
    with pytest.raises(RagloraError, match="gate.target_false_refusal"):
        load_config(None, ["gate.target_false_refusal=1.5"])


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def fake_loader(monkeypatch):
    monkeypatch.setattr("retriever.embedder.load_embedder", lambda name, **kw: FakeEmbedder())


def test_cli_gate_fits_and_prints_the_summary(project, fake_loader, tmp_path, capsys):
    cfg, _ = project
    out = tmp_path / "g"
    args = ["gate", "--config", str(_config_file(cfg)), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "threshold" in printed and "false refusal" in printed and "gold removed" in printed
    assert load_gate(out) is not None


def test_cli_gate_warns_when_too_few_examples(project, fake_loader, tmp_path, capsys):
    cfg, _ = project
    args = ["gate", "--config", str(_config_file(cfg)), "--out", str(tmp_path / "g"), "--set", "gate.min_per_class=999"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: too few examples") and "serve.handoff_threshold" in err  # before any work
    assert load_gate(tmp_path / "g") is None


@pytest.mark.parametrize("missing, message", [("index", "no index at"), ("data", "no data at")])
def test_cli_gate_without_index_or_data_is_one_error_line(tmp_path, fake_loader, capsys, missing, message):
    (tmp_path / "raglora.yaml").write_text("paths: {data_dir: data, index_dir: index}\n")
    (tmp_path / ("data" if missing == "index" else "index")).mkdir()
    assert main(["gate", "--config", str(tmp_path / "raglora.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_gate_without_validation_rows_names_the_step(tmp_path, fake_loader, capsys):
    (tmp_path / "raglora.yaml").write_text("paths: {data_dir: data, index_dir: index}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "guide.md").write_text("# Roofs\n\nRoof tiles last about fifty years.\n")
    build_index([tmp_path / "guide.md"], tmp_path / "index", FakeEmbedder(), chunk_size=100, chunk_overlap=0,
                show_progress=False)  # fmt: skip
    assert main(["gate", "--config", str(tmp_path / "raglora.yaml")]) == 2
    assert "run `raglora data`" in capsys.readouterr().err


def _config_file(cfg) -> Path:
    return Path(cfg.paths.data_dir).parent / "raglora.yaml"


def test_demo_fits_the_gate_after_data_and_index_and_before_finetune(tmp_path, monkeypatch):
    import pipeline.cli as cli

    steps = []
    for name in ("data", "index", "gate", "finetune", "eval"):
        monkeypatch.setattr(cli, f"cmd_{name}", lambda args, name=name: steps.append(name) or 0)
    (tmp_path / "raglora.yaml").write_text("{}\n")
    assert main(["demo", "--config", str(tmp_path / "raglora.yaml")]) == 0
    assert steps == ["data", "index", "gate", "finetune", "eval"]
