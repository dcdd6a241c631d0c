"""Serving latency/throughput on this machine: TTFT and tokens/s per mode, 1 vs N concurrent clients with
dynamic batching on/off, adapter switch cost, and stacked (unmerged) vs pre-merged stage adapters.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_latency.py [--base packaged:smollm2-135m-instruct]
        [--adapters artifacts/adapters] [--tokens 32] [--clients 8] [--out reports/serve_latency.json]

Without trained adapters under --adapters, random LoRA adapters (r=16 on all linear layers, the finetune
default shape) are made in a temp folder for general → domain → subdomain: speed does not depend on the
weights' values. The index is a small real one (packaged MiniLM embedder) over the first FAQ rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.answer import AnswerService  # noqa: E402
from pipeline.generate import Generator, SamplingParams, StageModels, discover_stages  # noqa: E402

QUESTIONS = [
    "Do I need a building permit for a deck?",
    "How long does it take to get a building permit?",
    "Can I build an attefallshus without a permit?",
    "What does a building permit cost?",
    "Do I need a permit to demolish a shed?",
    "How high can a fence be without a permit?",
    "Can I extend my house without a building permit?",
    "Who decides on building permits?",
]


def make_random_adapters(model, out: Path, stages=("general", "domain", "subdomain")) -> Path:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, stage in enumerate(stages):
        torch.manual_seed(i)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(model), cfg)
        peft_model.save_pretrained(out / stage)
        (out / stage / "manifest.json").write_text(json.dumps({"parents": list(stages[:i]), "method": "lora"}))
        del peft_model
    return out


def build_index(tmp: Path, n_rows: int = 40):
    from pipeline.datasets import load_faq
    from retriever.embedder import load_embedder
    from retriever.index import build_index as build
    from retriever.index import load_index

    rows = load_faq("en")[:n_rows]
    (tmp / "kb").mkdir(parents=True, exist_ok=True)
    (tmp / "kb" / "faq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    emb = load_embedder("packaged:all-MiniLM-L6-v2")
    build([str(tmp / "kb")], tmp / "index", emb, chunk_size=800, chunk_overlap=100)
    return load_index(tmp / "index", emb)


def one(service: AnswerService, question: str, mode: str, stage: str | None, tokens: int) -> dict:
    t0 = time.perf_counter()
    prep = service.prepare(question, [], mode=mode, stage=stage, max_new_tokens=tokens)
    if prep.handoff_reason:  # benchmark generation, not hand-off replies
        prep.handoff_reason = None
    handle = service.start(prep, SamplingParams(max_new_tokens=tokens))
    res = handle.result()
    total = time.perf_counter() - t0
    ttft = handle.first_token_at - t0 if handle.first_token_at else total
    decode_s = total - ttft
    return {
        "prompt_tokens": len(prep.prompt_ids),
        "tokens": res.completion_tokens,
        "ttft_s": ttft,
        "total_s": total,
        "decode_tok_s": (res.completion_tokens - 1) / decode_s if decode_s > 0 and res.completion_tokens > 1 else None,
        "tok_s": res.completion_tokens / total,
    }


def summarize(rows: list[dict]) -> dict:
    def med(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    return {k: med(k) for k in ("prompt_tokens", "tokens", "ttft_s", "total_s", "decode_tok_s", "tok_s")}


def per_mode(service: AnswerService, stage: str | None, tokens: int, reps: int) -> dict:
    out = {}
    for mode in ("base", "rag", "lora", "rag+lora"):
        if not service.mode_available(mode):
            continue
        one(service, QUESTIONS[0], mode, stage, 4)  # warm-up
        rows = [one(service, QUESTIONS[i % len(QUESTIONS)], mode, stage, tokens) for i in range(reps)]
        out[mode] = summarize(rows)
        print(f"  {mode:9s} {out[mode]}", flush=True)
    return out


def concurrent(service: AnswerService, clients: int, per_client: int, tokens: int, mode: str = "rag") -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):
            r = one(service, QUESTIONS[(i + j) % len(QUESTIONS)], mode, None, tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n_tokens = sum(r["tokens"] for r in results)
    sizes = service.generator.batch_sizes
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(n_tokens / wall, 1),
        "median_latency_s": round(statistics.median(r["total_s"] for r in results), 3),
        "median_ttft_s": round(statistics.median(r["ttft_s"] for r in results), 3),
        "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--cache-dir", default="artifacts/base")
    ap.add_argument("--adapters", default="artifacts/adapters")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="reports/serve_latency.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from finetune.model import load_base

    tmp = Path(tempfile.mkdtemp(prefix="raglora-bench-"))
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}, "args": vars(args)}
    t = time.perf_counter()
    model, tok = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
    report["load_base_s"] = round(time.perf_counter() - t, 2)
    adapters = Path(args.adapters)
    if not discover_stages(adapters):
        adapters = make_random_adapters(model, tmp / "adapters")
        report["adapters"] = "random r=16 all-linear (none trained)"
    else:
        report["adapters"] = str(adapters)
    index = build_index(tmp)

    def service_for(strategy: str, batching: bool) -> AnswerService:
        m, _ = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
        t0 = time.perf_counter()
        models = StageModels(m, tok, adapters, strategy=strategy)
        load_s = time.perf_counter() - t0
        gen = Generator(models, batching=batching, max_batch_size=args.clients, batch_wait_ms=10)
        svc = AnswerService(gen, index, retrieval={"k": 3, "mode": "hybrid"}, handoff_threshold=None)
        svc.adapter_load_s = load_s
        return svc

    del model
    stack = service_for("stack", batching=True)
    stage = stack.models.deepest_stage
    report["adapter_load_s"] = {"stack": round(stack.adapter_load_s, 2)}
    print(f"per mode, stacked adapters, stage {stage}, {args.tokens} new tokens:", flush=True)
    report["per_mode_stack"] = per_mode(stack, stage, args.tokens, args.reps)

    # adapter switch cost: the set_adapter call itself, and a request that switches vs one that does not
    p = stack.prepare(QUESTIONS[0], [], mode="lora", stage=stage, max_new_tokens=8).prompt_ids
    switch_times = []
    for s in ["general", "domain", "subdomain"] * 5:
        t0 = time.perf_counter()
        with stack.models.use(s):
            pass
        switch_times.append(time.perf_counter() - t0)
    same, alternating = [], []
    for i in range(6):
        t0 = time.perf_counter()
        stack.generator.generate(p, stage=stage, params=SamplingParams(max_new_tokens=8))
        same.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stack.generator.generate(p, stage=["general", "domain"][i % 2], params=SamplingParams(max_new_tokens=8))
        alternating.append(time.perf_counter() - t0)
    report["adapter_switch"] = {
        "set_adapter_ms_median": round(statistics.median(switch_times) * 1000, 3),
        "request_same_stage_s": round(statistics.median(same), 4),
        "request_switching_stage_s": round(statistics.median(alternating), 4),
    }
    print("adapter switch:", report["adapter_switch"], flush=True)

    print("concurrency (rag mode), stacked adapters:", flush=True)
    report["concurrency"] = {}
    for batching in (True, False):
        stack.generator.close()
        stack.generator = Generator(stack.models, batching=batching, max_batch_size=args.clients, batch_wait_ms=10)
        for clients in (1, args.clients):
            stack.generator.batch_sizes.clear()
            r = concurrent(stack, clients, args.per_client if clients > 1 else args.reps, args.tokens)
            key = f"batching_{'on' if batching else 'off'}_{clients}_clients"
            report["concurrency"][key] = r
            print(f"  {key}: {r}", flush=True)
    stack.close()

    merged = service_for("merged", batching=True)
    report["adapter_load_s"]["merged"] = round(merged.adapter_load_s, 2)
    print("per mode, pre-merged copy per stage:", flush=True)
    report["per_mode_merged"] = per_mode(merged, stage, args.tokens, args.reps)
    merged.close()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
