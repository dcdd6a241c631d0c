"""The evaluation harness end to end on the tiny model, on a project whose stages are not general/domain/subdomain:
arms and per-stage gains from the manifests' chain, set kinds, n/a without gold, hit@k at the k retrieved, --limit."""

import json
import math

import pytest
import yaml
from helpers import FAQ_ROWS, make_service, make_stage_adapters

from pipeline.config import EvalSet, load_config, resolve_eval_sets
from pipeline.evaluate import (
    load_test_set,
    load_test_sets,
    parse_row,
    plan_arms,
    run_evaluation,
    score_records,
)
from pipeline.metrics import Judge
from pipeline.report import render_markdown
from raglora.errors import RagloraError

STAGES = ("basics", "heat-pumps")
NO_GOLD = {
    "id": "hp-nogold",
    "question": "How often should a heat pump be serviced?",
    "answer": "Yearly, by a certified technician who checks refrigerant pressure.",
    "source": None,
}


def dump(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(root):
    faq = [r for r in FAQ_ROWS if r["id"] != "inject-001"]
    held_out = lambda r: {"id": r["id"], "question": r["question"], "answer": r["answer"], "source": None}  # noqa: E731
    dump(root / "heat-pumps/test.jsonl", [NO_GOLD, *(held_out(r) for r in faq[:3])])
    dump(root / "eval/out_of_kb.jsonl", [{"id": "o-1", "question": "How do I reset my bank password?"}])
    dump(
        root / "basics/test.jsonl",
        [
            {"id": "g-1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {
                "id": "g-2",
                "question": None,
                "answer": None,
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello there"},
                    {"role": "user", "content": "How are you?"},
                    {"role": "assistant", "content": "I am fine, thanks"},
                ],
            },
        ],
    )
    dump(root.parent / "unanswered.jsonl", [{"id": "u-1", "question": "What is the capital of Peru?"}])
    return root


def write_config(tmp_path, adapters_dir, **eval_extra):
    data = write_data(tmp_path / "data")
    raw = {
        "paths": {"data_dir": str(data), "adapters_dir": str(adapters_dir), "reports_dir": str(tmp_path / "reports")},
        "data": {
            "sources": [
                {"name": "chat", "path": "packaged:chatterbot-corpus"},
                {"name": "tickets", "path": "tickets.csv"},
            ]
        },
        "finetune": {
            "stages": [
                {"name": "basics", "sources": ["chat"]},
                {"name": "heat-pumps", "sources": ["tickets"]},
            ]
        },
        "eval": {
            "sets": {
                "heat-pumps": "held_out:heat-pumps",
                "basics": "held_out:basics",
                "out_of_kb": "out_of_kb",
                "unanswered": "unanswered.jsonl",
            },
            "max_new_tokens": 4,
            "bootstrap_resamples": 50,
            "calibration_pairs": 0,
            "speedup_questions": 0,
            **eval_extra,
        },
    }
    path = tmp_path / "raglora.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.fixture(scope="module")
def custom_adapters(tmp_path_factory):
    """Stages named basics -> heat-pumps, with manifests carrying the loss-based forgetting figures."""
    out = make_stage_adapters(tmp_path_factory.mktemp("custom-adapters"), stages=STAGES)
    metrics = {
        "basics": {"validation_loss": {"basics": 2.0}, "forgetting": {"basics": {"before_this_stage": 2.5}}},
        "heat-pumps": {
            "validation_loss": {"basics": 2.1, "heat-pumps": 1.5},
            "forgetting": {
                "basics": {"after_own_stage": 2.0, "after_this_stage": 2.1, "delta": 0.1},
                "heat-pumps": {"before_this_stage": 1.9, "after_this_stage": 1.5},
            },
        },
    }
    metrics["basics"]["forgetting"]["basics"]["after_this_stage"] = 2.0
    for stage, m in metrics.items():
        path = out / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, "metrics": m}))
    return out


