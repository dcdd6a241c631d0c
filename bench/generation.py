"""Generation speed: batched vs one-at-a-time answering of evaluation questions (with an identical-output check),
per-token latency of the base model vs merged vs stacked (unmerged PEFT) stage adapters, and adapter switch cost.

    .venv/bin/python -m bench.generation [--quick] [--adapters artifacts/adapters] [--cache-dir artifacts/base]
        [--questions 16] [--tokens 32]

Latency per token: `model.generate` greedy with min_new_tokens = max_new_tokens = N (so every variant decodes
exactly N tokens) on the same prompt; prefill = a 1-token run, decode/token = (t(N) - t(1)) / (N - 1), medians.
Batched vs sequential: `pipeline.generate.Generator` (the server's batcher) with batching on (all questions
submitted at once, max_batch_size 8) vs off (one request after another), mode lora on the deepest stage.
Without trained adapters under --adapters, random r=16 LoRA adapters are made (speed does not depend on values).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_ADAPTERS, DEFAULT_BASE, DEFAULT_CACHE, md_table, median, ratio, timed, write_report


def make_random_adapters(model, out: Path, stages=("general", "domain", "subdomain"), r: int = 16) -> Path:
    """Random (non-zero) LoRA adapters, q/k/v/o like finetune's default, with stage-chain manifests."""
    import torch
    from peft import LoraConfig, get_peft_model

    for i, stage in enumerate(stages):
        torch.manual_seed(i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         init_lora_weights=False)  # fmt: skip
        peft_model = get_peft_model(copy.deepcopy(model), cfg)
        peft_model.save_pretrained(out / stage)
        manifest = {"stage": stage, "parents": list(stages[:i]), "method": "lora"}
        (out / stage / "manifest.json").write_text(json.dumps(manifest))
        del peft_model
    return out


def eval_questions(data_dir: str | Path, n: int) -> list[str]:
    """The held-out FAQ questions the evaluation uses (domain + subdomain test), first n."""
    rows = []
    for split in ("domain", "subdomain"):
        path = Path(data_dir) / split / "test.jsonl"
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["question"] for r in rows][:n]


def lora_prompt_ids(tok, question: str) -> list[int]:
    """The prompt serving builds in lora mode (system prompt + question, chat template)."""
    from finetune.prompt import build_messages, chat_ids, load_system_prompt
    from pipeline.answer import _ids

    msgs = build_messages(question, contexts=None, system_prompt=load_system_prompt(None, False))
    return _ids(chat_ids(tok, msgs, add_generation_prompt=True))


def per_token_latency(module, prompt: list[int], n_tokens: int, pad_id: int, *, repeats: int) -> dict:
    import torch

    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def gen(n):
        def run():
            with torch.inference_mode():
                return module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=pad_id)  # fmt: skip

        return run

    t1, _ = timed(gen(1), warmup=1, repeats=repeats)
    tn, out = timed(gen(n_tokens), warmup=1, repeats=repeats)
    prefill, total = median(t1), median(tn)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": int(out.shape[1] - len(prompt)),
        "prefill_ms": round(prefill * 1000, 2),
        "decode_ms_per_token": round((total - prefill) / max(n_tokens - 1, 1) * 1000, 2),
        "total_ms": round(total * 1000, 1),
        "output_ids": out[0, len(prompt) :].tolist(),
    }


def batched_vs_sequential(models, stage: str | None, prompts: list[list[int]], tokens: int, max_batch: int) -> dict:
    from pipeline.generate import Generator, SamplingParams

    params = SamplingParams(max_new_tokens=tokens)
    out: dict = {}
    for batching in (False, True):
        gen = Generator(models, batching=batching, max_batch_size=max_batch, batch_wait_ms=20)
        try:
            gen.generate(prompts[0], stage=stage, params=SamplingParams(max_new_tokens=4))  # warm-up
            gen.batch_sizes.clear()
            t0 = time.perf_counter()
            if batching:
                handles = [gen.submit(p, stage=stage, params=params) for p in prompts]
                results = [h.result() for h in handles]
            else:
                results = [gen.generate(p, stage=stage, params=params) for p in prompts]
            wall = time.perf_counter() - t0
        finally:
            gen.close()
        n_tok = sum(r.completion_tokens for r in results)
        out["batched" if batching else "sequential"] = {
            "answers": len(results),
            "wall_s": round(wall, 2),
            "answers_per_s": round(len(results) / wall, 3),
            "tokens_per_s": round(n_tok / wall, 1),
            "mean_batch_size": round(statistics.fmean(gen.batch_sizes), 2) if gen.batch_sizes else None,
            "texts": [r.text for r in results],
        }
    seq, bat = out["sequential"]["texts"], out["batched"]["texts"]
    out["identical_outputs"] = sum(a == b for a, b in zip(seq, bat, strict=True))
    out["speedup"] = ratio(out["batched"]["answers_per_s"], out["sequential"]["answers_per_s"])
    return out


