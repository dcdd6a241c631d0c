"""Report rendering from a small synthetic results dict: files, charts, escaping, atomicity."""

import json
import math
import re

import pytest

from pipeline.report import fmt_stats, render_markdown, write_report

XSS = "<script>alert('pwned')</script>"


def stats(mean, width=0.1, n=3):
    return {"mean": mean, "low": mean - width, "high": mean + width, "n": n}


def answers(arm):
    return [
        {
            "id": f"q{i}",
            "question": f"Question {i}?",
            "reference": f"Reference {i}.",
            "answer": XSS if (arm == "rag" and i == 0) else f"{arm} answer {i} [1].",
            "prompt": "p",
            "contexts": ["ctx"],
            "citations": [1],
            "test_set": "domain",
            "scores": {"token_f1": 0.5},
        }
        for i in range(3)
    ]


def make_results():
    arms = {
        name: {
            "metrics": {
                "trust_score": stats(0.2 + 0.1 * i),
                "grounded_refusal_f1": stats(0.5),
                "refusal_off_topic": stats(0.2 * i),
                "false_refusal_rate": stats(0.1),
                "token_f1": stats(0.3 + 0.1 * i),
                "rouge_l": stats(0.2 + 0.1 * i),
                "groundedness": stats(0.5, n=2),
                "citation_precision": {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0},
                "custom_metric": stats(0.4),
            },
            "by_test_set": {"out_of_kb": {"refusal_rate": stats(0.2 * i)}},
            "batch_s_per_answer": 0.5 + i,
            "generated": 3,
            "batch_size": 16,
            "tokens_per_s": 12.5,
            "answers": answers(name),
        }
        for i, name in enumerate(["base", "rag", "rag+lora-domain"])
    }
    arms["lora-subdomain"] = {"skipped": "adapter not trained (no GPU)"}
    return {
        "run": {
            "name": "smoke",
            "created": "2025-01-01T00:00:00Z",
            "git_commit": "abc1234",
            "model": "tiny-model",
            "data_version": "1",
            "config": {"retrieval": {"k": 5}},
        },
        "stage_order": ["general", "domain"],
        "test_sets": {"out_of_kb": {"description": "Questions the FAQ cannot answer.", "n": 3}},
        "arms": arms,
        "comparisons": [{"a": "rag", "b": "base", "metric": "token_f1", "diff": 0.1, "low": 0.02, "high": 0.2}],
        "stages": {
            "general": {"train_loss_curve": [[1, 2.0], [2, 1.5]], "val_loss": 1.6, "trainable_params": 1_000_000},
            "domain": {"train_loss_curve": [[1, 1.8], [2, 1.2]], "val_loss": 1.3, "adapter_bytes": 4096},
        },
        "stage_gains": [
            {
                "stage": "domain",
                "parent": "general",
                "setting": "closed book",
                "a": "lora-domain",
                "b": "lora-general",
                "test_set": "domain",
                "metric": "token_f1",
                "a_mean": 0.4,
                "b_mean": 0.3,
                "diff": 0.1,
                "low": 0.01,
                "high": 0.2,
                "n": 3,
            },
            {
                "stage": "general",
                "parent": "base",
                "setting": "with retrieval",
                "a": "rag+lora-general",
                "b": "rag",
                "test_set": "general",
                "metric": "token_f1",
                "note": "rag+lora-general and rag did not both answer general",
            },
        ],
        "forgetting": {
            "chit-chat": {
                "held_out_of": "general",
                "after": {
                    "base": {"arm": "base", "token_f1": stats(0.4), "val_loss": 2.5},
                    "general": {
                        "arm": "lora-general",
                        "token_f1": stats(0.45),
                        "change": stats(0.05),
                        "change_vs": "base",
                        "val_loss": 2.0,
                    },
                    "domain": {
                        "arm": "lora-domain",
                        "token_f1": stats(0.35),
                        "change": stats(-0.1),
                        "change_vs": "lora-general",
                        "val_loss": 2.03,
                        "val_loss_change_pct": 1.5,
                    },
                },
            }
        },
        "retrieval": {"hybrid, k=3": {"hit@1": stats(0.6), "hit@3": stats(0.9), "mrr": stats(0.7)}},
        "groundedness_calibration": {
            "threshold": 0.55,
            "balanced_accuracy": 0.9,
            "true_positive_rate": 0.88,
            "true_negative_rate": 0.92,
            "n_supported": 100,
            "n_unsupported": 100,
        },
        "notes": ["Synthetic run for tests."],
    }


