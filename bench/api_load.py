"""Chat API under load: a real uvicorn server (bench/serve_app.py, 127.0.0.1 only) and a bounded streaming load
generator with 1, 8 and 16 concurrent clients and a fixed number of requests per level, continuous batching on vs
off, side by side in one run (same model, prompts and adapter strategy).

    .venv/bin/python -m bench.api_load [--quick] [--requests 32] [--tokens 32] [--adapters artifacts/adapters]
        [--index artifacts/index] [--base packaged:smollm2-135m-instruct] [--cache-dir artifacts/base]

Each request is `POST /v1/chat/completions` with `stream: true` and a held-out FAQ question (default model:
rag+lora on the deepest stage when adapters and an index exist); TTFT = time to the first non-empty content delta.
The hand-off threshold is off so every request generates. --quick uses the tiny random model from
tests/tiny_model.py (server-path overhead, not model speed) unless --base is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_ADAPTERS,
    DEFAULT_BASE,
    DEFAULT_CACHE,
    DEFAULT_INDEX,
    REPO,
    child_env,
    latency_summary,
    md_table,
    ratio,
    write_report,
)
from bench.generation import eval_questions


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_base(out: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import save_tiny_model

    return str(save_tiny_model(out))


class Server:
    """bench.serve_app in a subprocess on 127.0.0.1; always stopped on exit."""

    def __init__(self, args, batching: bool, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shared_threads = args.shared_threads
        self.log = workdir / f"server-{'on' if batching else 'off'}.log"
        self.cmd = [
            sys.executable, "-m", "bench.serve_app", "--port", str(self.port), "--base", args.base,
            "--cache-dir", args.cache_dir, "--adapters", args.adapters, "--index", args.index,
            "--batching", "on" if batching else "off", "--max-batch-size", str(args.max_batch_size),
            "--db", str(workdir / f"conv-{self.port}.db"),
        ]  # fmt: skip
        if args.threads:
            self.cmd += ["--threads", str(args.threads)]
        if args.adapter_strategy:
            self.cmd += ["--adapter-strategy", args.adapter_strategy]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        with open(self.log, "ab") as log:
            env = child_env(**({"RAGLORA_ENGINE_OWNS_THREADS": "0"} if self.shared_threads else {}))
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log, stderr=log)
        t0 = time.perf_counter()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    self.health = r.json()
                    self.startup_s = time.perf_counter() - t0
                    return self
            time.sleep(0.3)
        raise RuntimeError(f"server not ready in 600 s: {self.log.read_text()[-3000:]}")

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def one_request(client, url: str, question: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "stream": True, "max_tokens": tokens}
    t0 = time.perf_counter()
    ttft = None
    error = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}"
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("message", "error")
                    continue
                delta = (event.get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except Exception as exc:  # counted, never raised: the load run must finish
        error = f"{type(exc).__name__}: {exc}"
    return {"total_s": time.perf_counter() - t0, "ttft_s": ttft, "chunks": chunks, "error": error}


async def load_level(url: str, questions: list[str], clients: int, n_requests: int, tokens: int) -> dict:
    import httpx

    todo = list(range(n_requests))
    results: list[dict] = []

    async def client_loop(client):
        while todo:
            i = todo.pop(0)
            results.append(await one_request(client, url, questions[i % len(questions)], tokens))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients)) as c:
        await one_request(c, url, questions[0], tokens)  # warm-up (not counted)
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]
    lat = latency_summary([r["total_s"] for r in ok])
    ttft = latency_summary([r["ttft_s"] for r in ok if r["ttft_s"] is not None])
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "latency_p50_ms": lat["p50_ms"],
        "latency_p95_ms": lat["p95_ms"],
        "ttft_p50_ms": ttft["p50_ms"],
        "ttft_p95_ms": ttft["p95_ms"],
        "mean_stream_chunks": round(sum(r["chunks"] for r in ok) / max(len(ok), 1), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, fewer requests")
    ap.add_argument("--base", default=None, help=f"default {DEFAULT_BASE} (quick: the tiny test model)")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--adapters", default=DEFAULT_ADAPTERS, help="'none' for no stage adapters (ignored by --quick)")
    ap.add_argument("--index", default=DEFAULT_INDEX, help="'none' for no retrieval")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--clients", default="1,8,16")
    ap.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per concurrency level, at least one per client (default 32, quick 8)",
    )
    ap.add_argument("--tokens", type=int, default=None, help="max_tokens per request (default 32, quick 8)")
    ap.add_argument("--batching", default="on,off", help="server settings to run: on,off (default both)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--adapter-strategy", default=None, help="serve.adapter_strategy (default: the config's)")
    ap.add_argument(
        "--shared-threads",
        action="store_true",
        help="RAGLORA_ENGINE_OWNS_THREADS=0 in the server: the embedder's threads keep torch's thread count too",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default="reports/bench")
    args = ap.parse_args(argv)
    n_req = args.requests or (8 if args.quick else 32)
    tokens = args.tokens or (8 if args.quick else 32)
    levels = [int(c) for c in args.clients.split(",")]
    questions = eval_questions(args.data_dir, 200)
    workdir = Path(tempfile.mkdtemp(prefix="raglora-bench-api-"))
    if args.base is None and args.quick:
        args.base = tiny_base(workdir / "tiny")
        args.adapters = "none"  # trained adapters belong to the real model; the tiny one serves base/rag
    args.base = args.base or DEFAULT_BASE
    if args.index == "none" or not Path(args.index).exists():
        args.index = str(workdir / "no-index")
    if args.adapters == "none" or not Path(args.adapters).exists():
        args.adapters = str(workdir / "no-adapters")

    results: dict = {}
    servers: dict = {}
    for batching in [b == "on" for b in args.batching.split(",")]:
        key = "on" if batching else "off"
        print(f"[api] server with batching {key} ...", flush=True)
        with Server(args, batching, workdir) as server:
            servers[key] = {"startup_s": round(server.startup_s, 1), "health": server.health}
            for c in levels:
                r = asyncio.run(load_level(server.url, questions, c, max(n_req, c), tokens))
                results[f"{key}/{c}"] = r
                print(f"[api]   batching {key}, {c} clients: {r['requests_per_s']} req/s, "
                      f"p50 {r['latency_p50_ms']} ms, errors {r['errors']}", flush=True)  # fmt: skip
            servers[key]["peak_rss_mb"] = server.peak_rss_mb()
    total_errors = sum(r["errors"] for r in results.values())
    first = next(iter(servers))
    health = servers[first]["health"]
    rows = []
    for key in servers:
        for c in levels:
            r = results[f"{key}/{c}"]
            rows.append([key, c, r["requests"], r["errors"], r["requests_per_s"], r["ttft_p50_ms"], r["ttft_p95_ms"],
                         r["latency_p50_ms"], r["latency_p95_ms"]])  # fmt: skip
    top = max(levels)
    goals = {}
    for c in levels:
        on, off = results.get(f"on/{c}"), results.get(f"off/{c}")
        if on and off and c > 1:
            goals[c] = {
                "speedup": ratio(on["requests_per_s"], off["requests_per_s"]),
                "ttft_p50_on_vs_off": ratio(on["ttft_p50_ms"], off["ttft_p50_ms"]),
            }
            goals[c]["met"] = bool(
                (goals[c]["speedup"] or 0) >= 3.0
                and (goals[c]["ttft_p50_on_vs_off"] or 9) <= 1.0
                and on["errors"] == off["errors"] == 0
            )
    speedup = goals.get(top, {}).get("speedup")
    title = (
        f"Chat API under load ({args.base}, model {health.get('default_model')}, index "
        f"{'yes' if health.get('index_loaded') else 'no'}, {n_req} streaming requests per level, max_tokens {tokens})"
    )
    rss = ", ".join(f"batching {k} {v['peak_rss_mb']} MB" for k, v in servers.items())
    tables = {
        title: md_table(
            ["batching", "clients", "requests", "errors", "req/s", "TTFT p50 ms", "TTFT p95 ms", "p50 ms", "p95 ms"],
            rows,
        )
        + "\n\n"
        + " ".join(
            f"At {c} clients: batching on/off **{g['speedup']}x** requests/s, TTFT p50 on/off {g['ttft_p50_on_vs_off']}x "
            f"(goal >= 3x and <= 1x: {'met' if g['met'] else 'NOT met'})."
            for c, g in goals.items()
        )
        + f" Errors: {total_errors} "
        f"(must be 0). Server start (model + adapters + index): {servers[first]['startup_s']} s; server peak RSS: "
        f"{rss}."
    }
    write_report(
        "api_load",
        args=vars(args) | {"requests": n_req, "tokens": tokens},
        results={
            "levels": results,
            "servers": servers,
            "errors_total": total_errors,
            "batching_speedup": speedup,
            "goals": goals,
        },
        tables=tables,
        out_dir=args.out_dir,
    )
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
