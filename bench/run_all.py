"""Run every benchmark (each in its own subprocess) and write reports/bench/README.md with all tables.

    .venv/bin/python -m bench.run_all [--quick] [--only train_throughput,retrieval] [--readme-only]
        [--cache-dir artifacts/base] [--adapters artifacts/adapters] [--index artifacts/index]

Full run: about 17 minutes on a 2-core CPU plus the 1M-vector retrieval run (9 min at 384-d, more at 768); --quick: about 7. Every number in the README comes from a
reports/bench/<name>.json written by the command printed above its table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_ADAPTERS, DEFAULT_CACHE, DEFAULT_INDEX, child_env, machine_info, md_table

BENCHMARKS = ("train_throughput", "generation", "adapter_strategies", "retrieval", "api_load", "end_to_end")
#: which shared flags each benchmark takes
FLAGS = {
    "train_throughput": ("cache_dir", "index"),
    "generation": ("cache_dir", "adapters"),
    "adapter_strategies": ("cache_dir", "adapters"),
    "retrieval": (),
    "api_load": ("cache_dir", "adapters", "index"),
    "end_to_end": ("cache_dir",),
}


def command(name: str, args) -> list[str]:
    cmd = [sys.executable, "-m", f"bench.{name}", "--out-dir", args.out_dir]
    if args.quick:
        cmd.append("--quick")
    for flag in FLAGS[name]:
        cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return cmd


def headlines(reports: dict) -> list[str]:
    """One line per headline ratio found in the reports (missing benchmarks are simply left out)."""
    out = []
    train = reports.get("train_throughput", {}).get("results", {})
    for wl, tr in train.get("workloads", {}).items():
        s = tr["summary"]
        peers = ", ".join(f"{side} {p['speedup']}x" if p["speedup"] else f"{side}: {p['status']}"
                          for side, p in s["peers"].items())  # fmt: skip
        out.append(
            f"LoRA training ({wl} workload), ours vs the best peer ({s['best_peer']}): "
            f"{s['speedup_tokens_per_s']}x real tokens/s (goal {s['goal_speedup']}x "
            f"{'met' if s['speedup_goal_met'] else 'NOT met'}); every peer: {peers}; ours' peak RSS "
            f"{s['ours_peak_rss_over_tensors']}x its counted tensors (goal <= {s['rss_goal']}x)"
        )
    if "equality" in train:
        eq = train["equality"]
        s = eq["summary"]
        out.append(
            f"Loss equality after one epoch of {eq['stage']}: "
            + ", ".join(
                f"{side} {c['rel_diff_vs_ours']:+.2%}{'' if c['equal'] else ' DIVERGES'}"
                for side, c in eq["check"].items()
            )  # fmt: skip
            + f"; on those same examples ours vs the best peer ({s['best_peer']}): {s['speedup_tokens_per_s']}x "
            f"real tokens/s (goal {s['goal_speedup']}x {'met' if s['speedup_goal_met'] else 'NOT met'})"
        )
    gen = reports.get("generation", {}).get("results")
    if gen:
        bvs = gen["batched_vs_sequential"]
        out.append(
            f"Generation, batched vs one-at-a-time: {bvs['speedup']}x answers/s, identical greedy outputs "
            f"{bvs['identical_outputs']}/{bvs['batched']['answers']}"
        )
        lat = ", ".join(f"{k} {v['decode_vs_base']}x" for k, v in gen["latency"].items() if "base" not in k)
        out.append(f"Decode latency per token relative to the base model: {lat}")
    strategies = reports.get("adapter_strategies", {}).get("results", {}).get("strategies")
    if strategies:
        out.append(
            "Adapter strategies (RSS after load MB / decode vs merged): "
            + ", ".join(f"{k} {v['rss_mb']} / {v['decode_vs_merged']}x" for k, v in strategies.items())
        )
    ret = reports.get("retrieval", {}).get("results", {})
    if "build" in ret:
        out.append(f"Index build at {ret['build']['ours_fraction_of_ceiling']}x the raw encode ceiling (chunks/s)")
    if "scale" in ret:
        n = ret["realistic_vectors"]["vectors"]
        measured = {key.split("/")[1]: row for key, row in ret["scale"].items() if "skipped" not in row}
        rows = ", ".join(f"{kind} {row['recall@10']} @ {row['speedup_vs_exact']}x, {row['resident_gb_per_1m']} GB/1M"
                         for kind, row in measured.items())  # fmt: skip
        verdict = {True: "met", False: "NOT met", None: "not measured"}
        goals = "; ".join(f"{g['goal']}: {verdict[g['met']]}" for g in ret["scale_goals"].values())
        out.append(f"search() at {n:,} realistic vectors (recall@10 @ speed-up vs exact, memory): {rows}. {goals}")
    api = reports.get("api_load", {}).get("results")
    if api:
        out.append(f"Chat API, dynamic batching on vs off at the highest concurrency: {api['batching_speedup']}x req/s, "
                   f"errors {api['errors_total']}")  # fmt: skip
    return out


def write_readme(out_dir: Path, durations: dict | None = None) -> Path:
    reports = {}
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        if path.is_file():
            reports[name] = json.loads(path.read_text())
    machine = next((r["machine"] for r in reports.values()), None) or machine_info()
    lines = [
        "# raglora benchmarks",
        "",
        "Written by `.venv/bin/python -m bench.run_all` from the JSON reports beside this file; every table below",
        "names the command that produced it. All ratios are measured side by side in one run on the same machine,",
        "data and model. Timings are medians of repeated `time.perf_counter` loops after a warm-up.",
        "",
        "## Machine",
        "",
        md_table(["field", "value"], [[k, v] for k, v in machine.items()]),
        "",
    ]
    headline = headlines(reports)
    if headline:
        lines += ["## Headline ratios", "", *[f"- {h}" for h in headline], ""]
    if durations:
        lines += ["Benchmark wall times (this run): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()) + ".", ""]  # fmt: skip
    for name, rep in reports.items():
        lines += [f"## {name}", "", f"Command: `{rep['command']}` ({rep['created']}, load average at start "
                  f"{rep['machine'].get('load_avg_1m')})", ""]  # fmt: skip
        for title, table in rep["tables"].items():
            lines += [f"### {title}", "", table, ""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer steps and sizes (about 7 minutes instead of 17 on 2 cores)"
    )
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--readme-only", action="store_true", help="only rebuild README.md from the JSON reports")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--adapters", default=DEFAULT_ADAPTERS)
    ap.add_argument("--index", default=DEFAULT_INDEX)
    ap.add_argument("--out-dir", default="reports/bench")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    failed = []
    durations: dict[str, float] = {}
    if not args.readme_only:
        for name in names:
            cmd = command(name, args)
            print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, env=child_env()).returncode
            durations[name] = time.perf_counter() - t0
            if rc != 0:
                failed.append(name)
                print(f"=== {name} FAILED (exit {rc})", flush=True)
    path = write_readme(out_dir, durations)
    print(f"\nwrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
