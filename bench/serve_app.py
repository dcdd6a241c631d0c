"""The chat API server that bench/api_load.py measures: `raglora serve`'s app (create_app + build_service) on
127.0.0.1 only, configured from flags. Not meant to be run by hand.

    python -m bench.serve_app --port 8123 --base packaged:smollm2-135m-instruct --cache-dir artifacts/base \
        --adapters artifacts/adapters --index artifacts/index --batching on --db /tmp/x/c.db
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--batching", choices=["on", "off"], default="on")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--adapter-strategy", default=None)
    ap.add_argument("--db", required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    import uvicorn

    from pipeline.api.app import create_app
    from pipeline.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "model.base": args.base,
        "paths.base_cache_dir": args.cache_dir,
        "paths.adapters_dir": args.adapters,
        "paths.index_dir": args.index,
        "serve.host": "127.0.0.1",
        "serve.port": args.port,
        "serve.batching": args.batching == "on",
        "serve.max_batch_size": args.max_batch_size,
        "serve.db_path": args.db,
        "serve.rate_limit_per_minute": 1_000_000,
        "serve.handoff_threshold": None,  # measure generation, not the fixed hand-off reply
        "serve.log_level": "WARNING",
    }
    if args.adapter_strategy:
        overrides["serve.adapter_strategy"] = args.adapter_strategy
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    app = create_app(cfg)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
