"""LoRA training throughput and memory: our trainer (finetune/train.py's loop, called as finetune/stages.py calls
it) against the best-configured peers - TRL's SFTTrainer padding-free, transformers.Trainer + PEFT with its
length-grouped sampler - and the Trainer at its defaults; same model, data, LoRA settings, batch size, lr and
seed; plus full fine-tuning vs LoRA (time, memory).

    .venv/bin/python -m bench.train_throughput [--quick] [--workloads stage,plain] [--steps 6] [--sides ...]

Each side runs in its own subprocess (clean peak RSS), every one on the allocator `raglora finetune` runs on
(`finetune.allocator`), so the ratios compare trainers, not mallocs. Throughput = real (non-padding) tokens /
wall seconds of the training call (our `train_loop(...)` vs `trainer.train()`); every side gets the same
warm-up (one forward+backward on the same examples, gradients dropped) first.

Loss equality is judged on a full epoch of the config's last stage (every side sees every example once), by
the same function (`finetune.train.evaluate_loss`) over the same validation examples: a peer that ends more
than 2 % from ours fails the comparison and gets no speed figure. Two speed workloads, built by the functions
finetune/stages.py trains with: "stage" is a stage as `raglora finetune` runs it (RAFT contexts from the
index, replay; needs `make index`), "plain" the same Q/A rows without contexts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_BASE,
    DEFAULT_CACHE,
    DEFAULT_INDEX,
    REPO,
    child_env,
    md_table,
    ratio,
    report_peak_rss,
    run_measured,
    write_report,
)
from finetune.allocator import preload_env, resolve_allocator

SIDES = {
    "ours": "ours: raglora finetune's loop (length-grouped batches, fused head on trained positions only)",
    "ours-packed": "ours with finetune.packing: true (a batch packed into rows, no cross-example attention)",
    "trl": "peer: TRL SFTTrainer, padding-free, loss on the answers only",
    "hf-grouped": "peer: transformers.Trainer + PEFT with its length-grouped sampler",
    "hf": "transformers.Trainer + PEFT at its defaults (random batches)",
    "ours-system": "ours on the C library's malloc (finetune.allocator: system) - ablation",
    "ours-full": "ours, full fine-tuning (all weights, fp32 AdamW)",
    "ours-lora-short": "ours, LoRA, same short run as full fine-tuning",
}


# ---------------------------------------------------------------------------------------------- worker


def _stage_config(args):
    """(finetune config, index of the stage, the stage) named by args.stage in args.config."""
    from pipeline.config import load_config

    cfg = load_config(args.config).finetune
    names = [s.name for s in cfg.stages]
    if args.stage not in names:
        raise SystemExit(f"--stage {args.stage!r} is not a stage of {args.config} (stages: {', '.join(names)})")
    i = names.index(args.stage)
    return cfg, i, cfg.stages[i]


def default_stages(config: str | Path) -> tuple[str, str]:
    """(speed stage, epoch stage): the first retrieval-aware stage (else the first), and the last stage, which in
    a general -> domain -> subdomain chain is the small one a full epoch of fits in the benchmark."""
    from pipeline.config import load_config

    stages = load_config(config).finetune.stages
    if not stages:
        raise SystemExit(f"{config} defines no finetune stages")
    speed = next((s for s in stages if s.raft), stages[0])
    return speed.name, stages[-1].name


def _prepare(args):
    """(model, tokenizer, train examples, validation examples), built by the functions finetune/stages.py uses.

    Workload "stage": args.stage exactly as `raglora finetune` trains it (RAFT contexts from the index when the
    stage has raft, replay of earlier stages' rows). Workload "plain": the same Q/A rows without contexts or
    replay. The model is the bare base (the stage's parents are not merged in: speed and memory do not depend
    on them). With args.epoch, args.steps becomes one epoch of the training examples.
    """
    import torch

    from finetune.model import load_base
    from finetune.prompt import load_system_prompt
    from finetune.stages import _open_index, _val_examples, stage_examples, stage_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base(args.base, cache_dir=args.cache_dir, device="cpu", dtype="float32")
    cfg, i, stage = _stage_config(args)
    prompts = {
        "plain": load_system_prompt(None, with_context=False),
        "rag": load_system_prompt(None, with_context=True),
    }
    rows, replay, _ = stage_rows(i, stage, cfg=cfg, data_dir=Path(args.data_dir), cache={})
    if args.workload == "plain":
        stage, replay = stage.model_copy(update={"raft": False}), []
    if args.train_rows:
        rows, replay = rows[: args.train_rows], replay[: args.train_rows // 4]
    index = _open_index(args.index, stage) if stage.raft else None
    train = stage_examples(
        stage, rows, replay, seed=cfg.seed, tok=tok, prompts=prompts, max_length=args.max_length, index=index
    )[0]
    del index  # not needed while training: raglora finetune puts it aside too (RunContext.put_retrieval_aside)
    val = _val_examples(
        stage, data_dir=Path(args.data_dir), tok=tok, prompts=prompts, max_length=args.max_length,
        limit=args.val_examples, cache={},
    )  # fmt: skip
    if args.epoch:
        args.steps = -(-len(train) // args.batch_size)
    return model, tok, train, val


def _random_batch_efficiency(train: list[dict], batch_size: int, seed: int) -> float:
    """Padding efficiency of random batches over a whole epoch: what the short baseline run samples from."""
    from finetune.data import padding_efficiency, plan_batches

    lengths = [e["length"] for e in train]
    plan = plan_batches(lengths, batch_size, -(-len(lengths) // batch_size), seed=seed, group_by_length=False)
    return padding_efficiency(lengths, plan)


def _lora_settings(method: str = "lora"):
    from finetune.config import FinetuneConfig

    return FinetuneConfig().lora.model_copy(update={"method": method})


def _val_loss(model, val, pad_id: int) -> float:
    from accelerate import Accelerator

    from finetune.train import CausalLMLoss, evaluate_loss

    loss_module = model if isinstance(model, CausalLMLoss) else CausalLMLoss(model)
    return evaluate_loss(loss_module, val, accelerator=Accelerator(cpu=True), batch_size=16, pad_id=pad_id)


def worker_ours(args, method: str = "lora", packing: bool = False) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from finetune.allocator import active_allocator
    from finetune.config import FinetuneConfig, StageConfig
    from finetune.data import collate
    from finetune.model import apply_method
    from finetune.train import CausalLMLoss, train_loop, tune_cpu_malloc

    ft_cfg = FinetuneConfig(packing=packing)
    accelerator = Accelerator(cpu=True)
    if active_allocator() == "system":
        tune_cpu_malloc()  # as run_finetune does on CPU
    model, tok, train, val = _prepare(args)
    set_seed(ft_cfg.seed)
    model = apply_method(model, _lora_settings(method))
    loss_module = CausalLMLoss(model)
    # warm-up: one forward+backward on the first batch_size examples, gradients dropped
    loss_sum, n = loss_module(**{k: v for k, v in collate(train[: args.batch_size], pad_id=tok.pad_token_id).items()
                                  if k in ("input_ids", "labels", "attention_mask")})  # fmt: skip
    (loss_sum / n).backward()
    model.zero_grad(set_to_none=True)
    # --epoch: one epoch as ours plans it (every example once), not a step count
    stage = StageConfig(
        name=args.stage, max_steps=None if args.epoch else args.steps, epochs=1, lr=args.lr, batch_size=args.batch_size
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_loop(
            stage=args.stage, loss_module=loss_module, train_examples=train, stage_cfg=stage, ft_cfg=ft_cfg,
            accelerator=accelerator, pad_id=tok.pad_token_id, max_length=args.max_length, ckpt_root=Path(tmp) / "ck",
            config_hash="bench", resume=False, seed=ft_cfg.seed,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        losses = [json.loads(line)["loss"] for line in result["log_path"].read_text().splitlines() if line]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        **{k: result[k] for k in ("weights_mb", "grads_and_adam_mb", "saved_activations_mb", "tensor_mb")},
        "steps": result["optimizer_steps"],
        "real_tokens": result["train_tokens"],
        "padded_tokens": round(result["train_tokens"] / result["padding_efficiency"]),
        "wall_s": wall,
        "loop_tokens_per_s": result["tokens_per_s"],
        "step_losses": losses,
        "val_loss": _val_loss(result["model"], val, tok.pad_token_id) if val else None,
        "trainable_params": trainable,
    }


def grouping_args(training_arguments) -> dict:
    """The Trainer's length-grouped sampler, spelled as the installed transformers spells it."""
    import inspect

    params = inspect.signature(training_arguments).parameters
    if "train_sampling_strategy" in params:  # transformers 5
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _peft_lora(model):
    """The peers' LoRA: PEFT's get_peft_model with our default LoRA settings (ours applies the same via
    finetune.model.apply_method)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = _lora_settings()
    return get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=list(lora.target_modules),
        ),
    )


def _peer_arguments(args, output_dir: str, **extra) -> dict:
    """TrainingArguments fields shared by every transformers-based peer: the same schedule, lr, steps (or one
    epoch) and seed as ours (cosine, 10 % warm-up, no weight decay, clip 1.0)."""
    from finetune.config import FinetuneConfig

    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=-1 if args.epoch else args.steps,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=FinetuneConfig().seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


class TokenCounter:
    """Wraps a peer's collator and records (real tokens, token slots) of every batch it builds."""

    def __init__(self, collate_fn):
        self.collate_fn, self.counts = collate_fn, []

    def __call__(self, features, *a, **kw):
        batch = self.collate_fn(features, *a, **kw)
        self.counts.append((sum(len(f["input_ids"]) for f in features), int(batch["input_ids"].numel())))
        return batch


def _run_peer(trainer, counter: TokenCounter, model, val, args, pad_id: int, extra: dict) -> dict:
    """Warm-up (one forward+backward on the first batch, as ours gets), then trainer.train(), timed."""
    import torch

    warm = counter.collate_fn([trainer.train_dataset[i] for i in range(args.batch_size)])
    model(**warm).loss.backward()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    used = counter.counts[: out.global_step]  # the dataloader may build one batch ahead
    with torch.no_grad():
        val_loss = _val_loss(model, val, pad_id)
    return {
        "steps": int(out.global_step),
        "real_tokens": sum(c[0] for c in used),
        "padded_tokens": sum(c[1] for c in used),
        "wall_s": wall,
        "trainer_runtime_s": out.metrics.get("train_runtime"),
        "step_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "val_loss": val_loss,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **extra,
    }


def worker_hf(args, grouped: bool = False) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from finetune.config import FinetuneConfig

    ft_cfg = FinetuneConfig()
    model, tok, train, val = _prepare(args)
    set_seed(ft_cfg.seed)
    model = _peft_lora(model)
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * e["length"], "labels": e["labels"]} for e in train]
    counter = TokenCounter(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(**_peer_arguments(args, tmp, **(grouping_args(TrainingArguments) if grouped else {})))
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counter)
        extra = {
            "optim": targs.optim if isinstance(targs.optim, str) else targs.optim.value,
            "epoch_random_padding_efficiency": round(_random_batch_efficiency(train, args.batch_size, ft_cfg.seed), 3),
        }
        return _run_peer(trainer, counter, model, val, args, tok.pad_token_id, extra)


