"""Render an evaluation run as results.json, report.md and a self-contained report.html.

`write_report(results, out_dir)` takes the dict the harness (`pipeline.evaluate`) builds. Every key is
optional except `run` and `arms`; a stats dict is `{"mean", "low", "high", "n"}` (a 95% bootstrap CI from
`pipeline.metrics.summarize`), and nan / None mean "not measured".

    {
      "run": {"name", "created", "git_commit", "model", "data_version", "config": {...resolved config...}},
      "bootstrap": {"n_resamples": 1000, "confidence": 0.95, "seed": 0},
      "headline": {"kb_sets": [set], "out_of_kb_sets": [set], "served_arm": arm,   # what the headline pools
                   "unanswerable_sets": {kind: [set]}},
      "test_sets": {set_name: {"description": str, "kind": "kb"|"gold_removed"|"near_domain"|"out_of_kb"|"general",
                               "held_out_of": stage|None, "n": int}},
      "arms": {
        arm_name: {                                                     # base, rag, lora-<stage>, rag+lora-<stage>, oracle
          "description": str,
          "metrics": {metric: stats},                   # trust_score, grounded_refusal_f1, token_f1, citation_*, ...
          "by_test_set": {set_name: {metric: stats}},
          "batch_s_per_answer": float, "generated": int, "batch_size": int,   # batched generation wall time / answers
          "tokens_per_s": float,
          "answers": [{"id", "question", "reference", "answer" (as shown), "raw_answer", "handoff", "handoff_reason",
                       "prompt", "contexts": [str], "citations": [...], "shown_citations": [...], "test_set": str,
                       "scores": {metric: float}}],
        },
        skipped_arm: {"skipped": "reason"},                             # listed, never charted
      },
      "comparisons": [{"a": arm, "b": arm, "metric": str, "diff", "low", "high", "n"}],   # paired bootstrap a - b
      "stage_gains": [{"stage", "parent", "setting": "closed book"|"with retrieval", "a", "b", "test_set", "metric",
                       "a_mean", "b_mean", "diff", "low", "high", "n"} | {..., "note": why not measured}],
      "citation_policy_tradeoff": {"arm", "configured", "rows": [{"policy", "answerable", "gold_removed", ...}]},
      "stages": {stage: {"train_loss_curve": [[step, loss], ...], "val_loss", "trainable_params", "trainable_ratio",
                         "adapter_bytes", "train_seconds", "peak_memory_bytes"}},
      "forgetting": {general_set: {"held_out_of": stage|None, "after": {after_stage: {   # "base" = before any stage
                        "token_f1": stats, "change": stats (paired, vs "change_vs" arm), "val_loss": float,
                        "val_loss_change_pct": float}}}},                # val_loss: from the stage manifests
      "retrieval": {setup_name: {"hit@1": stats, "hit@<k>": stats, "mrr": stats}},   # k = passages retrieved
      "groundedness_calibration": {...pipeline.metrics.calibrate_judge(...)},
      "generation_speedup": {"questions", "one_at_a_time_s", "batched_s", "seconds_per_answer_alone", ...},
      "notes": [str],
    }

The report reads top-down like a verdict: a few sentences generated from these numbers (what retrieval buys,
what each stage buys, whether the bot hands over when it should, how often it cites, each with its CI), the
headline chart and a compact table led by the trust score, then the wide tables, per-set detail and the other
charts, the methodology, and example answers side by side at the end.

Answers are untrusted model output, so the HTML escapes every value it shows. Charts use matplotlib's Agg
canvas through the object API (no pyplot global state) and are embedded as base64 PNG: the HTML has no
external assets. Each file is written to a temp file and renamed, so a reader never sees a partial report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.metrics import metric_definition
from raglora.files import atomic_write_text

# Headline metric groups, one chart each; metrics outside every group are charted together as "Other".
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "Trust": ("trust_score", "grounded_refusal_f1", "citation_f1", "model_citation_f1"),
    "Answer quality": ("token_f1", "rouge_l", "semantic_similarity"),
    "Citations": (
        "citation_rate",
        "citation_precision",
        "citation_recall",
        "model_citation_rate",
        "model_citation_precision",
        "model_citation_recall",
        "citation_gold_precision",
    ),
    "Grounding": ("groundedness",),
    "Refusals": (
        "refusal_gold_removed",
        "refusal_near_domain",
        "refusal_in_domain_unanswerable",
        "refusal_off_topic",
        "refusal_rate",
        "false_refusal_rate",
    ),
}
# The compact headline table: the trust score first, then its parts and the hand-over rates.
HEADLINE: dict[str, str] = {
    "trust_score": "trust score",
    "grounded_refusal_f1": "grounded-refusal F1",
    "token_f1": "token F1 (answered)",
    "citation_f1": "citation F1",
    "refusal_gold_removed": "hands over: gold removed",
    "refusal_near_domain": "hands over: near domain",
    "refusal_off_topic": "hands over: off topic",
    "false_refusal_rate": "hands over: answerable (false)",
}
KIND_LABELS = {
    "kb": "answerable",
    "gold_removed": "gold removed",
    "near_domain": "near domain",
    "out_of_kb": "off topic",
    "general": "general",
}
STAGE_KEYS = ("val_loss", "trainable_params", "trainable_ratio", "adapter_bytes", "train_seconds", "peak_memory_bytes")
MAX_EXAMPLES = 5
_STATS = ("mean", "low", "high")


# ------------------------------------------------------------------------------------------------ formatting


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def fmt_stats(s: dict | float | None) -> str:
    """'mean [low, high]' with 3 decimals; 'n/a' when not measured (a plain number prints as itself)."""
    if not isinstance(s, dict):
        return "n/a" if math.isnan(_num(s)) else f"{_num(s):.3f}"
    mean, low, high = (_num(s.get(k)) for k in _STATS)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _jsonable(x):
    """nan/inf -> None, numpy scalars and Paths -> plain values, so results.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalar or array
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def _live_arms(results: dict) -> dict[str, dict]:
    return {name: arm for name, arm in results.get("arms", {}).items() if not arm.get("skipped")}