@pytest.fixture
def results():
    return make_results()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One rendered report shared by the read-only tests (charts take about a second to draw)."""
    out = tmp_path_factory.mktemp("report") / "out"
    return write_report(make_results(), out)


def test_write_report_creates_all_three_files_and_no_temp_files(written):
    paths = written
    assert set(paths) == {"results", "markdown", "html"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert sorted(p.name for p in paths["html"].parent.iterdir()) == ["report.html", "report.md", "results.json"]


def test_results_json_is_strict_json_with_nan_as_null(written):
    text = written["results"].read_text()
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded["arms"]["base"]["metrics"]["citation_precision"]["mean"] is None


def test_html_names_every_arm_and_embeds_one_image_per_chart(results, written):
    page = written["html"].read_text()
    for arm in results["arms"]:
        assert arm in page
    charts = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page)
    prefixes = [
        "Trust score and token F1",
        "Trust by arm",
        "Answer quality",
        "Citations",
        "Grounding",
        "Refusals",
        "Other",
        "Test set out_of_kb",
        "Training loss",
        "What each stage buys",
        "Forgetting",
        "Batch wall time per generated answer",
    ]
    assert len(charts) == len(prefixes) + 1
    assert all(c.startswith(p) for c, p in zip(charts, [*prefixes, "Retrieval"], strict=True))
    assert page.count("<img") == len(charts)
    assert page.count('src="data:image/png;base64,') == len(charts)


def test_html_is_self_contained_and_names_model_data_config_and_commit(written):
    page = written["html"].read_text()
    for fact in ("tiny-model", "abc1234", "data_version", "&quot;k&quot;: 5"):
        assert fact in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page


def test_untrusted_answer_is_escaped_in_html(written):
    page = written["html"].read_text()
    assert XSS not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page.lower()


def test_untrusted_names_and_notes_are_escaped_too(results, tmp_path):
    results["arms"]["<img src=x onerror=alert(1)>"] = {"skipped": XSS}
    results["notes"].append(XSS)
    results["run"]["model"] = "<i>model</i>"
    page = write_report(results, tmp_path)["html"].read_text()
    assert "<img src=x" not in page and "<script" not in page.lower() and "<i>model</i>" not in page
    assert "&lt;i&gt;model&lt;/i&gt;" in page


def test_skipped_arms_are_listed_with_reason_and_not_charted(results, written):
    for text in (written["markdown"].read_text(), written["html"].read_text()):
        assert "lora-subdomain" in text and "adapter not trained (no GPU)" in text
    headline = render_markdown(results).split("## Headline")[1].split("##")[0]
    assert "lora-subdomain" not in headline


def test_markdown_has_headline_ci_cells_test_sets_methodology_and_run_identity(results):
    md = render_markdown(results)
    assert "| rag | 3 | 0.300 [0.200, 0.400] |" in md  # first metric column of the wide table is trust_score
    assert "0.500 [0.400, 0.600] (n=2)" in md  # groundedness measured on fewer questions than the arm answered
    assert "## Test set: out_of_kb" in md and "Questions the FAQ cannot answer." in md
    assert "## Methodology" in md and "balanced accuracy" in md and "bootstrap" in md
    for fact in ("tiny-model", "abc1234", "**data_version**: 1", '"k": 5'):
        assert fact in md
    assert "n/a" in md  # citation precision never measured


def test_markdown_escapes_pipes_in_table_cells(results):
    results["arms"]["a|b"] = results["arms"].pop("rag")
    assert "| a\\|b |" in render_markdown(results)


def test_report_from_minimal_results_has_no_charts_but_renders(tmp_path):
    minimal = {"run": {"name": "empty"}, "arms": {"base": {"skipped": "no model"}}}
    paths = write_report(minimal, tmp_path)
    page = paths["html"].read_text()
    assert "<img" not in page and "no model" in page


def test_failed_render_leaves_previous_report_untouched_and_no_temp_files(results, tmp_path):
    paths = write_report(results, tmp_path)
    before = {p: p.read_bytes() for p in paths.values()}
    results["stages"]["general"]["train_loss_curve"] = [["not a step", "nor a loss"]]
    with pytest.raises(ValueError):
        write_report(results, tmp_path)
    assert {p: p.read_bytes() for p in paths.values()} == before
    assert len(list(tmp_path.iterdir())) == 3


def test_rewriting_a_report_replaces_files_in_place(results, tmp_path):
    write_report(results, tmp_path)
    results["run"]["git_commit"] = "def5678"
    paths = write_report(results, tmp_path)
    assert "def5678" in paths["markdown"].read_text()
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize(
    ("value", "text"),
    [({"mean": 0.5, "low": 0.4, "high": 0.6}, "0.500 [0.400, 0.600]"), ({"mean": None}, "n/a"), (0.25, "0.250")],
)
def test_fmt_stats(value, text):
    assert fmt_stats(value) == text


def test_stage_gains_and_forgetting_on_answers_sit_beside_the_loss_figure(results):
    md = render_markdown(results)
    gains = md.split("## What each stage buys (paired, 95% CI)")[1].split("\n## ")[0]
    assert (
        "| domain | general | closed book | domain | lora-domain | lora-general | token_f1 | 0.400 | 0.300 |" in gains
    )
    assert "0.100 [0.010, 0.200] | 3 |" in gains
    assert "n/a (rag+lora-general and rag did not both answer general)" in gains
    forgetting = md.split("## Forgetting on answers: chit-chat")[1].split("\n## ")[0]
    assert "validation loss on general" in forgetting
    assert (
        "| domain | lora-domain | 0.350 [0.250, 0.450] | -0.100 [-0.200, 0.000] (vs lora-general) | 2.030 | +1.5% |"
        in (forgetting)
    )
    assert "| base | base | 0.400 [0.300, 0.500] |  | 2.500 | n/a |" in forgetting


def test_hit_at_k_is_defined_for_the_k_retrieved(results):
    md = render_markdown(results)
    assert "**hit@3**: Share of questions with a gold passage among the top 3 retrieved passages" in md
    assert "hit@5" not in md


def test_report_reads_like_a_verdict_then_headline_then_detail_with_examples_last(written):
    page = written["html"].read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[:2] == ["Verdict", "Headline (95% CI)"]
    assert headings[-1] == "Example answers"
    assert headings.index("All metrics by arm (95% CI)") < headings.index("Charts") < headings.index("Methodology")
    # the headline chart sits in the headline section, before its table; the table leads with the trust score
    headline = page.split("<h2>Headline (95% CI)</h2>")[1].split("</section>")[0]
    assert headline.index('alt="Trust score and token F1 by arm (95% CI)"') < headline.index("<table>")
    assert re.search(r"<thead><tr><th>arm</th><th>trust score</th><th>grounded-refusal F1</th>", headline)


def test_verdict_sentences_come_from_the_numbers_with_their_intervals(results):
    results["comparisons"].append(
        {"a": "rag+lora-domain", "b": "lora-domain", "metric": "token_f1", "diff": -0.05, "low": -0.1, "high": 0.02}
    )
    md = render_markdown(results)
    said = md.split("## Verdict")[1].split("\n## ")[0]
    assert "rag vs base" in said and "+0.100 [+0.020, +0.200], a gain" in said
    assert "with the domain adapter -0.050 [-0.100, +0.020], no clear difference (the interval includes 0)" in said
    assert "domain over general: closed book +0.100 [+0.010, +0.200], a gain" in said
    # the served arm (deepest rag+lora) and its hand-over rates, each with its CI
    assert "rag+lora-domain (the model as served) hands over on 0.400 [0.300, 0.500] of off-topic questions" in said
    assert "wrongly on 0.100 [0.000, 0.200] of answerable ones" in said
    assert "highest for rag+lora-domain, 0.400 [0.300, 0.500]" in said
    served = results["arms"]["rag+lora-domain"]["metrics"]
    served.update(
        refusal_gold_removed=stats(0.8), refusal_near_domain=stats(0.6), refusal_in_domain_unanswerable=stats(0.7)
    )
    said = render_markdown(results).split("## Verdict")[1].split("\n## ")[0]
    assert "hands over on 0.800 [0.700, 0.900] of gold-removed questions, 0.600 [0.500, 0.700] of near-domain" in said
    assert "(gold-removed and near-domain together: 0.700 [0.600, 0.800])" in said
    results["arms"]["rag+lora-domain"]["metrics"]["trust_score"] = stats(0.9)
    assert "highest for rag+lora-domain, 0.900 [0.800, 1.000]" in render_markdown(results)


def test_examples_show_hand_overs_and_unasked_sets_side_by_side(results, tmp_path):
    results["test_sets"]["near"] = {"kind": "near_domain", "n": 1, "description": "d"}
    results["arms"]["rag"]["answers"].append(
        {
            "id": "n1",
            "question": "When is my invoice due?",
            "reference": None,
            "answer": "I'm handing you over to a colleague.",
            "handoff": True,
            "handoff_reason": "the answerability gate found no answer",
            "test_set": "near",
            "scores": {"refusal_rate": 1.0},
        }
    )
    page = write_report(results, tmp_path)["html"].read_text()
    examples = page.split("<h2>Example answers</h2>")[1]
    row = examples.split("When is my invoice due?")[1].split("</tr>")[0]
    assert "HAND-OVER" in row and "the answerability gate found no answer" in row
    assert row.count("not asked") == 2  # base and rag+lora-domain were not asked this set
    assert "none: the right reply is a hand-over" in row


def test_time_per_answer_says_it_is_batch_wall_time_not_latency(results):
    results["generation_speedup"] = {"questions": 8, "speedup": 3.1, "seconds_per_answer_alone": 0.42}
    section = render_markdown(results).split("## Generation time")[1].split("\n## ")[0]
    assert "batch wall time per answer (s)" in section and "not observable" in section
    assert "the base model took **0.420 s per answer**" in section
    assert "latency s" not in render_markdown(results)
