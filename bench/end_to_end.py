"""End to end: wall time and peak memory of each `make demo` stage (data, index, search, finetune, eval), each run
as its own `raglora` subprocess in a throw-away workspace, with reduced settings.

    .venv/bin/python -m bench.end_to_end [--quick] [--steps 2] [--cache-dir artifacts/base]

The settings are a temp copy of configs/default.yaml with every path in the workspace except
paths.base_cache_dir (the converted base model is reused, so the one-time GGUF conversion, ~25 s, is not
counted), max_steps per stage = --steps, 8 validation rows per stage for the loss tables and a reduced
evaluation (--eval-questions per set, --eval-tokens new tokens). Peak RSS is the stage's own
(fresh parent process; see bench.common.run_tree_measured).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import DEFAULT_CACHE, md_table, run_tree_measured, write_report

STAGES = {
    "data": ["data"],
    "index": ["index"],
    "search": ["search", "--k", "3", "Do I need a building permit for an extension?"],
    "finetune": ["finetune"],
    "eval": ["eval"],
}


def workspace_config(src: Path, ws: Path, *, cache_dir: str, steps: int, eval_questions: int, eval_tokens: int):
    raw = yaml.safe_load(src.read_text(encoding="utf-8")) if src.is_file() else {}
    raw.setdefault("paths", {}).update(
        {
            "data_dir": str(ws / "data"),
            "artifacts_dir": str(ws / "artifacts"),
            "index_dir": str(ws / "artifacts/index"),
            "adapters_dir": str(ws / "artifacts/adapters"),
            "base_cache_dir": str(Path(cache_dir).resolve()),
            "reports_dir": str(ws / "reports"),
        }
    )
    raw.setdefault("index", {})["docs"] = [str(ws / "data/kb")]
    raw.setdefault("finetune", {})["eval_max_examples"] = 8
    for stage in raw["finetune"].get("stages") or []:
        stage["max_steps"] = steps
    ev = raw.setdefault("eval", {})
    ev["max_questions"] = eval_questions
    for spec in (ev.get("sets") or {}).values():
        if isinstance(spec, dict):
            spec["limit"] = min(spec.get("limit") or eval_questions, eval_questions)
    ev["max_new_tokens"] = eval_tokens
    ev["speedup_questions"] = min(ev.get("speedup_questions", 8), eval_questions)
    ev["bootstrap_resamples"] = 200
    raw.setdefault("serve", {})["db_path"] = str(ws / "artifacts/conversations.db")
    path = ws / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--steps", type=int, default=None, help="max_steps of every finetune stage (default 2, quick 1)")
    ap.add_argument("--eval-questions", type=int, default=None, help="per eval set (default 2)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="eval max_new_tokens (default 16, quick 8)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--keep", action="store_true", help="keep the workspace")
    ap.add_argument("--out-dir", default="reports/bench")
    args = ap.parse_args(argv)
    steps = args.steps or (1 if args.quick else 2)
    n_q = args.eval_questions or 2
    n_tok = args.eval_tokens or (8 if args.quick else 16)
    ws = Path(tempfile.mkdtemp(prefix="raglora-bench-e2e-"))
    cfg = workspace_config(Path(args.config), ws, cache_dir=args.cache_dir, steps=steps, eval_questions=n_q,
                           eval_tokens=n_tok)  # fmt: skip
    raglora = [sys.executable, "-m", "pipeline.cli"]
    results: dict = {}
    rows = []
    try:
        for name in args.stages.split(","):
            cmd = [*raglora, *STAGES[name][:1], "--config", str(cfg), *STAGES[name][1:]]
            print(f"[e2e] {name} ...", flush=True)
            run = run_tree_measured(cmd, timeout=3600)
            results[name] = {"rc": run["rc"], "wall_s": round(run["wall_s"], 2), "peak_rss_mb": run["peak_rss_mb"]}
            rows.append([name, run["rc"], run["wall_s"], run["peak_rss_mb"]])
            if run["rc"] != 0:
                results[name]["stderr_tail"] = run["stderr"][-2000:]
                print(run["stderr"][-2000:], file=sys.stderr)
                break
    finally:
        if not args.keep:
            shutil.rmtree(ws, ignore_errors=True)
    total = sum(r["wall_s"] for r in results.values())
    rows.append(["total", "", total, max((r["peak_rss_mb"] or 0) for r in results.values())])
    title = (
        f"`make demo` stages as subprocesses (finetune max_steps={steps} per stage, 8 validation rows; eval {n_q} "
        "questions per set, "
        f"{n_tok} new tokens; base model conversion cached)"
    )
    write_report(
        "end_to_end",
        args=vars(args) | {"steps": steps, "eval_questions": n_q, "eval_tokens": n_tok},
        results={"stages": results, "total_wall_s": round(total, 2)},
        tables={title: md_table(["stage", "exit code", "wall s", "peak RSS MB"], rows)},
        out_dir=args.out_dir,
    )
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
