"""What does the default repeat ban (no_repeat_ngram_size) cost batched generation? Side by side in one run.

The same prompts (the first held-out questions of the first kb stage, closed book on the base model, as
evaluation's speed-up check asks them) are answered one at a time and as one batch, with the default sampling
parameters and with the repeat ban off; prints the wall times, the batched speed-up, whether batched outputs
equal one-at-a-time ones, and the 1-minute load average (run it on an otherwise idle machine).

    .venv/bin/python -m bench.repeat_ban_cost [--config configs/default.yaml] [--questions 8]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pipeline.api.settings import ServeConfig
from pipeline.config import load_config
from pipeline.generate import SamplingParams
from pipeline.service import build_service
from raglora.files import read_jsonl


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--questions", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    stage = next(s for s in cfg.finetune.stages if s.kind == "chat" and s.raft)
    rows = [r for _, r in read_jsonl(Path(cfg.paths.data_dir) / stage.name / "test.jsonl")][: args.questions]
    serve = ServeConfig(**{**cfg.serve.model_dump(), "batching": True, "max_batch_size": 16, "batch_wait_ms": 50})
    service = build_service(cfg, serve=serve, with_store=False)
    try:
        n = cfg.eval.max_new_tokens
        ids = [service.prepare(r["question"], [], mode="base", max_new_tokens=n).prompt_ids for r in rows]
        default = SamplingParams(max_new_tokens=n)
        for name, params in (
            (f"no_repeat_ngram_size {default.no_repeat_ngram_size}", default),
            ("repeat ban off", SamplingParams(max_new_tokens=n, no_repeat_ngram_size=0)),
        ):
            t0 = time.perf_counter()
            single = [service.generator.submit(p, params=params).result() for p in ids]
            t_single = time.perf_counter() - t0
            t0 = time.perf_counter()
            handles = [service.generator.submit(p, params=params) for p in ids]
            batched = [h.result() for h in handles]
            t_batched = time.perf_counter() - t0
            same = [r.text for r in single] == [r.text for r in batched]
            print(
                f"{name}: one at a time {t_single:.2f} s, batched {t_batched:.2f} s, x{t_single / t_batched:.2f}; "
                f"{sum(r.completion_tokens for r in single)} tokens; identical outputs {same}; "
                f"load average {os.getloadavg()[0]:.2f}"
            )
    finally:
        service.close()


if __name__ == "__main__":
    main()
