"""Sequential stages: general -> domain -> subdomain (or whatever finetune.stages lists).

Stage N starts from the base with the earlier stages merged in full precision (`parents` in its manifest)
and trains a fresh adapter, or with `continue_previous_adapter` keeps training stage N-1's adapter. Every
stage folder `<adapters_dir>/<stage>/` is written atomically (temp folder + rename) and holds the PEFT
adapter, `manifest.json`, `resolved_config.json` and `train_log.jsonl`. A stage whose manifest has the same
config hash is skipped unless `force`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from finetune.config import FinetuneConfig, ModelConfig, StageConfig, resolve_lora
from finetune.data import load_examples, sample_replay, tokenize_conversation, with_system
from finetune.model import (
    ADAPTER_FILES,
    MANIFEST,
    _atomic_replace_dir,
    apply_method,
    check_4bit,
    count_parameters,
    load_merged_chain,
    load_tokenizer,
    resolve_base,
    resolve_device,
    resolve_dtype,
    stage_dir,
)
from finetune.prompt import load_system_prompt
from finetune.train import (
    CausalLMLoss,
    evaluate_loss,
    peak_memory_mb,
    reset_peak_memory,
    train_loop,
    tune_cpu_malloc,
)
from retriever.errors import RagloraError
from retriever.files import file_sha256

log = logging.getLogger(__name__)
CHECKPOINTS = ".checkpoints"


def _say(accelerator, msg: str) -> None:
    log.info(msg)
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _data_path(data_dir: str | Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else Path(data_dir) / p


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _chain_manifest(adapters_dir: Path, stage: StageConfig, needed_by: str) -> dict:
    m = _read_json(stage_dir(adapters_dir, stage.name) / MANIFEST)
    if m is None:
        raise RagloraError(
            f"stage {needed_by} builds on stage {stage.name}, which has not been trained "
            f"(no {stage_dir(adapters_dir, stage.name) / MANIFEST}); run it first, e.g. --stages {stage.name},{needed_by}"
        )
    return m


def _open_index(index_dir: str | Path | None, stage: StageConfig):
    from retriever.embedder import load_embedder
    from retriever.index import load_index

    if index_dir is None or not Path(index_dir).is_dir():
        raise RagloraError(
            f"stage {stage.name} has raft: true but there is no index at {index_dir}: build it with `make index` "
            f"(raglora index), or set finetune.stages[{stage.name}].raft: false"
        )
    index = load_index(index_dir)
    if stage.raft_search_mode != "bm25" and index.embedder is None:
        index.embedder = load_embedder(index.manifest["embedder"]["name"])
    return index


def _index_digest(index, index_dir) -> str | None:
    if index_dir is not None and (Path(index_dir) / "manifest.json").is_file():
        return file_sha256(Path(index_dir) / "manifest.json")
    manifest = getattr(index, "manifest", None)
    return _digest(manifest) if manifest is not None else type(index).__name__


def _tokenize_all(tok, examples: list[dict], system_prompt: str, max_length: int) -> tuple[list[dict], dict]:
    out, truncated, dropped = [], 0, 0
    for ex in examples:
        msgs = ex["messages"] if "raft" in ex else with_system(ex["messages"], system_prompt)
        full = tokenize_conversation(tok, msgs, None)
        t = tokenize_conversation(tok, msgs, max_length) if full and full["length"] > max_length else full
        if t is None:
            dropped += 1
            continue
        truncated += int(full["length"] > max_length)
        out.append({**t, "id": ex["id"], "stage": ex["stage"]})
    return out, {"truncated": truncated, "dropped": dropped}


def _dir_bytes(path: Path, names: tuple[str, ...] | None = None) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and (names is None or p.name in names))


def run_finetune(
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    *,
    data_dir: str | Path,
    adapters_dir: str | Path,
    cache_dir: str | Path,
    index_dir: str | Path | None,
    stages: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    index=None,
) -> list[dict]:
    """Train the selected stages (default: all, in config order); returns one summary per selected stage.

    `index` (optional) is an already-loaded retriever index (anything with `search(query, *, k, mode)`);
    otherwise it is loaded from `index_dir` when a selected stage has `raft: true`.
    """
    from accelerate import Accelerator

    names = [s.name for s in cfg.stages]
    selected = list(stages) if stages else names
    for name in selected:
        cfg.stage(name)  # raises on an unknown name
    device = resolve_device(model_cfg.device)
    if model_cfg.load_in_4bit:
        check_4bit(device)
    accelerator = Accelerator(cpu=device == "cpu")
    if accelerator.device.type == "cpu":
        tune_cpu_malloc()
    adapters_dir = Path(adapters_dir)
    with accelerator.main_process_first():  # the packaged base is converted once, by one process
        base_path = resolve_base(model_cfg.base, cache_dir)
        tok = load_tokenizer(model_cfg.base, cache_dir=cache_dir)
    prompts = {
        "plain": load_system_prompt(model_cfg.system_prompt_file, with_context=False),
        "rag": load_system_prompt(model_cfg.rag_system_prompt_file, with_context=True),
    }
    val_cache: dict[str, list[dict]] = {}
    train_cache: dict[str, list[dict]] = {}
    summaries = []
    for i, stage in enumerate(cfg.stages):
        if stage.name not in selected:
            continue
        summaries.append(
            _run_stage(
                i,
                stage,
                cfg=cfg,
                model_cfg=model_cfg,
                tok=tok,
                prompts=prompts,
                base_path=base_path,
                data_dir=Path(data_dir),
                adapters_dir=adapters_dir,
                cache_dir=cache_dir,
                index_dir=index_dir,
                index=index,
                resume=resume,
                force=force,
                accelerator=accelerator,
                val_cache=val_cache,
                train_cache=train_cache,
            )
        )
    return summaries


def stage_rows(i: int, stage: StageConfig, *, cfg: FinetuneConfig, data_dir: Path, cache: dict) -> tuple:
    """(training rows, replay rows drawn from the earlier stages, {role: file facts for the manifest})."""
    train_path = _data_path(data_dir, stage.train_file)
    val_path = _data_path(data_dir, stage.validation_file) if stage.validation_file else None
    if stage.name not in cache:
        cache[stage.name] = load_examples(train_path, stage=stage.name)
    train_rows = cache[stage.name]
    data_files = {"train": {"path": str(train_path), "sha256": file_sha256(train_path), "rows": len(train_rows)}}
    if val_path is not None:
        if not val_path.is_file():
            raise RagloraError(f"stage {stage.name}: validation file not found: {val_path}")
        data_files["validation"] = {"path": str(val_path), "sha256": file_sha256(val_path)}
    replay: list[dict] = []
    if stage.replay_fraction > 0 and i > 0:
        earlier = []
        for s in cfg.stages[:i]:
            p = _data_path(data_dir, s.train_file)
            if s.name not in cache:
                cache[s.name] = load_examples(p, stage=s.name)
            earlier += cache[s.name]
            data_files[f"replay:{s.name}"] = {"path": str(p), "sha256": file_sha256(p)}
        replay = sample_replay(earlier, len(train_rows), stage.replay_fraction, seed=f"{cfg.seed}:{stage.name}")
    return train_rows, replay, data_files


def stage_examples(
    stage: StageConfig, rows: list[dict], replay: list[dict], *, seed: int, tok, prompts: dict, max_length: int, index
) -> tuple[list[dict], dict | None, dict]:
    """Tokenized training examples exactly as the stage trains on them (RAFT contexts added when configured)."""
    examples = list(rows)
    raft_stats = None
    if stage.raft:
        from finetune.raft import build_raft_examples

        def fits(msgs: list[dict]) -> bool:
            t = tokenize_conversation(tok, msgs, None)
            return t is not None and t["length"] <= max_length

        examples, raft_stats = build_raft_examples(
            examples,
            index=index,
            fraction=stage.raft_fraction,
            n_distractors=stage.raft_distractors,
            p_no_gold=stage.raft_p_no_gold,
            system_prompt=prompts["rag"],
            seed=f"{seed}:{stage.name}",
            no_gold_target=stage.raft_no_gold_target,
            search_mode=stage.raft_search_mode,
            context_chars=stage.raft_context_chars,
            fits=fits,
        )
    train_examples, tok_stats = _tokenize_all(tok, examples + replay, prompts["plain"], max_length)
    if not train_examples:
        raise RagloraError(f"stage {stage.name}: no training example fits model.max_length={max_length}")
    return train_examples, raft_stats, tok_stats


def _val_examples(stage: StageConfig, *, data_dir, tok, prompts, max_length, limit, cache) -> list[dict]:
    if stage.name not in cache:
        if not stage.validation_file:
            cache[stage.name] = []
        else:
            rows = load_examples(_data_path(data_dir, stage.validation_file), stage=stage.name)[:limit]
            cache[stage.name] = _tokenize_all(tok, rows, prompts["plain"], max_length)[0]
    return cache[stage.name]


def _run_stage(
    i: int,
    stage: StageConfig,
    *,
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    tok,
    prompts: dict,
    base_path: str,
    data_dir: Path,
    adapters_dir: Path,
    cache_dir,
    index_dir,
    index,
    resume: bool,
    force: bool,
    accelerator,
    val_cache: dict,
    train_cache: dict,
) -> dict:
    from accelerate.utils import set_seed
    from peft import PeftModel

    t_start = time.perf_counter()
    device_type = accelerator.device.type
    reset_peak_memory(device_type)
    lora = resolve_lora(cfg, stage)
    out_dir = stage_dir(adapters_dir, stage.name)
    prev = cfg.stages[i - 1] if i > 0 else None
    prev_manifest = _chain_manifest(adapters_dir, prev, stage.name) if prev else None
    if prev is None:
        parents: list[str] = []
    elif cfg.continue_previous_adapter:
        parents = list(prev_manifest.get("parents", []))
    else:
        parents = [*prev_manifest.get("parents", []), prev.name]
    init_from = prev.name if (prev is not None and cfg.continue_previous_adapter) else None
    if init_from and prev_manifest.get("method") != lora.method:
        raise RagloraError(
            f"stage {stage.name}: continue_previous_adapter needs the same method as stage {prev.name} "
            f"({prev_manifest.get('method')} vs {lora.method})"
        )
    parent_manifests = {p: _read_json(stage_dir(adapters_dir, p) / MANIFEST) or {} for p in parents}
    if init_from:
        parent_manifests[init_from] = prev_manifest

    # ------------------------------------------------------------------ data
    train_rows, replay, data_files = stage_rows(i, stage, cfg=cfg, data_dir=data_dir, cache=train_cache)
    if stage.raft and index is None:
        index = _open_index(index_dir, stage)

    hashed = {
        "stage": stage.model_dump(),
        "lora": lora.model_dump(),
        "base": model_cfg.base,
        "max_length": model_cfg.max_length,
        "dtype": model_cfg.dtype,
        "load_in_4bit": model_cfg.load_in_4bit,
        "prompts": prompts,
        "seed": cfg.seed,
        "batching": [cfg.group_by_length, cfg.mega_batch_factor, cfg.packing],
        "continue_previous_adapter": cfg.continue_previous_adapter,
        "parents": {p: m.get("adapter_sha256") for p, m in parent_manifests.items()},
        "data": {k: v["sha256"] for k, v in data_files.items()},
        "index": _index_digest(index, index_dir) if stage.raft else None,
    }
    config_hash = _digest(hashed)
    existing = _read_json(out_dir / MANIFEST)
    if existing and existing.get("config_hash") == config_hash and not force:
        _say(accelerator, f"stage {stage.name}: already trained with this configuration, skipping ({out_dir})")
        return {"stage": stage.name, "skipped": True, "dir": str(out_dir), **existing.get("metrics", {})}

    train_examples, raft_stats, tok_stats = stage_examples(
        stage, train_rows, replay, seed=cfg.seed, tok=tok, prompts=prompts, max_length=model_cfg.max_length, index=index
    )
    val_sets = {
        s.name: _val_examples(
            s,
            data_dir=data_dir,
            tok=tok,
            prompts=prompts,
            max_length=model_cfg.max_length,
            limit=cfg.eval_max_examples,
            cache=val_cache,
        )  # fmt: skip
        for s in cfg.stages[: i + 1]
    }

    # ------------------------------------------------------------------ model
    _say(accelerator, f"stage {stage.name}: {len(train_examples)} examples ({len(replay)} replay); parents {parents}")
    set_seed(cfg.seed)
    if model_cfg.load_in_4bit:
        model, _ = load_merged_chain(
            model_cfg.base, adapters_dir, parents, cache_dir=cache_dir, device="cuda", dtype=model_cfg.dtype,
            load_in_4bit=True, attn_implementation=model_cfg.attn_implementation,
        )  # fmt: skip
    else:
        model, _ = load_merged_chain(
            model_cfg.base, adapters_dir, parents, cache_dir=cache_dir, device="cpu", dtype="float32",
            attn_implementation=model_cfg.attn_implementation,
        )  # fmt: skip
        # full fine-tuning keeps fp32 master weights; adapters train on a bf16 base on GPU
        if lora.method != "full":
            model.to(resolve_dtype(model_cfg.dtype, device_type))
    if init_from:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = PeftModel.from_pretrained(model, str(stage_dir(adapters_dir, init_from)), is_trainable=True)
    else:
        model = apply_method(
            model, lora, load_in_4bit=model_cfg.load_in_4bit, gradient_checkpointing=cfg.gradient_checkpointing
        )
    if not model_cfg.load_in_4bit:
        model.to(accelerator.device)
    trainable, total = count_parameters(model)
    _say(
        accelerator,
        f"stage {stage.name}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), "
        f"method {lora.method}, device {accelerator.device}, processes {accelerator.num_processes}",
    )
    loss_module = CausalLMLoss(model, prompt_learning=lora.method in ("prompt_tuning", "prefix_tuning"))
    pad_id = tok.pad_token_id
    val_before = evaluate_loss(
        loss_module, val_sets[stage.name], accelerator=accelerator, batch_size=cfg.eval_batch_size, pad_id=pad_id
    )
    ckpt_root = adapters_dir / CHECKPOINTS / stage.name
    result = train_loop(
        stage=stage.name,
        loss_module=loss_module,
        train_examples=train_examples,
        stage_cfg=stage,
        ft_cfg=cfg,
        accelerator=accelerator,
        pad_id=pad_id,
        max_length=model_cfg.max_length,
        ckpt_root=ckpt_root,
        config_hash=config_hash,
        resume=resume,
        seed=cfg.seed,
    )
    wrapped = result.pop("model")
    val_after = {
        name: evaluate_loss(wrapped, ex, accelerator=accelerator, batch_size=cfg.eval_batch_size, pad_id=pad_id)
        for name, ex in val_sets.items()
    }
    forgetting = {}
    for s in cfg.stages[:i]:
        own = (_read_json(stage_dir(adapters_dir, s.name) / MANIFEST) or {}).get("metrics", {})
        after_own = (own.get("validation_loss") or {}).get(s.name)
        now = val_after.get(s.name)
        forgetting[s.name] = {
            "after_own_stage": after_own,
            "after_this_stage": now,
            "delta": round(now - after_own, 6) if now is not None and after_own is not None else None,
        }
    forgetting[stage.name] = {"before_this_stage": val_before, "after_this_stage": val_after.get(stage.name)}

    # ------------------------------------------------------------------ save (atomic)
    summary: dict = {"stage": stage.name, "skipped": False, "dir": str(out_dir)}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(wrapped).model
        tmp = adapters_dir / f".tmp-{stage.name}-{int(time.time() * 1000)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if lora.method == "full":
                inner.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                weights = [p for p in tmp.iterdir() if p.suffix == ".safetensors"]
            else:
                inner.save_pretrained(tmp)
                weights = [tmp / ADAPTER_FILES[1]]
            adapter_bytes = sum(p.stat().st_size for p in weights)
            adapter_sha = _digest([file_sha256(p) for p in sorted(weights)])
            shutil.copyfile(result["log_path"], tmp / "train_log.jsonl")
            mem = peak_memory_mb(device_type)
            bytes_per_param = 2 if resolve_dtype(model_cfg.dtype, device_type) != torch.float32 else 4
            metrics = {
                "final_train_loss": result["final_train_loss"],
                "validation_loss_before": val_before,
                "validation_loss": val_after,
                "forgetting": forgetting,
                "wall_seconds": round(time.perf_counter() - t_start, 2),
                "train_seconds": result["train_seconds"],
                **mem,
                "trainable_params": trainable,
                "total_params": total,
                "trainable_ratio": round(trainable / total, 6),
                "adapter_bytes": adapter_bytes,
                "full_model_bytes": (total - (trainable if lora.method != "full" else 0)) * bytes_per_param,
                "tokens_per_s": result["tokens_per_s"],
                "train_tokens": result["train_tokens"],
                "padding_efficiency": result["padding_efficiency"],
                "padding_efficiency_random_batches": result["padding_efficiency_random_batches"],
                "optimizer_steps": result["optimizer_steps"],
                "resumed_from_step": result["resumed_from_step"],
                "world_size": result["world_size"],
                "ddp_params_in_sync": result["ddp_params_in_sync"],
            }
            manifest = {
                "stage": stage.name,
                "method": lora.method,
                "base": model_cfg.base,
                "base_resolved": base_path,
                "parents": parents,
                "initialized_from": init_from,
                "config_hash": config_hash,
                "adapter_sha256": adapter_sha,
                "lora": lora.model_dump(),
                "stage_config": stage.model_dump(),
                "data": {
                    "files": data_files,
                    "train_examples": len(train_examples),
                    "replay_examples": len(replay),
                    "raft": raft_stats,
                    **tok_stats,
                },
                "metrics": metrics,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
            }
            resolved = {"model": model_cfg.model_dump(), "finetune": cfg.model_dump(), "stage": stage.name}
            (tmp / "resolved_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _atomic_replace_dir(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)
        summary.update(metrics)
        _say(
            accelerator,
            f"stage {stage.name}: done in {metrics['wall_seconds']:.0f}s, train loss {metrics['final_train_loss']:.4f}, "
            f"val loss {val_before} -> {val_after.get(stage.name)}, {metrics['tokens_per_s']} tokens/s -> {out_dir}",
        )
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del wrapped, loss_module, model
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return summary


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
