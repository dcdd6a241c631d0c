"""Serve the tiny random model + a fake-embedder FAQ index with uvicorn on 127.0.0.1 (reliability tests only).

    python tests/reliability/serve_tiny.py --port 8123 --workdir /tmp/w --db /tmp/w/c.db --keys key-a,key-b

The index is (re)built under --workdir with the API tests' builders; conversations go to --db, so a restarted
server sees what the killed one stored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE.parent / "api")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--keys", default="key-a,key-b")
    parser.add_argument("--rate-limit", type=int, default=100_000)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()

    import torch
    import uvicorn
    from helpers import make_index, make_service, serve_settings

    from pipeline.api.app import create_app

    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    index = make_index(workdir)
    settings = serve_settings(
        workdir,
        host="127.0.0.1",  # never beyond loopback
        port=args.port,
        api_keys=[k for k in args.keys.split(",") if k],
        db_path=args.db,
        rate_limit_per_minute=args.rate_limit,
        max_new_tokens_default=args.max_new_tokens,
        graceful_shutdown_s=10,
    )
    app = create_app(serve=settings, service_factory=lambda: make_service(settings, None, index))
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )


if __name__ == "__main__":
    main()