def trl_missing() -> str | None:
    """Why the TRL row cannot run here, or None: the peer is optional (`pip install -e '.[bench]'`)."""
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        return f"trl is not installed ({exc}); pip install -e '.[bench]' adds it"
    return None


def worker_trl(args) -> dict:
    """TRL's SFTTrainer at its best on this data: padding-free batches (examples concatenated into one row with
    position_ids restarting at 0, which transformers turns into a block-diagonal mask, so no cross-example
    attention), loss on the answer tokens only (our labels), and its fused LM head over labelled positions."""
    import trl
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from finetune.config import FinetuneConfig

    model, tok, train, val = _prepare(args)
    set_seed(FinetuneConfig().seed)
    model = _peft_lora(model)
    data = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train])
    with tempfile.TemporaryDirectory() as tmp:
        # max_length=None: the examples are already cut to --max-length, as TRL asks for padding-free without packing
        cfg = SFTConfig(**_peer_arguments(args, tmp, padding_free=True, max_length=None, completion_only_loss=True))
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter  # read when train() builds its dataloader
        return _run_peer(trainer, counter, model, val, args, tok.pad_token_id, {"trl_version": trl.__version__})


#: side -> worker function (subprocess and in-process runs dispatch through this one table)
WORKERS = {
    "ours": worker_ours,
    "ours-packed": lambda args: worker_ours(args, packing=True),
    "ours-full": lambda args: worker_ours(args, method="full"),
    "trl": worker_trl,
    "hf-grouped": lambda args: worker_hf(args, grouped=True),
    "hf": worker_hf,
}