def _skipped_arms(results: dict) -> dict[str, str]:
    return {name: str(arm["skipped"]) for name, arm in results.get("arms", {}).items() if arm.get("skipped")}


def _metric_order(tables: list[dict]) -> list[str]:
    """Metrics present in any table: grouped ones in group order first, then the rest alphabetically."""
    present = {m for t in tables for m in t}
    grouped = [m for ms in METRIC_GROUPS.values() for m in ms if m in present]
    return grouped + sorted(present - set(grouped))


def _table_rows(by_row: dict[str, dict], first: str = "arm") -> tuple[list[str], list[list[str]]]:
    """Header and rows of 'mean [low, high]' cells; a cell whose n differs from the row's largest n says so."""
    metrics = _metric_order(list(by_row.values()))
    rows = []
    for name, stats in by_row.items():
        n_row = max((int(_num(s.get("n")) or 0) for s in stats.values() if isinstance(s, dict)), default=0)
        cells = []
        for m in metrics:
            s = stats.get(m)
            n = s.get("n") if isinstance(s, dict) else None
            text = fmt_stats(s)
            cells.append(text + (f" (n={n})" if n is not None and n != n_row and text != "n/a" else ""))
        rows.append([name, str(n_row or ""), *cells])
    return [first, "n", *metrics], rows