def test_any_stage_names_get_arms_gains_forgetting_and_honest_retrieval_metrics(
    tmp_path, settings, custom_adapters, index, monkeypatch
):
    monkeypatch.setattr("retriever.embedder.load_embedder", lambda *a, **k: index.embedder)
    cfg = write_config(tmp_path, custom_adapters)
    service = make_service(settings, custom_adapters, index)  # retrieves k=3 passages
    try:
        out = run_evaluation(cfg, out_dir=tmp_path / "report", service=service, limit=3)
    finally:
        service.close()
    results = json.loads((out / "results.json").read_text())
    expected = {"base", "rag", "oracle"} | {f"{m}-{s}" for m in ("lora", "rag+lora") for s in STAGES}
    assert set(results["arms"]) == expected
    assert results["stage_order"] == list(STAGES)

    # --limit caps every set; the unanswered file set is scored as out_of_kb; basics is a general set.
    sets = results["test_sets"]
    assert sets["heat-pumps"]["n"] == 3 and sets["heat-pumps"]["kind"] == "kb"
    assert sets["unanswered"]["kind"] == "out_of_kb" and sets["basics"]["kind"] == "general"
    unanswered = results["arms"]["rag"]["by_test_set"]["unanswered"]
    assert "refusal_rate" in unanswered and "token_f1" not in unanswered
    rag = results["arms"]["rag+lora-heat-pumps"]
    assert {a["test_set"] for a in rag["answers"]} == {"heat-pumps", "out_of_kb", "unanswered"}
    assert {a["test_set"] for a in results["arms"]["lora-basics"]["answers"]} == set(sets)

    # hit@k at the k retrieved (3), never hit@5; the question without gold reads n/a (null), not 0.
    assert {"hit@1", "hit@3", "mrr"} <= set(rag["metrics"]) and "hit@5" not in rag["metrics"]
    nogold = next(a for a in rag["answers"] if a["id"] == "hp-nogold")
    assert nogold["gold"] == []
    assert all(nogold["scores"][m] is None for m in ("hit@1", "hit@3", "mrr", "citation_gold_precision"))
    assert rag["metrics"]["hit@3"]["n"] == 2  # the two FAQ questions with a gold passage
    assert results["arms"]["oracle"]["metrics"]["hit@1"]["mean"] == 1.0  # gold passages as context
    assert {a["id"] for a in results["arms"]["oracle"]["answers"]} == {"bygglov-001", "bygglov-002"}
    assert list(results["retrieval"]) == ["hybrid, k=3"]

    # What each stage buys: each stage over its parent on its own held-out set, closed book and with retrieval.
    gains = {(g["stage"], g["setting"]): g for g in results["stage_gains"]}
    assert set(gains) == {(s, t) for s in STAGES for t in ("closed book", "with retrieval")}
    hp = gains[("heat-pumps", "closed book")]
    assert (hp["a"], hp["b"], hp["parent"], hp["test_set"], hp["n"]) == (
        "lora-heat-pumps",
        "lora-basics",
        "basics",
        "heat-pumps",
        3,
    )
    assert hp["low"] <= hp["diff"] <= hp["high"]
    assert gains[("heat-pumps", "with retrieval")]["b"] == "rag+lora-basics"
    assert gains[("basics", "closed book")]["b"] == "base" and "diff" in gains[("basics", "closed book")]
    assert "note" in gains[("basics", "with retrieval")]  # retrieval arms do not answer general sets

    # Forgetting on answers beside the manifests' loss figure.
    f = results["forgetting"]["basics"]
    assert f["held_out_of"] == "basics" and list(f["after"]) == ["base", "basics", "heat-pumps"]
    assert f["after"]["heat-pumps"]["change_vs"] == "lora-basics"
    assert f["after"]["heat-pumps"]["val_loss"] == 2.1
    assert f["after"]["heat-pumps"]["val_loss_change_pct"] == pytest.approx(5.0)
    assert f["after"]["base"]["val_loss"] == 2.5

    md = (out / "report.md").read_text()
    assert "Answerable: the knowledge-base sets (heat-pumps); unanswerable (the right reply is a hand-over): " in md
    assert "off topic: out_of_kb, unanswered." in md
    assert "## What each stage buys" in md and "## Forgetting on answers: basics" in md and "+5.0%" in md
    assert "**hit@3**: Share of questions with a gold passage among the top 3 retrieved passages" in md
    html = (out / "report.html").read_text()
    for arm in expected:
        assert arm in html
    assert "What each stage buys" in html


def test_no_gold_reads_na_not_zero():
    records = [
        {
            "id": "q",
            "reference": "Yes.",
            "gold": [],
            "answer": "Yes [1].",
            "handoff": False,
            "contexts": ["Yes."],
            "citations": [{"n": 1, "chunk_id": "c1", "source": "s", "text": "Yes."}],
        }
    ]
    score_records(records, "kb", rag=True, embed=None, judge=Judge(embed=None), ks=(1, 3))
    s = records[0]["scores"]
    assert all(math.isnan(s[m]) for m in ("hit@1", "hit@3", "mrr", "citation_gold_precision"))
    assert s["citation_rate"] == 1.0
    arm = {"metrics": __import__("pipeline.metrics").metrics.summarize(records, ["hit@3", "mrr"])}
    md = render_markdown({"run": {"name": "x"}, "arms": {"rag": arm}})
    row = next(line for line in md.splitlines() if line.startswith("| rag |"))
    assert row.count("n/a") == 2 and "0.000" not in row
    records[0]["gold"] = ["c1"]
    score_records(records, "kb", rag=True, embed=None, judge=Judge(embed=None), ks=(1, 3))
    assert records[0]["scores"]["hit@1"] == 1.0 and records[0]["scores"]["citation_gold_precision"] == 1.0