def worker_main(args) -> None:
    from finetune.allocator import active_allocator

    res = WORKERS[args.worker](args) | {"allocator": active_allocator()}
    Path(args.result).write_text(json.dumps(res))
    report_peak_rss()


# ---------------------------------------------------------------------------------------------- parent

#: the peers ours is compared with, best-configured first
PEERS = ("trl", "hf-grouped", "hf")
#: validation losses of two sides after the same examples count as equal within this relative difference
LOSS_BOUND = 0.02
#: ours' peak RSS over its counted tensor memory
RSS_GOAL = 1.3


def run_side(side: str, args, *, workload: str, stage: str, steps: int, lr: float, epoch: bool = False) -> dict:
    """One side in its own process (clean peak RSS); {"skipped": reason} when its library is not installed."""
    if side == "trl" and (why := trl_missing()):
        print(f"[train] {workload}: {side} skipped: {why}", flush=True)
        return {"skipped": why}
    worker = "ours" if side in ("ours-lora-short", "ours-system") else side
    if side in ("ours-lora-short", "ours-full"):  # only time and memory are compared there
        args = argparse.Namespace(**{**vars(args), "val_examples": 0})
    sub = {"worker": worker, "workload": workload, "stage": stage, "steps": steps, "lr": lr, "epoch": epoch}
    if args.in_process:  # smoke tests: no subprocess, peak RSS not isolated
        return _finish(
            side,
            WORKERS[worker](argparse.Namespace(**{**vars(args), **sub})),
            {"peak_rss_mb": None, "wall_s": float("nan")},
        )
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "bench.train_throughput", "--worker", worker, "--result", str(result),
            "--workloads", workload, "--stage", stage, "--steps", str(steps), "--lr", str(lr),
            "--batch-size", str(args.batch_size), "--config", str(args.config), "--base", args.base,
            "--cache-dir", args.cache_dir, "--index", args.index, "--data-dir", args.data_dir,
            "--max-length", str(args.max_length), "--val-examples", str(args.val_examples),
        ] + (["--train-rows", str(args.train_rows)] if args.train_rows else []) + (["--epoch"] if epoch else [])  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(
            f"[train] {workload} / {stage}: running {side} ({'one epoch' if epoch else f'{steps} steps'}) ...",
            flush=True,
        )
        lib = None if side == "ours-system" else resolve_allocator(args.allocator)
        run = run_measured(cmd, env=preload_env(lib, child_env()), timeout=3600)
        if run["rc"] != 0 or not result.is_file():
            raise RuntimeError(f"worker {side} failed (rc {run['rc']}):\n{run['stderr'][-3000:]}")
        res = json.loads(result.read_text())
    return _finish(side, res, run)