# ---------------------------------------------------------------------------------------------------- charts


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bars_with_ci(series: dict[str, dict[str, dict]], title: str, ylabel: str) -> str:
    """Grouped bars (x = categories such as arms or stages, one bar per series) with CI error bars, as PNG base64."""
    categories = list(dict.fromkeys(c for s in series.values() for c in s))
    fig = Figure(figsize=(max(6.0, 0.9 * len(categories) * max(1, len(series)) ** 0.5 + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (label, by_cat) in enumerate(series.items()):
        xs, means, errs = [], [], [[], []]
        for j, cat in enumerate(categories):
            s = by_cat.get(cat)
            stats = s if isinstance(s, dict) else {"mean": s}
            mean, low, high = (_num(stats.get(k)) for k in _STATS)
            if math.isnan(mean):
                continue
            xs.append(j + (i - (len(series) - 1) / 2) * width)
            means.append(mean)
            errs[0].append(0.0 if math.isnan(low) else max(0.0, mean - low))
            errs[1].append(0.0 if math.isnan(high) else max(0.0, high - mean))
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _png(fig)


def loss_curves(stages: dict[str, dict]) -> str:
    """Training loss per step, one line per stage; validation loss as a marker at the stage's last step."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for stage, info in stages.items():
        curve = [(float(s), float(v)) for s, v in info.get("train_loss_curve") or []]
        if curve:
            (line,) = ax.plot(*zip(*curve, strict=True), label=f"{stage} train")
            if not math.isnan(_num(info.get("val_loss"))):
                ax.plot([curve[-1][0]], [_num(info["val_loss"])], "o", color=line.get_color(), label=f"{stage} val")
    ax.set_title("Training loss by stage")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return _png(fig)


def _transpose(tables: dict[str, dict], metrics: list[str] | tuple[str, ...]) -> dict[str, dict]:
    """{row: {metric: stats}} -> {metric: {row: stats}} for the metrics present, the shape bars_with_ci takes."""
    return {m: {r: t[m] for r, t in tables.items() if m in t} for m in metrics if any(m in t for t in tables.values())}


def _by_test_set(results: dict) -> dict[str, dict[str, dict]]:
    """{test_set: {arm: {metric: stats}}} over the arms that ran, in the order of `test_sets` (the config's)."""
    out: dict[str, dict[str, dict]] = {ts: {} for ts in results.get("test_sets", {})}
    for arm, x in _live_arms(results).items():
        for ts, metrics in x.get("by_test_set", {}).items():
            out.setdefault(ts, {})[arm] = metrics
    return {ts: arms for ts, arms in out.items() if arms}


HEADLINE_CHART = "Trust score and token F1 by arm (95% CI)"


def make_charts(results: dict) -> dict[str, str]:
    """{chart title: base64 PNG} for every chart the data supports; the headline chart first."""
    arms, charts = _live_arms(results), {}
    headline = {a: x.get("metrics", {}) for a, x in arms.items()}
    lead = {
        label: {a: m[k] for a, m in headline.items() if k in m}
        for k, label in (("trust_score", "trust score"), ("token_f1", "token F1 (answered)"))
    }
    if lead := {label: series for label, series in lead.items() if series}:
        charts[HEADLINE_CHART] = bars_with_ci(lead, HEADLINE_CHART, "score")
    grouped = {m for ms in METRIC_GROUPS.values() for m in ms}
    other = tuple(m for m in _metric_order(list(headline.values())) if m not in grouped)
    for group, metrics in {**METRIC_GROUPS, "Other metrics": other}.items():
        if series := _transpose(headline, metrics):
            charts[f"{group} by arm (95% CI)"] = bars_with_ci(series, f"{group} by arm (95% CI)", "score")
    for ts, tables in _by_test_set(results).items():
        title = f"Test set {ts} by arm (95% CI)"
        charts[title] = bars_with_ci(_transpose(tables, _metric_order(list(tables.values()))), title, "score")
    if stages := {s: i for s, i in results.get("stages", {}).items() if i.get("train_loss_curve")}:
        charts["Training loss by stage"] = loss_curves(stages)
    if gains := _gain_series(results):
        title = "What each stage buys: token F1 gain over its parent (paired, 95% CI)"
        charts[title] = bars_with_ci(gains, title, "gain")
    if forgetting := _forgetting_series(results):
        title = "Forgetting: token F1 on general sets after each stage (95% CI)"
        charts[title] = bars_with_ci(forgetting, title, "token F1")
    per_answer = {
        a: x["batch_s_per_answer"] for a, x in arms.items() if not math.isnan(_num(x.get("batch_s_per_answer")))
    }
    if per_answer:
        title = "Batch wall time per generated answer (not one answer's latency)"
        charts[title] = bars_with_ci({"seconds": per_answer}, title, "seconds")
    if retrieval := results.get("retrieval"):
        charts["Retrieval quality"] = bars_with_ci(retrieval, "Retrieval hit@k and MRR (95% CI)", "score")
    return charts


# -------------------------------------------------------------------------------------------------- sections
# The report is built once as a list of (heading, blocks); markdown and HTML are two thin renderers over it.
# A block is ("p", text) | ("list", [text]) | ("table", header, rows) | ("code", text); text may use **bold**
# and `code`, which the HTML renderer converts after escaping.


def _methodology(results: dict) -> list[tuple]:
    """Metric definitions, groundedness method and calibration, bootstrap settings."""
    tables = [a.get("metrics", {}) for a in _live_arms(results).values()] + list(results.get("retrieval", {}).values())
    tables += [t for ts in _by_test_set(results).values() for t in ts.values()]
    used = _metric_order(tables)
    defined = [(m, metric_definition(m)) for m in used]
    blocks: list[tuple] = [("list", [f"**{m}**: {d}" for m, d in defined if d])]
    cal = results.get("groundedness_calibration") or {}
    judge = results.get("judge") or {}
    if cal.get("n_supported"):
        used = _num(judge.get("threshold", cal.get("threshold_used", cal.get("threshold"))))
        text = (
            "The **judge** (groundedness, citation precision and recall, and serving's citation check), threshold "
            f"**{used:.3f}**: {cal.get('method', '')}; balanced accuracy {_num(cal.get('balanced_accuracy')):.3f} "
            f"(TPR {_num(cal.get('true_positive_rate')):.3f}, TNR {_num(cal.get('true_negative_rate')):.3f}; mean "
            f"similarity {_num(cal.get('supported_score_mean')):.3f} supported vs "
            f"{_num(cal.get('unsupported_score_mean')):.3f} unsupported). On the same pairs the n-gram rule alone "
            f"scores {_num(cal.get('ngram_balanced_accuracy')):.3f} and the OR of both "
            f"{_num(cal.get('either_balanced_accuracy')):.3f}."
        )
    else:
        text = (
            f"The judge's threshold ({_num(judge.get('threshold', 0.6)):.3f}) was not calibrated in this run; the "
            "default was used."
        )
    b = {"n_resamples": 1000, "confidence": 0.95, "seed": 0, **results.get("bootstrap", {})}
    ci = (
        f"Every `mean [low, high]` is a percentile bootstrap over questions ({b['n_resamples']} resamples, "
        f"{b['confidence']:.0%} confidence, seed {b['seed']}). Questions where a metric does not apply (nan, e.g. "
        "citation precision of an answer without citations) are left out, and `(n=k)` marks a metric measured on "
        "fewer questions than the row's largest n. Paired differences resample the same questions for both arms."
    )
    trust = (
        "**Trust score** (Trust-Score, Song et al., ICLR 2025): the mean of grounded-refusal F1 over the answerable "
        "and unanswerable questions an arm was asked, answer correctness (token F1 on the answerable questions it "
        "answered) and citation F1. An answer is a hand-over when serving handed over before generating (the "
        "answerability gate or the relevance threshold), when the citation policy handed over after verification, "
        "or when the text reads as a refusal or contains the project's hand-over reply. Closed-book arms are not "
        "asked gold-removed questions (there is no retrieval to remove the gold from), so their grounded-refusal F1 "
        "pools fewer kinds; the oracle is asked answerable questions only, so it has no trust score. **Closed-book "
        "arms cannot cite** (no passage in the prompt): their citation recall is 0 and their citation F1 is 0, the "
        "honest Trust-Score reading, which caps their trust score at 2/3."
    )
    shown = (
        "**Shown vs model citations.** Retrieval arms are scored on what serving shows: the answer after "
        "`AnswerService.verify` rewrote its markers to the passages the judge says support each sentence (and "
        "applied the citation policy). Because the same judge attributes those citations and then scores them, the "
        "shown citation precision is high by construction: it measures what a customer sees, not the model. The "
        "`model_citation_*` metrics score the model's own raw markers with the same judge, before verification: "
        "that is the model's citing skill."
    )
    return [*blocks, ("p", text), ("p", trust), ("p", shown), ("p", ci)]


def _served_arm(results: dict) -> str | None:
    """The arm that stands for the bot as served: named by the harness, else the deepest rag+lora, else rag."""
    arms = _live_arms(results)
    named = (results.get("headline") or {}).get("served_arm")
    if named in arms:
        return named
    stages = results.get("stage_order") or []
    for candidate in [*(f"rag+lora-{s}" for s in reversed(stages)), "rag"]:
        if candidate in arms:
            return candidate
    return next(iter(arms), None)


def _signed(d: dict) -> str:
    """'+0.050 [-0.020, +0.120]' of a paired difference, and what it says."""
    diff, low, high = _num(d.get("diff")), _num(d.get("low")), _num(d.get("high"))
    verdict = "a gain" if low > 0 else "a loss" if high < 0 else "no clear difference (the interval includes 0)"
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}], {verdict}"


def verdict(results: dict) -> list[str]:
    """The report's opening sentences, generated from the numbers (each with its 95% CI); one per question the
    report answers, saying 'not measured' rather than leaving a question out."""
    arms = _live_arms(results)
    out = []
    comps = {(c["a"], c["b"]): c for c in results.get("comparisons") or [] if "diff" in c}
    plain = comps.get(("rag", "base"))
    tuned = [c for (a, b), c in comps.items() if a.startswith("rag+lora-") and b == a.removeprefix("rag+")]
    if plain or tuned:
        parts = []
        if plain:
            parts.append(f"for the base model {_signed(plain)} (rag vs base, n={plain.get('n')})")
        for c in tuned:
            parts.append(f"with the {c['a'].removeprefix('rag+lora-')} adapter {_signed(c)} ({c['a']} vs {c['b']})")
        out.append(
            "**What retrieval buys.** Token F1 on the answerable questions both arms answered changes "
            + "; ".join(parts)
            + "."
        )
    else:
        out.append("**What retrieval buys.** Not measured: the arms with and without retrieval did not both run.")
    by_stage: dict[str, list[str]] = {}
    for g in results.get("stage_gains") or []:
        if "diff" in g:
            by_stage.setdefault(f"{g['stage']} over {g['parent']}", []).append(f"{g['setting']} {_signed(g)}")
    if by_stage:
        out.append(
            "**What each stage buys** (token F1 on its own held-out questions, paired): "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_stage.items())
            + "."
        )
    elif results.get("stage_gains") is not None:
        out.append("**What each stage buys.** Not measured: no stage and its parent answered the stage's own set.")
    served = _served_arm(results)
    m = arms.get(served, {}).get("metrics", {}) if served else {}
    rates = [
        f"{fmt_stats(m[k])} of {label} questions"
        for k, label in (
            ("refusal_gold_removed", "gold-removed"),
            ("refusal_near_domain", "near-domain"),
            ("refusal_off_topic", "off-topic"),
        )
        if k in m
    ]
    if rates or "false_refusal_rate" in m:
        text = f"**Does the bot hand over when it should?** {served} (the model as served) hands over on " + (
            ", ".join(rates) or "no unanswerable set"
        )
        if "refusal_gold_removed" in m and "refusal_near_domain" in m:
            text += f" (gold-removed and near-domain together: {fmt_stats(m.get('refusal_in_domain_unanswerable'))})"
        if "false_refusal_rate" in m:
            text += f", and wrongly on {fmt_stats(m['false_refusal_rate'])} of answerable ones"
        if "grounded_refusal_f1" in m:
            text += f"; grounded-refusal F1 {fmt_stats(m['grounded_refusal_f1'])}"
        out.append(text + ".")
    if "citation_rate" in m:
        text = (
            f"**How often does it cite?** {served} cites a prompt passage in {fmt_stats(m['citation_rate'])} of its "
            f"answers to answerable questions, as shown after verification: citation precision "
            f"{fmt_stats(m.get('citation_precision'))}, recall {fmt_stats(m.get('citation_recall'))}, F1 "
            f"{fmt_stats(m.get('citation_f1'))} (the judge that attributes the shown citations also scores them)"
        )
        if "model_citation_rate" in m:
            text += (
                f". The model's own markers: rate {fmt_stats(m['model_citation_rate'])}, precision "
                f"{fmt_stats(m.get('model_citation_precision'))}, recall {fmt_stats(m.get('model_citation_recall'))}"
            )
        out.append(text + ".")
    trust = {a: x["metrics"]["trust_score"] for a, x in arms.items() if "trust_score" in x.get("metrics", {})}
    trust = {a: t for a, t in trust.items() if not math.isnan(_num(t.get("mean")))}
    if trust:
        best = max(trust, key=lambda a: _num(trust[a]["mean"]))
        text = f"**Trust score** (mean of grounded-refusal F1, token F1 and citation F1): highest for {best}, "
        text += fmt_stats(trust[best])
        if served in trust and served != best:
            text += f"; {served} {fmt_stats(trust[served])}"
        out.append(text + ".")
    return out


def _headline_table(arms: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """arm | trust score | its parts | hand-over rates: the compact table the report leads with."""
    present = [k for k in HEADLINE if any(k in x.get("metrics", {}) for x in arms.values())]
    rows = [[a, *(fmt_stats(x.get("metrics", {}).get(k)) for k in present)] for a, x in arms.items()]
    return ["arm", *(HEADLINE[k] for k in present)], rows


def build_sections(results: dict) -> list[tuple[str, list[tuple]]]:
    """Every report section in reading order: the verdict, the headline chart and table, the detail, the method,
    the examples. Blocks: ("p", text) | ("list", [text]) | ("table", header, rows) | ("code", text) |
    ("chart", title) (HTML only) | ("examples",) (HTML only)."""
    run, arms = results.get("run", {}), _live_arms(results)
    sections: list[tuple[str, list[tuple]]] = []
    if said := verdict(results):
        sections.append(("Verdict", [("p", line) for line in said]))
    header = [f"**{k}**: {run.get(k, 'unknown')}" for k in ("created", "model", "data_version", "git_commit")]
    described = [f"**{a}**: {x['description']}" for a, x in arms.items() if x.get("description")]
    pooled = results.get("headline") or {}
    scope = []
    if pooled:
        kb = ", ".join(pooled.get("kb_sets") or []) or "none"
        unanswerable = pooled.get("unanswerable_sets") or {"out_of_kb": pooled.get("out_of_kb_sets") or []}
        hard = "; ".join(f"{KIND_LABELS.get(k, k)}: {', '.join(v)}" for k, v in unanswerable.items() if v)
        scope = [
            (
                "p",
                f"Answerable: the knowledge-base sets ({kb}); unanswerable (the right reply is a hand-over): "
                f"{hard or 'none'}. The trust score and grounded-refusal F1 pool both; token F1 and citations are "
                "measured on the answerable questions each arm answered.",
            )
        ]
    if arms:
        columns, rows = _headline_table(arms)
        blocks = [*scope, ("chart", HEADLINE_CHART), *([("table", columns, rows)] if len(columns) > 1 else [])]
        sections.append(("Headline (95% CI)", [*blocks, ("list", described)] if described else blocks))
    sections.append(("Run", [("list", header)]))
    if skipped := _skipped_arms(results):
        sections.append(("Skipped arms", [("list", [f"**{a}**: {why}" for a, why in skipped.items()])]))
    if arms:
        wide = _table_rows({a: x.get("metrics", {}) for a, x in arms.items()})
        sections.append(("All metrics by arm (95% CI)", [("table", *wide)]))
    for ts, tables in _by_test_set(results).items():
        info = results.get("test_sets", {}).get(ts, {})
        desc = info.get("description")
        kind = f" ({KIND_LABELS.get(info['kind'], info['kind'])})" if info.get("kind") else ""
        sections.append((f"Test set: {ts}{kind}", [*([("p", desc)] if desc else []), ("table", *_table_rows(tables))]))
    if comps := results.get("comparisons"):
        rows = [[c["a"], c["b"], c["metric"], fmt_stats({**c, "mean": c.get("diff")})] for c in comps]
        sections.append(("Paired differences (a - b, 95% CI)", [("table", ["a", "b", "metric", "a - b"], rows)]))
    if gains := results.get("stage_gains"):
        sections.append(("What each stage buys (paired, 95% CI)", _gain_blocks(gains)))
    if (policy := results.get("citation_policy_tradeoff")) and policy.get("rows"):
        sections.append(("Hand-over trade-off of the citation policy", _policy_blocks(policy)))
    for name, f in (results.get("forgetting") or {}).items():
        sections.append((f"Forgetting on answers: {name}", _forgetting_blocks(name, f)))
    if stages := results.get("stages"):
        rows = [[s, *(_fmt_plain(i.get(k)) for k in STAGE_KEYS)] for s, i in stages.items()]
        sections.append(("Training stages", [("table", ["stage", *STAGE_KEYS], rows)]))
    if retrieval := results.get("retrieval"):
        sections.append(("Retrieval", [("table", *_table_rows(retrieval, first="retriever"))]))
    if perf := {a: x for a, x in arms.items() if "batch_s_per_answer" in x or x.get("tokens_per_s")}:
        sections.append(("Generation time", _time_blocks(results, perf)))
    sections.append(("Charts", [("chart", None)]))
    if notes := results.get("notes"):
        sections.append(("Notes", [("list", [str(n) for n in notes])]))
    sections.append(("Methodology", _methodology(results)))
    config = json.dumps(_jsonable(run.get("config", {})), indent=2, sort_keys=True, ensure_ascii=False)
    sections.append(("Configuration", [("code", config)]))
    if arms:
        sections.append(("Example answers", [("examples",)]))
    return sections


def _policy_blocks(policy: dict) -> list[tuple]:
    cols = [c for c in ("answerable", "gold_removed", "near_domain", "gold_removed+near_domain", "out_of_kb")
            if any(c in r for r in policy["rows"])]  # fmt: skip
    labels = {"answerable": "answerable (false hand-over)", "out_of_kb": "off topic"}
    rows = [[r["policy"], *(_fmt_plain(r.get(c)) for c in cols)] for r in policy["rows"]]
    text = (
        f"Hand-over rate of {policy['arm']} per kind of question if `serve.citations` were set otherwise, from the "
        "same answers (configured: " + policy["configured"] + "). Hand-overs before generation (the gate, a request "
        "for a person) and answers the model wrote as a hand-over count under every setting."
    )
    return [("p", text), ("table", ["policy", *(labels.get(c, c) for c in cols)], rows)]


def _time_blocks(results: dict, perf: dict[str, dict]) -> list[tuple]:
    rows = [
        [
            a,
            _fmt_plain(x.get("batch_s_per_answer")),
            _fmt_plain(x.get("generated")),
            _fmt_plain(x.get("batch_size")),
            _fmt_plain(x.get("tokens_per_s")),
        ]
        for a, x in perf.items()
    ]
    text = (
        "Answers are generated in batches (up to the batch size, prompts sorted by length), so one answer's own "
        "latency is not observable in this run: **batch wall time per answer** is the wall time of an arm's batched "
        "generation divided by the answers it generated (hand-overs decided before generation are not counted)."
    )
    speed = results.get("generation_speedup") or {}
    if not math.isnan(_num(speed.get("seconds_per_answer_alone"))):
        text += (
            f" Asked one at a time, the base model took **{_num(speed['seconds_per_answer_alone']):.3f} s per answer** "
            f"({speed.get('questions')} questions; batched: x{speed.get('speedup')} faster in total)."
        )
    header = ["arm", "batch wall time per answer (s)", "answers generated", "batch size", "tokens/s (batched)"]
    return [("p", text), ("table", header, rows)]


def _gain_blocks(gains: list[dict]) -> list[tuple]:
    header = ["stage", "over", "setting", "test set", "a", "b", "metric", "a mean", "b mean", "gain a - b", "n"]
    rows = []
    for g in gains:
        if "diff" in g:
            cells = [fmt_stats(g.get("a_mean")), fmt_stats(g.get("b_mean")), fmt_stats({**g, "mean": g.get("diff")})]
            cells.append(str(g.get("n", "")))
        else:
            cells = ["n/a", "n/a", f"n/a ({g.get('note', 'not measured')})", ""]
        rows.append(
            [g["stage"], g["parent"], g["setting"], g.get("test_set") or "", g["a"], g["b"], g["metric"], *cells]
        )
    text = (
        "Each stage against the model it was trained on top of (its parent; the first stage's is the base model), "
        "on the stage's own held-out questions: closed book (lora-<stage> vs lora-<parent>, or base) and with "
        "retrieval (rag+lora-<stage> vs rag+lora-<parent>, or rag). The interval is a paired bootstrap over the "
        "same questions; one that includes 0 means the stage bought nothing measurable."
    )
    return [("p", text), ("table", header, rows)]


def _forgetting_blocks(name: str, f: dict) -> list[tuple]:
    g = f.get("held_out_of")
    loss_of = f"validation loss on {g}" if g else "validation loss"
    header = ["after stage", "arm", "token_f1", "change vs parent arm", loss_of, "loss change since own stage"]
    rows = []
    for after, r in (f.get("after") or {}).items():
        change = fmt_stats(r.get("change")) + (f" (vs {r['change_vs']})" if r.get("change_vs") else "")
        pct = _num(r.get("val_loss_change_pct"))
        rows.append(
            [
                after,
                r.get("arm", ""),
                fmt_stats(r.get("token_f1")),
                change if r.get("change") else "",
                fmt_stats(r.get("val_loss")),
                "n/a" if math.isnan(pct) else f"{pct:+.1f}%",
            ]
        )
    text = (
        f"Token F1 of the closed-book arm on the general set **{name}** after each stage, with the paired change "
        "over the arm it was trained from, beside the loss-based figure of the stage manifests (validation loss "
        "on that stage's validation split, and its relative change since the stage that trained on it)."
    )
    return [("p", text), ("table", header, rows)]


def _gain_series(results: dict) -> dict[str, dict[str, dict]]:
    """{setting: {stage: stats of the gain}} for the gains that were measured."""
    out: dict[str, dict[str, dict]] = {}
    for g in results.get("stage_gains") or []:
        if "diff" in g:
            stats = {"mean": g["diff"], "low": g.get("low"), "high": g.get("high")}
            out.setdefault(g["setting"], {})[f"{g['stage']} vs {g['parent']}"] = stats
    return out


def _forgetting_series(results: dict) -> dict[str, dict[str, dict]]:
    """{general set: {after stage: token F1 stats}}."""
    out = {}
    for name, f in (results.get("forgetting") or {}).items():
        series = {a: r["token_f1"] for a, r in (f.get("after") or {}).items() if isinstance(r.get("token_f1"), dict)}
        if series:
            out[name] = series
    return out


def _fmt_plain(x) -> str:
    v = _num(x)
    if math.isnan(v):
        return "" if x is None else str(x)
    return f"{int(v):,}" if v == int(v) and abs(v) >= 1000 else f"{v:.4g}"


# --------------------------------------------------------------------------------------------------- renderers


def _md_cell(x) -> str:
    return " ".join(str(x).split()).replace("|", "\\|")


def render_markdown(results: dict) -> str:
    """The report as markdown (charts and example answers are in the HTML only)."""
    out = [f"# Evaluation report: {results.get('run', {}).get('name', 'run')}"]
    for title, blocks in build_sections(results):
        blocks = [b for b in blocks if b[0] not in ("chart", "examples")]
        if not blocks:
            continue
        out += ["", f"## {title}"]
        for kind, *body in blocks:
            out.append("")
            if kind == "p":
                out.append(body[0])
            elif kind == "list":
                out += [f"- {_md_cell(item)}" for item in body[0]]
            elif kind == "code":
                out += ["```json", body[0], "```"]
            else:
                header, rows = body
                out.append("| " + " | ".join(map(_md_cell, header)) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _h(text) -> str:
    """Escape, then allow only the **bold** and `code` the section text itself uses."""
    escaped = html.escape(str(text), quote=True)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def example_questions(results: dict, max_examples: int) -> list[tuple[str, str]]:
    """(test set, id) of the questions shown side by side: the first few of every set, so that hand-overs
    (unanswerable sets) are shown beside answers; about `max_examples` answerable ones in all."""
    first: dict[str, list[dict]] = {}
    for x in _live_arms(results).values():
        for r in x.get("answers", []):
            rows = first.setdefault(r.get("test_set"), [])
            if all(q.get("id") != r.get("id") for q in rows):
                rows.append(r)
    order = list(results.get("test_sets", {}))
    first = dict(sorted(first.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    kinds = {ts: (results.get("test_sets", {}).get(ts) or {}).get("kind") for ts in first}
    n_kb = max(1, sum(k in ("kb", None) for k in kinds.values()))
    out = []
    for ts, rows in first.items():
        take = max(1, -(-max_examples // n_kb)) if kinds[ts] in ("kb", None) else 1
        out += [(ts, r.get("id")) for r in rows[:take]]
    return out


def _answer_cell(ans: dict | None) -> str:
    if ans is None:
        return '<td class="na">not asked</td>'
    text = html.escape(str(ans.get("answer", "")))
    if ans.get("handoff") or ans.get("refused"):
        reason = ans.get("handoff_reason") or "the answer reads as a hand-over"
        badge = f'<span class="handover">HAND-OVER</span> <small>{html.escape(str(reason))}</small><br>'
        return f'<td class="handed">{badge}{text}</td>'
    cites = ans.get("shown_citations") or []
    listed = "".join(
        f"<li>[{html.escape(str(c.get('n')))}] {html.escape(str(c.get('title') or c.get('source') or ''))}</li>"
        for c in cites
    )
    return f"<td>{text}{f'<ul class=cites>{listed}</ul>' if listed else ''}</td>"


def _examples_html(results: dict, max_examples: int) -> str:
    """Questions of every set with the reference and every arm's shown answer side by side (hand-overs marked,
    shown citations by title), all escaped."""
    arms = {
        a: {(r.get("test_set"), r.get("id")): r for r in x.get("answers", [])} for a, x in _live_arms(results).items()
    }
    everything = {k: r for by_key in arms.values() for k, r in by_key.items()}
    rows = []
    for key in example_questions(results, max_examples):
        q = everything[key]
        kind = (results.get("test_sets", {}).get(key[0]) or {}).get("kind")
        ref = q.get("reference")
        cells = [
            f"<td><small>{html.escape(str(key[0]))} ({html.escape(KIND_LABELS.get(kind, kind or '?'))})</small><br>"
            f"<b>{html.escape(str(q.get('question', '')))}</b><br><i>Reference:</i> "
            f"{html.escape(str(ref)) if ref else '<i>none: the right reply is a hand-over</i>'}</td>"
        ]
        cells += [_answer_cell(by_key.get(key)) for by_key in arms.values()]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<th>question</th>" + "".join(f"<th>{html.escape(a)}</th>" for a in arms)
    return f'<div class="wide"><table class="examples"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top;text-align:left}th{background:#f3f3f3}.wide{overflow-x:auto}td{white-space:nowrap}
.examples td{min-width:14em;white-space:pre-wrap}td.handed{background:#fff6e0}td.na{color:#999}
.handover{background:#b35c00;color:#fff;border-radius:3px;padding:0 .3em;font-size:.8em;font-weight:bold}
ul.cites{margin:.3em 0 0 1em;padding:0;font-size:.85em;color:#555}.verdict p{font-size:1.05em;line-height:1.45}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%;display:block;margin:1em 0}"""


def render_html(results: dict, charts: dict[str, str], *, max_examples: int = MAX_EXAMPLES) -> str:
    """A self-contained page: inline CSS, charts as data: URIs, every value escaped."""
    title = html.escape(f"Evaluation report: {results.get('run', {}).get('name', 'run')}")
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>',
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>",
    ]

    def img(t: str) -> str:
        return f'<img alt="{html.escape(t)}" src="data:image/png;base64,{charts[t]}">'

    placed = {b[1] for _, blocks in build_sections(results) for b in blocks if b[0] == "chart" and b[1]}
    for heading, blocks in build_sections(results):
        rendered = []
        for kind, *body in blocks:
            if kind == "p":
                rendered.append(f"<p>{_h(body[0])}</p>")
            elif kind == "list":
                rendered.append("<ul>" + "".join(f"<li>{_h(item)}</li>" for item in body[0]) + "</ul>")
            elif kind == "code":
                rendered.append(f"<pre>{html.escape(body[0])}</pre>")
            elif kind == "chart":  # one named chart, or (None) every chart not placed elsewhere
                rendered += [
                    img(t) for t in ([body[0]] if body[0] else [t for t in charts if t not in placed]) if t in charts
                ]
            elif kind == "examples":
                rendered.append(_examples_html(results, max_examples))
            else:
                rendered.append(f'<div class="wide">{_html_table(*body)}</div>')
        if rendered:
            css = ' class="verdict"' if heading == "Verdict" else ""
            parts.append(f"<section{css}><h2>{_h(heading)}</h2>{''.join(rendered)}</section>")
    return "".join(parts) + "</body></html>\n"


def write_report(results: dict, out_dir: Path, *, max_examples: int = MAX_EXAMPLES) -> dict[str, Path]:
    """Write results.json, report.md and report.html into out_dir (each atomically); return their paths."""
    out_dir = Path(out_dir)
    texts = {
        "results.json": json.dumps(_jsonable(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "report.md": render_markdown(results),
        "report.html": render_html(results, make_charts(results), max_examples=max_examples),
    }
    for name, text in texts.items():
        atomic_write_text(out_dir / name, text)
    return {"results": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
