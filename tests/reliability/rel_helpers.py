"""Shared tools of the reliability suite: a real uvicorn server in a subprocess (127.0.0.1 only) and its clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SERVE_TINY = HERE / "serve_tiny.py"
SLOW_INDEX_CLI = HERE / "slow_index_cli.py"
KEYS = ("key-a", "key-b")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("RAGLORA_API_KEYS", None)
    env.update(extra)
    return env


class TinyServer:
    """`serve_tiny.py` in a subprocess on 127.0.0.1; stderr (the JSON logs) goes to `log_path`."""

    def __init__(self, workdir: Path, *, db: Path | None = None, rate_limit: int = 100_000, max_new_tokens: int = 6):
        self.workdir = Path(workdir)
        self.db = db or self.workdir / "conversations.db"
        self.rate_limit = rate_limit
        self.max_new_tokens = max_new_tokens
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> TinyServer:
        self.port = free_port()
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        cmd = [
            sys.executable,
            str(SERVE_TINY),
            "--port",
            str(self.port),
            "--workdir",
            str(self.workdir),
            "--db",
            str(self.db),
            "--keys",
            ",".join(KEYS),
            "--rate-limit",
            str(self.rate_limit),
            "--max-new-tokens",
            str(self.max_new_tokens),
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not ready in {timeout}s: {self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]


def headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