def _finish(side: str, res: dict, run: dict) -> dict:
    res.update(peak_rss_mb=run["peak_rss_mb"], process_wall_s=round(run["wall_s"], 1))
    res["tokens_per_s"] = round(res["real_tokens"] / res["wall_s"], 1)
    res["padding_efficiency"] = round(res["real_tokens"] / res["padded_tokens"], 3)
    res["s_per_step"] = round(res["wall_s"] / res["steps"], 2)
    res["final_step_loss"] = res["step_losses"][-1] if res["step_losses"] else None
    if "tensor_mb" in res:
        res["peak_rss_over_tensors"] = ratio(res["peak_rss_mb"], res["tensor_mb"])
    print(f"[train] {side}: {res['tokens_per_s']} tok/s, val loss {res['val_loss']}, "
          f"peak RSS {res['peak_rss_mb']} MB", flush=True)  # fmt: skip
    return res


def _ran(r: dict) -> bool:
    return "skipped" not in r


WORKLOADS = {
    "stage": "the stage as `raglora finetune` trains it (RAFT contexts, replay of earlier stages)",
    "plain": "the stage's Q/A pairs only (no contexts, no replay)",
}


#: ours / best peer, real tokens/s: the stage workload is where our batching and loss should pay most
GOALS = {"stage": 1.5, "plain": 1.2}


