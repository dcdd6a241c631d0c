"""Shared by every benchmark: machine info, timing loops, peak memory of a subprocess, tables and reports.

Every benchmark writes `reports/bench/<name>.json` ({"name", "machine", "args", "results", "tables"}) and
prints its tables as Markdown; `bench/run_all.py` collects the tables into `reports/bench/README.md`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT_DIR = Path("reports/bench")
# What the lead's real runs produced; used only when the config's defaults are missing (see each --help).
DEFAULT_ADAPTERS = "artifacts/adapters"
DEFAULT_INDEX = "artifacts/index"
DEFAULT_BASE = "packaged:smollm2-135m-instruct"
DEFAULT_CACHE = "artifacts/base"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> tuple[list[float], object]:
    """Run `fn` `warmup` times untimed, then `repeats` times under perf_counter; (seconds per run, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    if not values:
        return float("nan")
    vals = sorted(values)
    pos = (len(vals) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def latency_summary(seconds: list[float]) -> dict:
    """p50/p95/mean in milliseconds."""
    return {
        "n": len(seconds),
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p95_ms": round(percentile(seconds, 95) * 1000, 3),
        "mean_ms": round(statistics.fmean(seconds) * 1000, 3) if seconds else None,
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


# ---------------------------------------------------------------------------------------------- subprocesses


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update({"PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_measured(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 3600):
    """Run `cmd` to completion; {"rc", "wall_s", "peak_rss_mb", "stdout", "stderr"}.

    The peak RSS is the `PEAK_RSS_MB=` line the child prints last (`report_peak_rss()` in our python workers,
    or `run_tree_measured` for any command): each measured run is a fresh process, so its peak is clean.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"rc": -9, "wall_s": time.perf_counter() - t0, "peak_rss_mb": None, "stdout": out, "stderr": err}
    wall = time.perf_counter() - t0
    peak = None  # reported by the child itself (report_peak_rss / run_tree_measured)
    for line in reversed(out.splitlines()):
        if line.startswith("PEAK_RSS_MB="):
            peak = float(line.split("=", 1)[1])
            break
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mb": peak, "stdout": out, "stderr": err}


def peak_rss_mb() -> float:
    """This process's peak RSS so far (Linux VmHWM, else getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def report_peak_rss() -> None:
    """Print the line `run_measured` reads: call last thing in a worker subprocess."""
    print(f"PEAK_RSS_MB={peak_rss_mb()}", flush=True)


def run_tree_measured(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 3600):
    """Like run_measured for any command (not only our python workers): runs it under a fresh python parent
    (`python -m bench.common --measure -- CMD`) so RUSAGE_CHILDREN of that parent is exactly this command."""
    return run_measured(
        [sys.executable, "-m", "bench.common", "--measure", "--", *cmd], cwd=cwd, env=env, timeout=timeout
    )


def _measure_main(cmd: list[str]) -> int:
    import resource

    proc = subprocess.run(cmd)
    print(f"PEAK_RSS_MB={round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}", flush=True)
    return proc.returncode


# ---------------------------------------------------------------------------------------------- reports


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    name: str, *, args: dict, results: dict, tables: dict[str, str], out_dir: str | Path = REPORT_DIR
) -> Path:
    """Write reports/bench/<name>.json and print the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = {
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "machine": machine_info(),
        "args": args,
        "results": results,
        "tables": tables,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for title, table in tables.items():
        print(f"\n### {title}\n\n{table}")
    print(f"\nwrote {path}", flush=True)
    return path


def existing(path: str | None, *fallbacks: str) -> str | None:
    """The first of path, fallbacks that exists (None when none does)."""
    for p in (path, *fallbacks):
        if p and Path(p).exists():
            return p
    return None


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure" and sys.argv[2] == "--":
        sys.exit(_measure_main(sys.argv[3:]))
    print(json.dumps(machine_info(), indent=2))
