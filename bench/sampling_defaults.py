"""Which repetition control should the sampling defaults carry? Answer validation questions with a few settings.

The questions are the validation splits of the stages trained on knowledge-base sources
(<data_dir>/<stage>/validation.jsonl, the deepest stage's first), never the test splits that evaluation reports.
Each is answered as serving answers it: `build_service` with the config, mode rag+lora on the deepest trained
stage, greedy, `eval.max_new_tokens` new tokens. The prompts are prepared once (retrieval does not depend on the
setting) and every prompt is generated whatever the hand-off rule decides, since the setting is what is measured;
how many would have been handed over is reported.

Per setting: token F1 against the reference (SQuAD, as evaluation), the paired F1 difference to "off" with a
bootstrap CI, the loop rate (share of answers in which some line or some word 4-gram occurs >= 3 times), the
repeat rate (the same, twice: a loop starting within a short answer), the share of answers with a [n] marker,
mean answer tokens, wall time and the 1-minute load average (the machine is shared: the times say little, the
quality figures do not depend on them).

    .venv/bin/python -m bench.sampling_defaults [--config configs/default.yaml] [--limit 40]
        [--settings off,rp1.1,rp1.2,ngram4] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import md_table, write_report

SETTINGS = {
    "off": {},
    "rp1.1": {"repetition_penalty": 1.1},
    "rp1.2": {"repetition_penalty": 1.2},
    "ngram3": {"no_repeat_ngram_size": 3},
    "ngram4": {"no_repeat_ngram_size": 4},
    "rp1.1+ngram4": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
}
_WORD = re.compile(r"[^\W_]+")
_MARKER = re.compile(r"\[\d+\]")


def loops(text: str, times: int = 3, n: int = 4) -> bool:
    """Some non-empty line, or some word n-gram (lowercased), occurs at least `times` times."""
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    if lines and max(lines.values()) >= times:
        return True
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def paired_bootstrap(diffs: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean of paired differences."""
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(n_boot))
    return sum(diffs) / len(diffs), means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def kb_validation_questions(cfg, deepest: str | None, limit: int) -> list[dict]:
    """Parsed validation rows of the stages trained on knowledge-base sources, deepest stage first."""
    from pipeline.evaluate import parse_row
    from raglora.files import read_jsonl

    kb_sources = {s.name for s in cfg.data.sources if s.kb}
    stages = [st.name for st in cfg.finetune.stages if set(st.sources) & kb_sources]
    stages.sort(key=lambda name: name != deepest)  # stable: the deepest first, then config order
    rows: list[dict] = []
    for stage in stages:
        path = Path(cfg.paths.data_dir) / stage / "validation.jsonl"
        if not path.is_file():
            continue
        for _, raw in read_jsonl(path):
            row = parse_row(raw)
            if row["question"] and row["reference"]:
                rows.append({**row, "stage": stage})
    return rows[:limit]


def main() -> int:
    from pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--limit", type=int, default=40, help="questions (default 40)")
    ap.add_argument("--settings", default="off,rp1.1,rp1.2,ngram4", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens of the config")
    args = ap.parse_args()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        print(
            f"--settings: unknown {unknown[0] if unknown else '(none)'} (known: {', '.join(SETTINGS)})", file=sys.stderr
        )
        return 2

    from pipeline.api.settings import ServeConfig
    from pipeline.generate import SamplingParams
    from pipeline.metrics import token_f1
    from pipeline.service import build_service

    cfg = load_config(args.config)
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens
    serve = ServeConfig(
        **{**cfg.serve.model_dump(), "batching": True, "max_batch_size": cfg.eval.batch_size, "batch_wait_ms": 50}
    )
    service = build_service(cfg, serve=serve, with_store=False)
    try:
        stage = service.models.deepest_stage
        if stage is None or service.index is None:
            print(
                "needs trained stage adapters and the index: run `raglora demo` (or index + finetune)", file=sys.stderr
            )
            return 1
        questions = kb_validation_questions(cfg, stage, args.limit)
        if not questions:
            print(f"no validation questions under {cfg.paths.data_dir}: run `raglora data`", file=sys.stderr)
            return 1
        prepared = [
            service.prepare(q["question"], list(q["history"]), mode="rag+lora", stage=stage, max_new_tokens=max_new)
            for q in questions
        ]
        handed_over = sum(p.handoff_reason is not None for p in prepared)
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].prompt_ids))  # as evaluation batches
        results: dict[str, dict] = {}
        f1s: dict[str, list[float]] = {}
        for name in names:
            params = SamplingParams(max_new_tokens=max_new, **SETTINGS[name])
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            handles = {i: service.generator.submit(prepared[i].prompt_ids, stage=stage, params=params) for i in order}
            answers = {i: h.result() for i, h in handles.items()}
            wall = time.perf_counter() - t0
            texts = [answers[i].text.strip() for i in range(len(questions))]
            f1s[name] = [token_f1(t, q["reference"]) for t, q in zip(texts, questions, strict=True)]
            results[name] = {
                "params": SETTINGS[name],
                "token_f1": round(sum(f1s[name]) / len(f1s[name]), 4),
                "loop_rate": round(sum(loops(t) for t in texts) / len(texts), 4),
                "repeat_rate": round(sum(loops(t, times=2) for t in texts) / len(texts), 4),
                "cite_rate": round(sum(bool(_MARKER.search(t)) for t in texts) / len(texts), 4),
                "mean_answer_tokens": round(sum(answers[i].completion_tokens for i in answers) / len(answers), 1),
                "wall_s": round(wall, 1),
                "load_avg_1m_before": round(load_before, 2),
                "load_avg_1m_after": round(os.getloadavg()[0], 2),
                "examples": [
                    {"id": q["id"], "answer": t, "f1": round(f, 3), "loops": loops(t)}
                    for q, t, f in list(zip(questions, texts, f1s[name], strict=True))[:5]
                ],
            }
            print(
                f"{name}: F1 {results[name]['token_f1']} loops {results[name]['loop_rate']} ({wall:.0f}s)", flush=True
            )
        rows = []
        for name in names:
            r = results[name]
            diff = [a - b for a, b in zip(f1s[name], f1s[names[0]], strict=True)]
            mean, lo, hi = paired_bootstrap(diff)
            r["f1_vs_" + names[0]] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}
            rows.append(
                [
                    name,
                    r["token_f1"],
                    f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                    r["loop_rate"],
                    r["repeat_rate"],
                    r["cite_rate"],
                    r["mean_answer_tokens"],
                    r["wall_s"],
                    f"{r['load_avg_1m_before']} / {r['load_avg_1m_after']}",
                ]
            )
        headers = ["setting", "token F1", f"F1 - {names[0]} [95% CI]", "loop rate", "repeats (x2)", "cites [n]"]
        headers += ["tokens", "wall s"]
        table = md_table([*headers, "load avg 1m before / after"], rows)
        title = (
            f"Repetition control: {len(questions)} validation questions, rag+lora-{stage}, "
            f"{max_new} new tokens, greedy ({handed_over} would be handed over by the current rule)"
        )
        write_report(
            "sampling_defaults",
            args={"config": args.config, "limit": args.limit, "settings": names, "max_new_tokens": max_new},
            results={
                "stage": stage,
                "questions": len(questions),
                "question_ids": [q["id"] for q in questions],
                "handed_over_by_current_rule": handed_over,
                "settings": results,
            },
            tables={title: table},
        )
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