def loss_check(res: dict) -> dict:
    """Every side's validation loss after one epoch against ours: equal within LOSS_BOUND, or the comparison with
    that side fails (its speed figures are then not reported as such)."""
    ours = res["ours"]["val_loss"]
    out = {}
    for side, r in res.items():
        if side == "ours" or not _ran(r):
            continue
        diff = (r["val_loss"] - ours) / ours
        out[side] = {"val_loss": r["val_loss"], "rel_diff_vs_ours": round(diff, 4), "equal": abs(diff) <= LOSS_BOUND}
    return out


def compare(res: dict, goal: float, equality: dict | None = None) -> dict:
    """Ours against every peer that ran and trains to the same loss (per `equality`, the full-epoch check), and
    against the fastest of those: the best-configured peer."""
    ours = res["ours"]
    peers: dict = {}
    for side in PEERS:
        r = res.get(side)
        if r is None:
            continue
        if not _ran(r):
            peers[side] = {"speedup": None, "status": f"skipped: {r['skipped']}"}
        elif equality is not None and side in equality and not equality[side]["equal"]:
            peers[side] = {"speedup": None, "status": (
                f"comparison FAILED: validation loss {equality[side]['rel_diff_vs_ours']:+.1%} from ours after one "
                f"epoch (bound {LOSS_BOUND:.0%}), so no speed figure")}  # fmt: skip
        else:
            status = "loss equal after one epoch" if equality is not None else "loss equality not checked"
            peers[side] = {"speedup": ratio(ours["tokens_per_s"], r["tokens_per_s"]), "status": status}
    valid = [side for side in peers if peers[side]["speedup"] is not None]
    best = max(valid, key=lambda side: res[side]["tokens_per_s"]) if valid else None
    speedup = peers[best]["speedup"] if best else None
    packed = res.get("ours-packed")
    return {
        "best_peer": best,
        "speedup_tokens_per_s": speedup,
        "goal_speedup": goal,
        "speedup_goal_met": bool(speedup and speedup >= goal),
        "peers": peers,
        "packed_over_unpacked": ratio(packed["tokens_per_s"], ours["tokens_per_s"])
        if packed and _ran(packed)
        else None,
        "ours_peak_rss_over_tensors": ours.get("peak_rss_over_tensors"),
        "rss_goal": RSS_GOAL,
        "baseline_epoch_random_padding_efficiency": res.get("hf", {}).get("epoch_random_padding_efficiency"),
    }


