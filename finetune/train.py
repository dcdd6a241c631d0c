"""The training loop of one stage: plain torch + accelerate (DDP under torchrun / accelerate launch).

Why not `transformers.Trainer`: batches here are length-grouped (or packed) and padded only to the batch's
longest row, the loss is computed from the hidden states of trained (assistant) positions only, so the
49k-way vocabulary projection is skipped for the prompt tokens, and tokens/s counts real tokens only.

Checkpoints (`<adapters_dir>/.checkpoints/<stage>/step-N/`) hold the trainable weights, optimizer, scheduler,
RNG states, the step and the batch plan; `resume` continues from the newest one so the loss curve continues.
One is written every `finetune.save_steps` optimizer steps when set, else every `finetune.save_minutes` of
wall time, so a SIGKILL costs at most that much of a stage whatever its length (and on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune.data import IGNORE_INDEX, collate, padding_efficiency, plan_batches
from raglora.errors import RagloraError
from raglora.files import atomic_replace_dir

log = logging.getLogger(__name__)

#: config attributes that change the logits after lm_head: use the model's own forward then.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class TrainingInterrupted(RagloraError):
    """Ctrl-C during a stage: a checkpoint was saved and `--resume` continues."""


#: bytes of one chunk of (positions x vocabulary) logits in the fused head loss
HEAD_CHUNK_BYTES = 32 * 2**20


class ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, a chunk of positions at a time,
    with the gradients computed in the same pass: the (positions x vocabulary) logits never exist in full, in
    forward or backward. With a 49k vocabulary they were the largest tensors of a step, held three times over
    (log-softmax saved for backward, its gradient, the logits' gradient), and not needed once a chunk's
    gradient is known. The fused linear cross-entropy of Liger-Kernel, also behind TRL's fused LM head.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(t), device=g.device), t] -= 1  # d(loss)/d(logits)
            g = g.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.grads
        del ctx.grads
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return *scaled, None, None


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the LM head on `hidden` rows: chunked and fused for a plain nn.Linear head, the
    module's own forward otherwise (a quantised or adapted head)."""
    if type(head) is torch.nn.Linear:
        chunk = max(1, HEAD_CHUNK_BYTES // (4 * head.out_features))
        return ChunkedHeadLoss.apply(hidden, head.weight, head.bias, targets, chunk)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM (PEFT or plain): forward(batch) -> (sum of token losses, number of target tokens).

    Fast path: run the decoder body, then the LM head only on positions whose next token is a target, fused
    with the loss a chunk at a time (`head_loss`). Prompt-learning methods (virtual tokens) and models with logit post-processing use the full forward.
    """

    def __init__(self, model, *, prompt_learning: bool = False, keep_padding_mask: bool = False):
        super().__init__()
        self.model = model
        self.keep_padding_mask = keep_padding_mask
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = None
        self._head = None
        cfg = getattr(inner, "config", None)
        if not prompt_learning and not any(getattr(cfg, a, None) for a in _LOGIT_POSTPROCESSING):
            try:
                self._decoder = inner.get_decoder()
                self._head = inner.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                self._decoder = self._head = None
            if self._decoder is None or self._head is None or self._decoder is inner:
                self._decoder = self._head = None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        sel = targets != IGNORE_INDEX
        kwargs = {"input_ids": input_ids, "use_cache": False}
        # Batches are right-padded, so under causal attention no real token can see a pad token: the padding
        # mask changes nothing for the positions that have targets. Leaving it out lets SDPA take its fused
        # causal kernel instead of materialising a 4D mask (much faster and leaner on CPU).
        if attention_mask is not None and (self._decoder is None or self.keep_padding_mask):
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._decoder is not None:
            hidden = self._decoder(**kwargs).last_hidden_state
            return head_loss(self._head, hidden[sel], targets[sel]), sel.sum()
        logits = self.model(**kwargs).logits
        logits = logits[:, -input_ids.shape[1] :][sel]  # prompt tuning prepends virtual-token positions
        return F.cross_entropy(logits.float(), targets[sel], reduction="sum"), sel.sum()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _oom_error(stage: str, exc: BaseException) -> RagloraError:
    return RagloraError(
        f"stage {stage}: out of memory ({str(exc).splitlines()[0][:120]}); lower finetune.stages[].batch_size or "
        "model.max_length, raise grad_accum, or enable finetune.gradient_checkpointing"
    )


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@torch.no_grad()
def evaluate_loss(loss_module, examples: list[dict], *, accelerator, batch_size: int, pad_id: int) -> float | None:
    """Mean per-token loss of assistant tokens over `examples` (sharded across processes, summed)."""
    if not examples:
        return None
    was_training = loss_module.training
    loss_module.eval()
    order = sorted(range(len(examples)), key=lambda i: -examples[i]["length"])
    mine = order[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        batch = collate([examples[j] for j in mine[i : i + batch_size]], pad_id=pad_id)
        try:
            loss_sum, n = loss_module(**_to(batch, accelerator.device))
        except Exception as exc:
            if _is_oom(exc):
                raise _oom_error("evaluation", exc) from None
            raise
        total += torch.stack([loss_sum.double(), n.double()])
    total = accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total
    loss_module.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else None


# ---------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file())
    return steps[-1] if steps else None


def save_checkpoint(ckpt_root: Path, *, model, optimizer, scheduler, step: int, state: dict, plan, accelerator) -> Path:
    """Atomic: written to a temp folder, renamed to step-N, then older checkpoints are removed."""
    from safetensors.torch import save_file

    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "plan.json").write_text(json.dumps(plan))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        atomic_replace_dir(tmp, final)
        for old in ckpt_root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, model, optimizer, scheduler, accelerator) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    unwrapped = accelerator.unwrap_model(model)
    missing = [n for n, p in unwrapped.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise RagloraError(f"checkpoint {path} does not match the model (missing {missing[:3]}); delete it")
    with torch.no_grad():
        params = dict(unwrapped.named_parameters())
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=accelerator.device, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------------------------- memory


def tune_cpu_malloc() -> bool:
    """glibc: keep freed activation buffers in the heap instead of unmapping them after every step.

    Training allocates and frees the same large activation tensors every step; by default glibc returns them
    to the OS (mmap/munmap, heap trimming), so every step pays page faults again - on small VMs that made steps
    2-5x slower and erratic. Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_. No-op elsewhere.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
        return libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False


class SavedTensors:
    """Counts the bytes autograd saves for backward inside a `with` block: each storage once, weights not (they
    are counted as weights). The first training step runs the longest batch, so this is the activation peak."""

    def __init__(self, module: torch.nn.Module):
        self.held = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.held:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        return round(sum(self.storages.values()) / 2**20, 1)


def tensor_memory_mb(module: torch.nn.Module, saved: SavedTensors) -> dict:
    """What training must hold in tensors, counted rather than read off RSS: weights, gradients and AdamW's two
    moments for the trainable parameters, and the activations saved for backward on the longest batch. Peak
    RSS holds these plus the runtime and whatever the allocator keeps."""
    mb = 2**20
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    out = {
        "weights_mb": round(sum(p.numel() * p.element_size() for p in module.parameters()) / mb, 1),
        "grads_and_adam_mb": round(3 * trainable / mb, 1),
        "saved_activations_mb": saved.mb,
    }
    out["tensor_mb"] = round(sum(out.values()), 1)
    return out


def reset_peak_memory(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mb() -> float | None:
    """This process's resident memory now (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def peak_memory_mb(device_type: str) -> dict:
    out: dict = {}
    if device_type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# ---------------------------------------------------------------------------------------------- loop


def _now() -> float:
    """Monotonic seconds (a function of its own so tests can move the clock)."""
    return time.monotonic()


def checkpoint_due(step: int, *, save_steps: int | None, save_minutes: float, since_last: float) -> bool:
    """Every save_steps optimizer steps when set, else when save_minutes have passed since the last checkpoint."""
    if save_steps:
        return step % save_steps == 0
    return since_last >= save_minutes * 60


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(path))


def train_loop(
    *,
    stage: str,
    loss_module,
    train_examples: list[dict],
    stage_cfg,
    ft_cfg,
    accelerator,
    pad_id: int,
    max_length: int,
    ckpt_root: Path,
    config_hash: str,
    resume: bool,
    seed: int,
    max_steps_cap: int | None = None,
) -> dict:
    """Train `loss_module` (already on the device, not yet prepared) and return metrics.

    The batch plan is global: optimizer step s on process r uses micro-batches
    plan[(s * grad_accum + j) * world + r] for j < grad_accum. `max_steps_cap` (smoke runs) caps the number
    of optimizer steps whatever the stage's max_steps or epochs say.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    world = accelerator.num_processes
    rank = accelerator.process_index
    ga = stage_cfg.grad_accum
    bs = stage_cfg.batch_size
    micro_per_epoch = math.ceil(len(train_examples) / bs)
    total_steps = stage_cfg.max_steps or max(1, math.ceil(stage_cfg.epochs * micro_per_epoch / (ga * world)))
    if max_steps_cap is not None:
        total_steps = max(1, min(total_steps, max_steps_cap))
    lengths = [e["length"] for e in train_examples]
    plan = plan_batches(
        lengths,
        bs,
        total_steps * ga * world,
        seed=seed,
        group_by_length=ft_cfg.group_by_length,
        mega_batch_factor=ft_cfg.mega_batch_factor,
    )

    params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    scheduler = get_scheduler(
        stage_cfg.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(stage_cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model = accelerator.prepare_model(loss_module)

    ckpt_root.mkdir(parents=True, exist_ok=True)
    log_path = ckpt_root / "train_log.jsonl"
    start_step = 0
    prior = {"tokens": 0, "padded": 0, "train_seconds": 0.0}
    latest = latest_checkpoint(ckpt_root)
    if resume and latest is not None:
        state = json.loads((latest / "state.json").read_text())
        if state.get("config_hash") != config_hash:
            raise RagloraError(
                f"stage {stage}: checkpoint {latest} was made with a different configuration; "
                "rerun without --resume to start the stage over"
            )
        plan = json.loads((latest / "plan.json").read_text())
        state = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
        start_step = int(state["step"])
        prior = {k: state.get(k, prior[k]) for k in prior}
        if accelerator.is_main_process:
            log.info("stage %s: resuming from %s (step %d of %d)", stage, latest, start_step, total_steps)
            if log_path.is_file():  # keep the curve up to the checkpoint; later entries are replayed
                kept = [
                    line
                    for line in log_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= start_step
                ]
                log_path.write_text("".join(line + "\n" for line in kept))
    else:
        set_seed(seed + rank)  # dropout streams differ per process
        if accelerator.is_main_process:
            if latest is not None:
                log.info("stage %s: ignoring checkpoint %s (pass --resume to continue from it)", stage, latest)
            for old in ckpt_root.glob("step-*"):
                shutil.rmtree(old, ignore_errors=True)
            log_path.write_text("")
    accelerator.wait_for_everyone()
    tb = _tensorboard(ckpt_root / "tensorboard") if accelerator.is_main_process else None

    tokens, padded, train_seconds = prior["tokens"], prior["padded"], prior["train_seconds"]
    last_loss = None
    step = start_step

    last_saved = _now()

    def checkpoint(at: int) -> Path:
        nonlocal last_saved
        last_saved = _now()
        extra = {"config_hash": config_hash, "world_size": world, "tokens": tokens, "padded": padded}
        extra["train_seconds"] = train_seconds
        extra["total_steps"] = total_steps
        return save_checkpoint(
            ckpt_root, model=model, optimizer=optimizer, scheduler=scheduler, step=at, state=extra, plan=plan,
            accelerator=accelerator,
        )  # fmt: skip

    model.train()
    saved = SavedTensors(loss_module)  # filled by the first step run here
    rss_at_start = rss_mb()
    bar = tqdm(
        total=total_steps, initial=start_step, desc=f"finetune {stage}", disable=not accelerator.is_local_main_process
    )
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            try:
                micro = [
                    collate(
                        [train_examples[i] for i in plan[(step * ga + j) * world + rank]],
                        pad_id=pad_id,
                        packing=ft_cfg.packing,
                        max_length=max_length,
                    )
                    for j in range(ga)
                ]
                n_window = sum(
                    int((F.pad(b["labels"][:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX).sum()) for b in micro
                )
                stats = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss_sum, n, tokens, padded
                for j, batch in enumerate(micro):
                    sync = j == ga - 1
                    ctx = accelerator.no_sync(model) if (not sync and world > 1) else contextlib.nullcontext()
                    count = saved if saved.storages == {} and j == 0 else contextlib.nullcontext()
                    with ctx, count:
                        loss_sum, n = model(**_to(batch, accelerator.device))
                        accelerator.backward(loss_sum / max(n_window, 1))
                    stats += torch.tensor(
                        [float(loss_sum.detach()), float(n), batch["num_tokens"], batch["num_padded"]],
                        dtype=torch.float64,
                        device=accelerator.device,
                    )
                if stage_cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, stage_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except Exception as exc:
                if _is_oom(exc):
                    raise _oom_error(stage, exc) from None
                raise
            if world > 1:
                stats = accelerator.reduce(stats, reduction="sum")
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            tokens += int(stats[2])
            padded += int(stats[3])
            last_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
            bar.update(1)
            if accelerator.is_main_process and (step % ft_cfg.logging_steps == 0 or step == total_steps):
                entry = {
                    "step": step,
                    "loss": round(last_loss, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": round(float(stats[2]) / dt, 1),
                    "tokens": tokens,
                    "epoch": round(step * ga * world / micro_per_epoch, 3),
                }
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=entry["tokens_per_s"])
                if tb is not None:
                    tb.add_scalar(f"{stage}/loss", last_loss, step)
                    tb.add_scalar(f"{stage}/lr", entry["lr"], step)
            due = checkpoint_due(
                step, save_steps=ft_cfg.save_steps, save_minutes=ft_cfg.save_minutes, since_last=_now() - last_saved
            )
            if due and step < total_steps:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        path = checkpoint(step)
        raise TrainingInterrupted(
            f"stage {stage} interrupted at step {step}/{total_steps}; checkpoint saved to {path} - "
            "rerun with --resume to continue"
        ) from None
    bar.close()
    if tb is not None:
        tb.close()

    # DDP sanity: every process must hold identical trainable weights
    in_sync = None
    if world > 1:
        flat = torch.cat([p.detach().double().flatten() for p in params]).sum().reshape(1)
        gathered = accelerator.gather(flat)
        in_sync = bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=1e-6))
    # what a random-order loader with dynamic padding (transformers Trainer's default) would pad for the same data
    ungrouped_eff = padding_efficiency(lengths, plan_batches(lengths, bs, len(plan), seed=seed, group_by_length=False))
    losses = []
    if accelerator.is_main_process and log_path.is_file():
        losses = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    return {
        "model": model,
        "optimizer_steps": step,
        "resumed_from_step": start_step,
        "final_train_loss": losses[-1]["loss"] if losses else last_loss,
        "train_seconds": round(train_seconds, 2),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "padding_efficiency": round(tokens / padded, 4) if padded else None,
        "padding_efficiency_random_batches": round(ungrouped_eff, 4),
        "world_size": world,
        "ddp_params_in_sync": in_sync,
        "log_path": log_path,
        **tensor_memory_mb(loss_module, saved),
        "rss_at_train_start_mb": rss_at_start,
    }