def test_limit_caps_every_set_and_file_sets_without_answers_are_out_of_kb(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "no-adapters", max_questions=50)
    sets = {ts.name: ts for ts in load_test_sets(cfg, limit=1)}
    assert {n: len(ts.rows) for n, ts in sets.items()} == {
        "heat-pumps": 1,
        "basics": 1,
        "out_of_kb": 1,
        "unanswered": 1,
    }
    assert sets["unanswered"].kind == "out_of_kb" and sets["unanswered"].rows[0]["reference"] is None
    assert sets["heat-pumps"].held_out_of == "heat-pumps" and sets["unanswered"].held_out_of is None
    assert len({ts.name: ts for ts in load_test_sets(cfg)}["heat-pumps"].rows) == 4


def test_conversation_rows_are_asked_at_their_last_user_turn():
    row = parse_row(
        {
            "id": "c",
            "question": None,
            "answer": None,
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "My heat pump beeps"},
                {"role": "assistant", "content": "Check the filter."},
            ],
        }
    )
    assert row["question"] == "My heat pump beeps" and row["reference"] == "Check the filter."
    assert row["history"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert parse_row({"question": "Why?"})["id"].startswith("q-")  # stable content hash without an id


def test_arms_needing_missing_artifacts_are_skipped_with_the_command():
    arms, skipped = plan_arms(["base", "rag", "lora", "rag+lora", "oracle"], [], has_index=False)
    assert set(arms) == {"base"}
    assert skipped == {
        "rag": "no index: run `raglora index`",
        "lora": "no trained stage adapters: run `raglora finetune`",
        "rag+lora": "no trained stage adapters: run `raglora finetune`",
        "oracle": "needs the index (the gold passages come from it): run `raglora index`",
    }
    arms, _ = plan_arms(["rag+lora", "oracle"], ["basics", "heat-pumps"], has_index=True)
    assert (
        list(arms) == ["rag+lora-basics", "rag+lora-heat-pumps", "oracle"] and arms["oracle"]["stage"] == "heat-pumps"
    )
    with pytest.raises(RagloraError, match="unknown arm 'rlhf'"):
        plan_arms(["rlhf"], [], has_index=True)


def test_rows_without_a_reference_are_skipped_and_missing_or_empty_sets_are_errors(tmp_path):
    path = tmp_path / "kb-set.jsonl"
    path.write_text('{"id": "x", "question": "q?"}\n{"id": "y", "question": "q2?", "answer": "a"}\n')
    ts = load_test_set(EvalSet(name="kb-set", path=str(path), kind="kb", limit=10))
    assert [q["id"] for q in ts.rows] == ["y"] and "without an answer skipped" in ts.notes[0]
    path.write_text("")
    with pytest.raises(RagloraError, match=r"eval set 'kb-set': .*kb-set.jsonl has no questions: run `raglora data`"):
        load_test_set(EvalSet(name="kb-set", path=str(path), kind="kb", limit=10))
    with pytest.raises(RagloraError, match=r"eval set 'gone': .*gone.jsonl is missing: run `raglora data`"):
        load_test_set(EvalSet(name="gone", path=str(tmp_path / "gone.jsonl"), kind="kb", limit=10))


def test_an_eval_file_may_name_its_columns_like_a_ticket_export(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "Ticket No;Customer wrote;Agent resolution;KB article\nT-1;Boiler at 0.6 bar?;Top it up to 1.2 bar.;boilers.html\n"
    )
    ts = load_test_set(EvalSet(name="mine", path=str(path), kind="kb", limit=10))
    assert ts.kind == "kb" and ts.rows[0]["id"] == "T-1" and ts.rows[0]["question"] == "Boiler at 0.6 bar?"
    assert ts.rows[0]["reference"] == "Top it up to 1.2 bar." and ts.rows[0]["source"] == "boilers.html"


def test_gold_removed_rows_never_see_any_gold_chunk_in_the_prompt(tmp_path, settings, custom_adapters, monkeypatch):
    from helpers import make_index

    # a near-duplicate of bygglov-001's answer under another id: gold by content, so it is removed too
    twin = {**FAQ_ROWS[0], "id": "bygglov-twin", "question": "Extension permit?"}
    index = make_index(tmp_path / "kb", rows=[*FAQ_ROWS, twin])
    monkeypatch.setattr("retriever.embedder.load_embedder", lambda *a, **k: index.embedder)
    near = tmp_path / "near.jsonl"
    near.write_text('{"id": "n-1", "question": "When is the invoice for my kitchen job due?"}\n')
    sets = {
        "heat-pumps": "held_out:heat-pumps",
        "gr": "gold_removed:heat-pumps",
        "near": {"from": str(near), "kind": "near_domain"},
    }
    cfg = write_config(tmp_path, custom_adapters, sets=sets, arms=["base", "rag", "oracle"])
    service = make_service(settings, custom_adapters, index)
    try:
        out = run_evaluation(cfg, out_dir=tmp_path / "report", service=service)
    finally:
        service.close()
    results = json.loads((out / "results.json").read_text())
    chunks = {c.chunk_id: c for c in index.chunks}
    rag = {(a["test_set"], a["id"]): a for a in results["arms"]["rag"]["answers"]}
    removed = [a for (ts, _), a in rag.items() if ts == "gr"]
    assert {a["id"] for a in removed} == {"bygglov-001", "bygglov-002", "altan-001"}  # hp-nogold has no gold
    assert any("gr: 1 of 4 row(s) dropped: no gold passage to remove" in n for n in results["notes"])
    twin_chunk = next(c for c, ch in chunks.items() if ch.source == "bygglov-twin")
    assert twin_chunk in rag[("gr", "bygglov-001")]["gold"] and len(rag[("gr", "bygglov-001")]["gold"]) == 2
    for a in removed:
        assert a["gold"] and a["gold_removed"]
        assert not set(a["gold"]) & {c["chunk_id"] for c in a["citations"]}
        assert all(chunks[g].text not in a["prompt"] for g in a["gold"])
    # the same questions asked normally do retrieve their gold: the removal is what keeps it out
    assert any(
        set(a["gold"]) & {c["chunk_id"] for c in a["citations"]} for (ts, _), a in rag.items() if ts == "heat-pumps"
    )
    # closed-book arms are not asked gold_removed, the oracle only kb; every arm with retrieval is
    assert {a["test_set"] for a in results["arms"]["base"]["answers"]} == {"heat-pumps", "near"}
    assert {a["test_set"] for a in results["arms"]["oracle"]["answers"]} == {"heat-pumps"}
    assert (
        results["test_sets"]["gr"]["kind"] == "gold_removed" and results["test_sets"]["near"]["kind"] == "near_domain"
    )
    m = results["arms"]["rag"]["metrics"]
    assert {"trust_score", "grounded_refusal_f1", "refusal_gold_removed", "refusal_near_domain"} <= set(m)
    assert "refusal_gold_removed" not in results["arms"]["base"]["metrics"]
    assert results["arms"]["base"]["metrics"]["citation_f1"]["mean"] == 0.0  # closed book cannot cite
    assert "gr" not in {g["test_set"] for g in results["stage_gains"] if g.get("test_set")}


def test_default_sets_add_gold_removed_for_stages_that_are_not_general_conversation(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "no-adapters", sets={})
    specs = {s.name: s for s in resolve_eval_sets(cfg)}
    assert specs["gold_removed_heat-pumps"].kind == "gold_removed"
    assert specs["gold_removed_heat-pumps"].stage == "heat-pumps"
    assert "gold_removed_basics" not in specs  # basics trains on packaged general conversation only


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        (
            "near.jsonl",
            '{"id": "n1", "question": "Invoice?"}\n\n{"id": "n2", "question": "  "}\n',
            r"near.jsonl line 3: a near-domain row needs a non-empty text \"question\"",
        ),
        (
            "near.jsonl",
            '{"id": "n1", "question": "Invoice?"}\n{"id": "n2", "question": "Hours?", "answer": "9-17"}\n',
            r"near.jsonl line 2: has an answer, but near-domain questions are ones no document answers",
        ),
        (
            "near.jsonl",
            '{"id": "n1", "question": "Invoice?"}\n{"id": "n1", "question": "Hours?"}\n',
            r"near.jsonl line 2: id 'n1' repeats line 1",
        ),
        ("near.csv", "id,question\nn1,Invoice?\nn2,\n", r"near.csv row 2: a near-domain row needs"),
    ],
)
def test_a_bad_near_domain_row_is_one_error_naming_the_row(tmp_path, name, text, error):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RagloraError, match=error):
        load_test_set(EvalSet(name="near", path=str(path), kind="near_domain", limit=10))


def test_near_domain_rows_are_questions_scored_as_hand_overs(tmp_path):
    path = tmp_path / "near.jsonl"
    path.write_text('{"id": "n1", "question": "Invoice?", "need": "billing", "check": {"top": []}}\n')
    ts = load_test_set(EvalSet(name="near", path=str(path), kind="near_domain", limit=10))
    assert ts.kind == "near_domain" and ts.rows[0]["reference"] is None