def _side_rows(res: dict, ours_tps: float) -> list[list]:
    rows = []
    for side, r in res.items():
        if not _ran(r):
            rows.append([SIDES[side], "skipped", r["skipped"], "", "", "", "", "", "", ""])
            continue
        rows.append([SIDES[side], r["steps"], r["real_tokens"], r["padding_efficiency"], r["wall_s"],
                     r["tokens_per_s"], ratio(ours_tps, r["tokens_per_s"]) if side != "ours" else "",
                     r["val_loss"], r["peak_rss_mb"], r.get("tensor_mb", "")])  # fmt: skip
    return rows


_HEADERS = ["side", "steps", "real tokens", "padding eff.", "train wall s", "real tok/s", "ours / side",
            "val loss after", "peak RSS MB", "counted tensors MB"]  # fmt: skip


def _speed_lines(summary: dict) -> str:
    best = summary["best_peer"]
    if best:
        head = (
            f"Ours / best peer ({SIDES[best]}), real tokens/s: **{summary['speedup_tokens_per_s']}x** (goal >= "
            f"{summary['goal_speedup']}x: {'met' if summary['speedup_goal_met'] else 'NOT met'})."
        )
    else:
        head = "No peer gives a valid comparison (each was skipped or trains to another loss)."
    lines = [head] + [f"- {side}: {p['speedup']}x, {p['status']}" for side, p in summary["peers"].items()]
    if summary["packed_over_unpacked"]:
        lines.append(f"- ours with packing / ours without: {summary['packed_over_unpacked']}x")
    return "\n".join(lines)


def throughput_table(workload: str, stage: str, res: dict, summary: dict, args, steps: int) -> tuple[str, str]:
    title = (
        f"LoRA training throughput, stage `{stage}`: {WORKLOADS[workload]} ({args.base}, batch {args.batch_size}, "
        f"{steps} steps, CPU fp32)"
    )
    lines = [md_table(_HEADERS, _side_rows(res, res["ours"]["tokens_per_s"])), "", _speed_lines(summary)]
    if summary["ours_peak_rss_over_tensors"]:
        lines.append(
            f"- ours' peak RSS is {summary['ours_peak_rss_over_tensors']}x its counted tensors (weights, LoRA "
            f"gradients and AdamW moments, activations saved for backward on the longest batch; goal <= {RSS_GOAL}x), "
            f"on the {res['ours'].get('allocator', '?')} allocator"
        )
    if "ours-system" in res:
        r = res["ours-system"]
        lines.append(f"- on the C library's malloc instead, ours peaks at {r.get('peak_rss_over_tensors')}x its counted "
                     f"tensors at {r['tokens_per_s']} real tokens/s")  # fmt: skip
    lines.append(
        f"\nValidation loss after {steps} steps is a sanity check only: loss equality is judged after a full epoch "
        f"(the loss-equality table). Random batches over a whole epoch of this data pad at "
        f"{summary['baseline_epoch_random_padding_efficiency']} efficiency."
    )
    return title, "\n".join(lines)


def equality_table(stage: str, res: dict, check: dict, summary: dict, args) -> tuple[str, str]:
    title = f"Loss equality: one full epoch of stage `{stage}` per side ({args.base}, batch {args.batch_size})"
    rows = []
    for side, r in res.items():
        if not _ran(r):
            rows.append([SIDES[side], "skipped", r["skipped"], "", "", ""])
            continue
        c = check.get(side)
        verdict = "reference" if side == "ours" else ("equal" if c["equal"] else "DIVERGES")
        rows.append([SIDES[side], r["steps"], r["real_tokens"], r["tokens_per_s"], r["val_loss"],
                     f"{c['rel_diff_vs_ours']:+.2%} {verdict}" if c else verdict])  # fmt: skip
    text = md_table(["side", "steps", "real tokens", "real tok/s", "val loss after", "vs ours"], rows)
    speed = _speed_lines(summary)
    return title, text + (
        f"\n\nEvery side trains on exactly the same examples, each once, so this is also the like-for-like speed "
        f"comparison:\n\n{speed}\n\nA side whose validation loss differs from ours by more than {LOSS_BOUND:.0%} "
        "fails the comparison: its speed ratios are withheld, here and in the tables below."
    )


