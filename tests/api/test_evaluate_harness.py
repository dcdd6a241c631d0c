"""The evaluation harness end to end on the tiny model: every arm, the skip path, the report files."""

import json

import pytest
from helpers import FAQ_ROWS, make_service

from pipeline.config import load_config
from pipeline.evaluate import load_test_sets, plan_arms, run_evaluation
from retriever.errors import RagloraError


def write_data(root):
    def dump(rel, rows):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    faq = [r for r in FAQ_ROWS if r["id"] != "inject-001"]
    example = lambda r: {"id": r["id"], "faq_id": r["id"], "question": r["question"], "answer": r["answer"]}  # noqa: E731
    dump("kb/faq.jsonl", FAQ_ROWS)
    dump("domain/test.jsonl", [example(r) for r in faq[:3]])
    dump("subdomain/test.jsonl", [example(r) for r in faq[3:]])
    dump("eval/out_of_kb.jsonl", [{"id": "o-1", "question": "How do I reset my bank password?"}])
    dump(
        "general/test.jsonl",
        [{"id": "g-1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
    )
    return root


@pytest.fixture
def cfg(tmp_path, adapters_dir):
    data = write_data(tmp_path / "data")
    return load_config(
        None,
        [
            f"paths.data_dir={data}",
            f"paths.adapters_dir={adapters_dir}",
            "eval.max_new_tokens=4",
            "eval.bootstrap_resamples=50",
            "eval.calibration_pairs=0",
            "eval.speedup_questions=2",
        ],
    )


def test_every_arm_answers_every_applicable_set_and_the_report_names_them(
    tmp_path, cfg, settings, adapters_dir, index, monkeypatch
):
    monkeypatch.setattr("retriever.embedder.load_embedder", lambda *a, **k: index.embedder)
    service = make_service(settings, adapters_dir, index)
    try:
        out = run_evaluation(cfg, out_dir=tmp_path / "report", service=service)
    finally:
        service.close()
    results = json.loads((out / "results.json").read_text())
    expected = {"base", "rag", "oracle"} | {
        f"{m}-{s}" for m in ("lora", "rag+lora") for s in ("general", "domain", "subdomain")
    }
    assert set(results["arms"]) == expected
    rag = results["arms"]["rag+lora-subdomain"]
    assert {a["test_set"] for a in rag["answers"]} == {"domain", "subdomain", "out_of_kb"}
    assert {a["test_set"] for a in results["arms"]["lora-domain"]["answers"]} == {
        "domain",
        "subdomain",
        "out_of_kb",
        "general",
    }
    # citation_precision is nan (n=0) when the random model writes no [n] marker, so it is not listed here.
    for metric in ("token_f1", "rouge_l", "semantic_similarity", "hit@5", "has_citation", "refusal_rate"):
        stats = rag["metrics"][metric]
        assert stats["n"] >= 1 and (stats["low"] is None or stats["low"] <= stats["mean"] <= stats["high"])
    # The oracle arm always cites the gold entry: retrieval is perfect by construction.
    assert results["arms"]["oracle"]["metrics"]["hit@1"]["mean"] == 1.0
    assert set(results["forgetting"]) == {"base", "general", "domain", "subdomain"}
    assert results["generation_speedup"]["identical_outputs"] is True
    html = (out / "report.html").read_text()
    for arm in expected:
        assert arm in html
    assert (out / "report.md").is_file()


def test_arms_needing_missing_artifacts_are_skipped_with_the_make_target():
    arms, skipped = plan_arms(["base", "rag", "lora", "rag+lora", "oracle"], [], has_index=False, oracle_ok=True)
    assert set(arms) == {"base", "oracle"}
    assert skipped == {
        "rag": "no index: run `make index`",
        "lora": "no trained stage adapters: run `make finetune`",
        "rag+lora": "no trained stage adapters: run `make finetune`",
    }
    with pytest.raises(RagloraError, match="unknown arm 'rlhf'"):
        plan_arms(["rlhf"], [], has_index=True, oracle_ok=True)


def test_rows_without_a_reference_are_skipped_and_empty_sets_are_errors(tmp_path):
    data = write_data(tmp_path)
    (data / "domain/test.jsonl").write_text(
        '{"id": "x", "question": "q?"}\n{"id": "y", "question": "q2?", "answer": "a"}\n'
    )
    sets, notes = load_test_sets(data, {"domain": 10})
    assert [q["id"] for q in sets["domain"]] == ["y"] and "row x has no question or reference" in notes[0]
    (data / "subdomain/test.jsonl").write_text("")
    with pytest.raises(RagloraError, match="test set 'subdomain' is empty"):
        load_test_sets(data, {})


def test_groundedness_calibration_labels_pairs_from_the_knowledge_base():
    from fake_embedder import FakeEmbedder

    from pipeline.evaluate import calibrate_groundedness

    rows = [
        {"answer": f"Topic {w} is about {w} things. Every {w} needs a {w} permit. Ask the {w} office."}
        for w in ("roof", "deck", "garage", "sauna", "fence")
    ]
    embedder = FakeEmbedder()
    result = calibrate_groundedness(rows, lambda t: embedder.encode(list(t)), n_pairs=5)
    assert result["n_supported"] == 5 and result["n_unsupported"] == 5
    assert 0.0 <= result["threshold"] <= 1.0 and "balanced accuracy" in result["method"]