def switch_cost(models, prompt: list[int], repeats: int) -> dict:
    from pipeline.generate import Generator, SamplingParams

    names = models.stage_names
    times = []
    for s in names * repeats:
        t0 = time.perf_counter()
        with models.use(s):
            pass
        times.append(time.perf_counter() - t0)
    gen = Generator(models, batching=False)
    params = SamplingParams(max_new_tokens=8)
    pair = names[:2] if len(names) > 1 else names  # the same two stages with and without switching between them
    same, alternating = [], []
    try:
        for s in pair:
            gen.generate(prompt, stage=s, params=params)
            for _ in range(repeats):  # consecutive requests to one stage: no switch
                t0 = time.perf_counter()
                gen.generate(prompt, stage=s, params=params)
                same.append(time.perf_counter() - t0)
        for i in range(repeats * len(pair)):  # every request switches stage
            t0 = time.perf_counter()
            gen.generate(prompt, stage=pair[i % len(pair)], params=params)
            alternating.append(time.perf_counter() - t0)
    finally:
        gen.close()
    return {
        "set_adapter_ms_median": round(median(times) * 1000, 3),
        "request_same_stage_ms": round(median(same) * 1000, 1),
        "request_switching_stage_ms": round(median(alternating) * 1000, 1),
        "switch_overhead_ms": round((median(alternating) - median(same)) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--adapters", default=DEFAULT_ADAPTERS)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--questions", type=int, default=None, help="eval questions answered (default 16, quick 4)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 32, quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default="reports/bench")
    args = ap.parse_args(argv)
    n_q = args.questions or (4 if args.quick else 16)
    tokens = args.tokens or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 5)

    import torch

    from finetune.model import load_base
    from pipeline.stage_models import StageModels, discover_stages

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="raglora-bench-gen-"))
    model_a, tok = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
    adapters = Path(args.adapters)
    adapters_note = str(adapters)
    if not discover_stages(adapters):
        adapters = make_random_adapters(model_a, tmp / "adapters")
        adapters_note = f"random r=16 q,k,v,o adapters (nothing trained under {args.adapters})"
    print(f"[generation] adapters: {adapters_note}", flush=True)
    model_b, _ = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
    t0 = time.perf_counter()
    stacked = StageModels(model_a, tok, adapters, strategy="stack")
    load_stack = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = StageModels(model_b, tok, adapters, strategy="merged")
    load_merged = time.perf_counter() - t0
    deepest = merged.deepest_stage
    first = merged.stage_names[0]
    questions = eval_questions(args.data_dir, n_q)
    prompts = [lora_prompt_ids(tok, q) for q in questions]
    pad = tok.pad_token_id

    # -- per-token latency: base vs merged vs stacked
    print("[generation] per-token latency ...", flush=True)
    latency = {
        "base (plain model)": per_token_latency(merged.base, prompts[0], tokens, pad, repeats=repeats),
        f"merged {deepest}": per_token_latency(merged.merged[deepest], prompts[0], tokens, pad, repeats=repeats),
    }
    chain = len(stacked.stages[deepest].chain)
    for stage, label in ((first, f"stacked {first} (1 adapter)"), (deepest, f"stacked {deepest} ({chain} adapters)")):
        with stacked.use(stage) as m:
            latency[label] = per_token_latency(m, prompts[0], tokens, pad, repeats=repeats)
    base_ms = latency["base (plain model)"]["decode_ms_per_token"]
    merged_out = latency[f"merged {deepest}"]["output_ids"]
    for v in latency.values():
        v["decode_vs_base"] = ratio(v["decode_ms_per_token"], base_ms)
    same_merged_stacked = merged_out == latency[f"stacked {deepest} ({chain} adapters)"]["output_ids"]

    # -- batched vs one at a time (merged copies: the serving default)
    print(f"[generation] batched vs one-at-a-time, {len(prompts)} questions ...", flush=True)
    bvs = batched_vs_sequential(merged, deepest, prompts, tokens, args.max_batch_size)

    # -- adapter switch cost (stacked)
    print("[generation] adapter switch cost ...", flush=True)
    switch = switch_cost(stacked, prompts[0], repeats)

    tables = {
        f"Per-token latency, {args.base}, prompt {len(prompts[0])} tokens, {tokens} new tokens (medians of {repeats})": md_table(
            ["model", "prefill ms", "decode ms/token", "decode vs base"],
            [[k, v["prefill_ms"], v["decode_ms_per_token"], v["decode_vs_base"]] for k, v in latency.items()],
        )
        + f"\n\nMerged and stacked {deepest} give identical greedy tokens: {'yes' if same_merged_stacked else 'NO'}. "
        f"Adapter load: stacked {load_stack:.2f} s, merged copies {load_merged:.2f} s.",
        f"Batched vs one-at-a-time answering ({len(prompts)} eval questions, lora/{deepest}, {tokens} new tokens)": md_table(
            ["", "wall s", "answers/s", "tokens/s", "mean batch"],
            [
                [k, bvs[k]["wall_s"], bvs[k]["answers_per_s"], bvs[k]["tokens_per_s"], bvs[k]["mean_batch_size"]]
                for k in ("sequential", "batched")
            ],  # fmt: skip
        )
        + f"\n\nBatched/sequential: **{bvs['speedup']}x** answers/s; identical greedy outputs: "
        f"{bvs['identical_outputs']}/{len(prompts)}.",
        f"Adapter switch (stacked adapters; requests alternate {' and '.join(stacked.stage_names[:2])} vs stay on one)": md_table(
            ["set_adapter ms", "request same stage ms", "request switching stage ms", "switch overhead ms"],
            [
                [
                    switch["set_adapter_ms_median"],
                    switch["request_same_stage_ms"],
                    switch["request_switching_stage_ms"],
                    switch["switch_overhead_ms"],
                ]
            ],  # fmt: skip
        ),
    }
    for v in latency.values():
        v.pop("output_ids")
    write_report(
        "generation",
        args=vars(args) | {"questions": n_q, "tokens": tokens, "repeats": repeats, "adapters_used": adapters_note},
        results={
            "latency": latency,
            "merged_equals_stacked_tokens": same_merged_stacked,
            "batched_vs_sequential": bvs,
            "adapter_switch": switch,
            "adapter_load_s": {"stack": round(load_stack, 2), "merged": round(load_merged, 2)},
        },
        tables=tables,
        out_dir=args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