def summarize(results: dict, args) -> dict[str, str]:
    """Judge the measured sides (loss equality, speed-ups, memory) into `results` and return the report's
    tables; `--from-json` re-runs this on a saved report without measuring again."""
    tables: dict[str, str] = {}
    check = None
    if "equality" in results:
        eq = results["equality"]
        check = eq["check"] = loss_check(eq["sides"])
        eq["summary"] = compare(eq["sides"], GOALS["stage"], check)
        title, text = equality_table(eq["stage"], eq["sides"], check, eq["summary"], args)
        tables[title] = text
    for wl, entry in results["workloads"].items():
        entry["summary"] = compare(entry["sides"], GOALS[wl], check)
        title, text = throughput_table(wl, entry["stage"], entry["sides"], entry["summary"], args, args.steps)
        tables[title] = text
    if "full_vs_lora" in results:
        fvl = results["full_vs_lora"]
        lo, fu, full_steps = fvl["lora"], fvl["full"], fvl.get("steps", 2)
        fvl.update(
            full_over_lora_peak_rss=ratio(fu["peak_rss_mb"], lo["peak_rss_mb"]),
            full_over_lora_s_per_step=ratio(fu["s_per_step"], lo["s_per_step"]),
            full_over_lora_tensor_mb=ratio(fu["tensor_mb"], lo["tensor_mb"]),
        )
        title = f"Full fine-tuning vs LoRA (ours, {WORKLOADS[fvl['workload']]}, {full_steps} steps of batch {args.batch_size})"
        tables[title] = md_table(
            [
                "method",
                "trainable params",
                "s/step",
                "real tok/s",
                "weights MB",
                "grads + AdamW MB",
                "saved activations MB",
                "tensor total MB",
                "peak RSS MB",
            ],
            [
                [
                    name,
                    r["trainable_params"],
                    r["s_per_step"],
                    r["tokens_per_s"],
                    r["weights_mb"],
                    r["grads_and_adam_mb"],
                    r["saved_activations_mb"],
                    r["tensor_mb"],
                    r["peak_rss_mb"],
                ]
                for name, r in (("LoRA r=16 q,k,v,o", lo), ("full", fu))
            ],
        ) + (  # fmt: skip
            f"\n\nFull/LoRA: {fvl['full_over_lora_s_per_step']}x time per step, "
            f"{fvl['full_over_lora_tensor_mb']}x tensor memory (weights + gradients + AdamW state + activations "
            f"saved for backward on the first, longest batch), {fvl['full_over_lora_peak_rss']}x peak RSS."
        )
    return tables


