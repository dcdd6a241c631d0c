"""Serving's adapter strategies side by side: resident memory, load time and decode speed per token of
`merged`, `stack` and `cumulative` (pipeline.stage_models), each in its own fresh process.

    .venv/bin/python -m bench.adapter_strategies [--quick] [--adapters artifacts/adapters]
        [--cache-dir artifacts/base] [--questions 6] [--tokens 48]

Per strategy, one subprocess loads the base and every stage the way `raglora serve` does and reports
- RSS after loading (VmRSS) and the peak (VmHWM), and the tensors it holds (unique storages, counted once);
- decode ms per token through the engine users run (`pipeline.generate.Generator`, batching off): for each of
  the eval questions, (total - time to first token) / (completion tokens - 1) on the deepest stage, median;
- the greedy answers, so the table can say whether the strategies agree.
Without trained adapters under --adapters, random r=16 adapters are made for 3 stages (speed and memory do not
depend on the values).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_ADAPTERS,
    DEFAULT_BASE,
    DEFAULT_CACHE,
    child_env,
    md_table,
    median,
    peak_rss_mb,
    ratio,
    write_report,
)

STRATEGIES = ("merged", "stack", "cumulative")


def tensor_mb(modules) -> float:
    """Bytes of every parameter and buffer reachable from `modules`, each storage counted once."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return round(sum(seen.values()) / 2**20, 1)


def worker(args) -> int:
    import torch

    from bench.generation import eval_questions, lora_prompt_ids
    from finetune.model import load_base
    from pipeline.generate import Generator, SamplingParams
    from pipeline.stage_models import StageModels

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
    models = StageModels(model, tok, args.adapters, strategy=args.worker)
    load_s = time.perf_counter() - t0
    modules = [models.base, *([models.peft] if models.peft is not None else []), *models.merged.values()]
    from finetune.train import rss_mb

    memory = {"rss_mb": rss_mb(), "tensor_mb": tensor_mb(modules)}
    stage = models.deepest_stage
    prompts = [lora_prompt_ids(tok, q) for q in eval_questions(args.data_dir, args.questions)]
    params = SamplingParams(max_new_tokens=args.tokens)
    gen = Generator(models, batching=False)
    try:
        gen.generate(prompts[0], stage=stage, params=SamplingParams(max_new_tokens=4))  # warm-up
        per_token, texts = [], []
        for p in prompts:
            r = gen.generate(p, stage=stage, params=params)
            texts.append(r.text)
            if r.completion_tokens > 1 and r.ttft_s is not None:
                per_token.append((r.total_s - r.ttft_s) / (r.completion_tokens - 1))
    finally:
        gen.close()
    out = {
        "strategy": args.worker,
        "stages": models.stage_names,
        "deepest": stage,
        "load_s": round(load_s, 2),
        **memory,
        "peak_rss_mb": peak_rss_mb(),
        "decode_ms_per_token": round(median(per_token) * 1000, 2) if per_token else None,
        "texts": texts,
    }
    print("RESULT=" + json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--adapters", default=DEFAULT_ADAPTERS)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--questions", type=int, default=None, help="eval questions answered (default 6, quick 2)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 48, quick 8)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default="reports/bench")
    ap.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.questions = args.questions or (2 if args.quick else 6)
    args.tokens = args.tokens or (8 if args.quick else 48)
    if args.worker:
        return worker(args)

    from pipeline.stage_models import discover_stages

    adapters, note = Path(args.adapters), args.adapters
    if not discover_stages(adapters):
        from bench.generation import make_random_adapters
        from finetune.model import load_base

        model, _ = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
        adapters = make_random_adapters(model, Path(tempfile.mkdtemp(prefix="raglora-bench-strat-")) / "adapters")
        note = f"random r=16 q,k,v,o adapters, 3 stages (nothing trained under {args.adapters})"
        del model
    print(f"[adapter_strategies] adapters: {note}", flush=True)
    rows: dict[str, dict] = {}
    for strategy in STRATEGIES:
        print(f"[adapter_strategies] {strategy} ...", flush=True)
        cmd = [sys.executable, "-m", "bench.adapter_strategies", "--worker", strategy, "--adapters", str(adapters)]
        for flag in ("base", "cache_dir", "data_dir", "questions", "tokens", "threads"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT=")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"adapter_strategies: the {strategy} worker failed (rc {proc.returncode})")
        rows[strategy] = json.loads(line.removeprefix("RESULT="))
    ref = rows["merged"]
    for r in rows.values():
        r["decode_vs_merged"] = ratio(r["decode_ms_per_token"], ref["decode_ms_per_token"])
        r["same_answers_as_merged"] = sum(a == b for a, b in zip(r["texts"], ref["texts"], strict=True))
    n_stages = len(ref["stages"])
    table = md_table(
        [
            "strategy",
            "RSS after load MB",
            "peak RSS MB",
            "tensors MB",
            "load s",
            "decode ms/token",
            "vs merged",
            "same greedy answers",
        ],  # fmt: skip
        [
            [
                s,
                r["rss_mb"],
                r["peak_rss_mb"],
                r["tensor_mb"],
                r["load_s"],
                r["decode_ms_per_token"],
                r["decode_vs_merged"],
                f"{r['same_answers_as_merged']}/{len(r['texts'])}",
            ]  # fmt: skip
            for s, r in rows.items()
        ],
    )
    write_report(
        "adapter_strategies",
        args=vars(args) | {"adapters_used": note},
        results={"strategies": rows},
        tables={
            f"Adapter strategies, {args.base}, {n_stages} stages, deepest {ref['deepest']} "
            f"({args.questions} questions x {args.tokens} new tokens, engine with batching off)": table
        },
        out_dir=args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
