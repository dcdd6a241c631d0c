"""Superseded: the serving measurements now live in bench/generation.py (per-token latency base vs merged vs
stacked adapters, batched vs one-at-a-time, adapter switch cost) and bench/api_load.py (TTFT, requests/s and
p50/p95 of the real HTTP server with 1/4/16 clients, dynamic batching on vs off). This name is kept so old
commands still work; it runs bench.generation with the same arguments.

    .venv/bin/python -m bench.serve_latency [bench.generation flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.generation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