def rerender(path: str | Path) -> int:
    """Re-judge and re-tabulate a saved report in place (its measurements, machine and command unchanged)."""
    from raglora.files import atomic_write_text

    doc = json.loads(Path(path).read_text())
    doc["tables"] = summarize(doc["results"], argparse.Namespace(**doc["args"]))
    doc["rendered"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    for title, table in doc["tables"].items():
        print(f"\n### {title}\n\n{table}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="3 steps, stage workload, no epoch or full-FT run (a few minutes)"
    )
    ap.add_argument("--workloads", default=None, help="comma-separated: stage,plain (default both; quick: stage)")
    ap.add_argument("--sides", default=None, help="comma-separated, ours first, of: ours,ours-packed,ours-system,"
                    f"{','.join(PEERS)} (default all but ours-system; a full run adds it to the stage workload)")  # fmt: skip
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"), help="project config with the stages")
    ap.add_argument("--stage", default=None, help="stage of the speed runs (default: the first with raft: true)")
    ap.add_argument("--epoch-stage", default=None, help="stage trained for one full epoch per side to check loss "
                    "equality (default: the config's last stage)")  # fmt: skip
    ap.add_argument("--no-epoch", action="store_true", help="skip the full-epoch loss equality run")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 6, quick 3)")
    ap.add_argument("--full-steps", type=int, default=None, help="steps of the full-FT vs LoRA run (default 2)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=8e-4, help="LoRA learning rate")
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--val-examples", type=int, default=49)
    ap.add_argument("--train-rows", type=int, default=None, help="use only the first N training rows (smoke tests)")
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--index", default=DEFAULT_INDEX, help="index the stage workload draws RAFT contexts from")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--allocator", default=None, help="malloc every side runs on (default: the config's "
                    "finetune.allocator, as raglora finetune runs)")  # fmt: skip
    ap.add_argument(
        "--no-full", action="store_true", help="skip full fine-tuning vs LoRA (plain workload; --quick skips it too)"
    )
    ap.add_argument("--out-dir", default="reports/bench")
    ap.add_argument("--in-process", action="store_true", help="run the sides in this process (smoke tests)")
    ap.add_argument("--from-json", metavar="REPORT", help="re-judge and re-tabulate a saved train_throughput.json "
                    "in place, measuring nothing")  # fmt: skip
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--epoch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)
    workloads = (args.workloads or ("stage" if args.quick else "stage,plain")).split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    sides = (args.sides or f"ours,ours-packed,{','.join(PEERS)}").split(",")
    if "ours" not in sides or set(sides) - {"ours", "ours-packed", "ours-system", *PEERS}:
        ap.error(f"--sides must include ours and name only: ours, ours-packed, ours-system, {', '.join(PEERS)}")
    if args.worker:
        args.steps, args.workload = args.steps or 10, workloads[0]
        worker_main(args)
        return 0
    speed_stage, epoch_stage = default_stages(args.config)
    if args.allocator is None:
        from pipeline.config import load_config

        args.allocator = load_config(args.config).finetune.allocator
    args.stage, args.epoch_stage = args.stage or speed_stage, args.epoch_stage or epoch_stage
    steps = args.steps or (3 if args.quick else 6)
    results: dict = {"workloads": {}}
    if not (args.no_epoch or args.quick):
        # on the first workload: the stage as finetune trains it, unless only "plain" was asked for
        eq = {s: run_side(s, args, workload=workloads[0], stage=args.epoch_stage, steps=0, lr=args.lr, epoch=True)
              for s in sides}  # fmt: skip
        results["equality"] = {"stage": args.epoch_stage, "sides": eq}
    for wl in workloads:
        # a full run also shows the allocator's effect on the memory goal: ours on glibc's malloc
        wl_sides = sides + (["ours-system"] if wl == "stage" and not (args.quick or args.sides) else [])
        res = {s: run_side(s, args, workload=wl, stage=args.stage, steps=steps, lr=args.lr) for s in wl_sides}
        results["workloads"][wl] = {"stage": args.stage, "sides": res}
    if not (args.no_full or args.quick):
        wl, full_steps = "plain", args.full_steps or 2
        lo = run_side("ours-lora-short", args, workload=wl, stage=args.stage, steps=full_steps, lr=args.lr)
        fu = run_side("ours-full", args, workload=wl, stage=args.stage, steps=full_steps, lr=args.full_lr)
        results["full_vs_lora"] = {"workload": wl, "steps": full_steps, "lora": lo, "full": fu}
    run_args = {k: v for k, v in vars(args).items() if k not in ("worker", "result")} | {"steps": steps}
    tables = summarize(results, argparse.Namespace(**run_args))
    write_report(
        "train_throughput",
        args=run_args,
        results=results,
        tables=tables,
        out_dir=args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
