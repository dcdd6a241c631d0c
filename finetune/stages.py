"""Sequential stages, in the order `finetune.stages` lists them (any number, any names).

Stage N starts from the base with the stage it builds on merged in full precision, on top of that stage's own
parents (`parents` in its manifest), and trains a fresh adapter, or with `continue_previous_adapter` keeps
training that stage's adapter. A stage builds on the one before it in the list, or on the earlier stage its
`after` names (a sibling branch: e.g. a variant of the last stage trained on the same parents). A `chat`
stage trains on conversations (loss on assistant turns, RAFT contexts when configured); a `text` stage is
continued pre-training on document chunks (loss on every token). Every stage folder `<adapters_dir>/<stage>/`
is written atomically (temp folder + rename) and holds the PEFT adapter, `manifest.json`,
`resolved_config.json` and `train_log.jsonl`. A stage whose manifest has the same config hash is skipped
unless `force`.

One stage, `_run_stage`, in order: resolve its parent chain, read its rows, hash the configuration (skip if
already trained), build the tokenized examples, load the model, train, measure validation loss/forgetting,
save atomically.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from finetune.allocator import active_allocator
from finetune.config import FinetuneConfig, LoraSettings, ModelConfig, StageConfig, resolve_lora
from finetune.data import (
    is_text_example,
    load_examples,
    read_jsonl,
    sample_replay,
    tokenize_conversation,
    tokenize_text,
    with_system,
)
from finetune.model import (
    ADAPTER_FILES,
    MANIFEST,
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
from finetune.prompt import REFUSAL_ANSWER, defuse_citations, system_prompts
from finetune.train import (
    CausalLMLoss,
    evaluate_loss,
    peak_memory_mb,
    reset_peak_memory,
    train_loop,
    tune_cpu_malloc,
)
from raglora.errors import RagloraError
from raglora.files import atomic_replace_dir, file_sha256

log = logging.getLogger(__name__)
CHECKPOINTS = ".checkpoints"
#: (sentence, passage) pairs that calibrate the judge of RAFT citations, as many as serving's default
#: (serve.judge_calibration_pairs), so a training target cites what serving would verify.
JUDGE_CALIBRATION_PAIRS = 100
NO_STAGES = "no stages in finetune.stages: add at least one (see raglora init)"


# ---------------------------------------------------------------------------------------------- helpers


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


def _open_index(index_dir: str | Path | None, stage: StageConfig):
    from retriever.embedder import load_embedder
    from retriever.index import load_index

    if index_dir is None or not Path(index_dir).is_dir():
        raise RagloraError(
            f"stage {stage.name} has raft: true but there is no index at {index_dir}: build it with `make index` "
            f"(raglora index), or set finetune.stages[{stage.name}].raft: false"
        )
    index = load_index(index_dir)
    if (stage.raft_search_mode or "hybrid") != "bm25" and index.embedder is None:
        index.embedder = load_embedder(index.manifest["embedder"]["name"])
    return index


def _index_digest(index, index_dir) -> str | None:
    if index_dir is not None and (Path(index_dir) / "manifest.json").is_file():
        return file_sha256(Path(index_dir) / "manifest.json")
    manifest = getattr(index, "manifest", None)
    return _digest(manifest) if manifest is not None else type(index).__name__


# ---------------------------------------------------------------------------------------------- run context


@dataclass
class RunContext:
    """What every stage of one `run_finetune` call shares."""

    cfg: FinetuneConfig
    model_cfg: ModelConfig
    tok: Any
    prompts: dict[str, str]
    base_path: str
    data_dir: Path
    adapters_dir: Path
    cache_dir: str | Path
    index_dir: str | Path | None
    accelerator: Any
    index: Any = None
    resume: bool = False
    force: bool = False
    max_steps: int | None = None
    no_answer_reply: str = REFUSAL_ANSWER
    train_cache: dict = field(default_factory=dict)
    val_cache: dict = field(default_factory=dict)
    _gold: tuple | None = None  # (GoldFinder, held-out gold chunk ids), built once per run
    _judge: Any = None  # the groundedness judge of RAFT citations, calibrated once per run
    _judge_threshold: float | None = None  # its calibrated threshold, kept while the judge is put aside
    _opened_index: bool = False  # the run opened the index itself, so it may close and re-open it

    def raft_index(self, stage: StageConfig):
        if self.index is None:
            self.index = _open_index(self.index_dir, stage)
            self._opened_index = True
        return self.index

    def raft_judge(self):
        """`finetune.raft.raft_judge` on the run's index (embedder when it has one, else the n-gram rule)."""
        if self._judge is None:
            from finetune.raft import raft_judge

            self._judge = raft_judge(
                self.index, calibration_pairs=JUDGE_CALIBRATION_PAIRS, threshold=self._judge_threshold
            )
        return self._judge

    def put_retrieval_aside(self) -> None:
        """Free the index and its embedder while a stage trains, so their memory goes to activations (the
        embedder alone is ~0.4 GB with the default all-mpnet-base-v2); the next RAFT stage re-opens them, and
        the judge keeps its calibrated threshold. An index passed in by the caller is left alone."""
        if not self._opened_index:
            return
        if self._judge is not None:
            self._judge_threshold = getattr(self._judge, "threshold", None)
        self.index = self._judge = None
        gc.collect()

    def held_out_gold(self) -> tuple[Any, set[str], set[str]]:
        """(GoldFinder over the index, ids of every chunk that is gold for a held-out row of any chat stage, ids of
        the chunks that hold a held-out row itself)."""
        if self._gold is None:
            from finetune.raft import held_out_gold_chunks, held_out_row_chunks
            from retriever.gold import GoldFinder

            finder = GoldFinder(getattr(self.index, "chunks", None) or [])
            rows = held_out_rows(self.cfg, self.data_dir)
            self._gold = (finder, held_out_gold_chunks(finder, rows), held_out_row_chunks(finder, rows))
        return self._gold


def held_out_rows(cfg: FinetuneConfig, data_dir: Path) -> list[dict]:
    """The validation and test rows of every chat stage (`<data_dir>/<stage>/{validation,test}.jsonl` and the
    stage's validation_file), each file once."""
    paths: dict[Path, None] = {}
    for s in cfg.stages:
        if s.kind != "chat":
            continue
        candidates = [Path(data_dir) / s.name / "validation.jsonl", Path(data_dir) / s.name / "test.jsonl"]
        if s.validation_file:
            candidates.append(_data_path(data_dir, s.validation_file))
        for p in candidates:
            if p.is_file():
                paths[p.resolve()] = None
    return [row for p in paths for _, row in read_jsonl(p)]


# ---------------------------------------------------------------------------------------------- entry point


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
    max_steps: int | None = None,
    company_name: str = "our company",
    company_description: str = "",
    no_answer_reply: str = REFUSAL_ANSWER,
) -> list[dict]:
    """Train the selected stages (default: all, in config order); returns one summary per selected stage.

    `index` (optional) is an already-loaded retriever index (anything with `search(query, *, k, mode)` and
    `chunks`); otherwise it is loaded from `index_dir` when a selected stage has `raft: true`. `max_steps`
    caps every stage's optimizer steps (smoke runs; part of the config hash). `company_name` and
    `company_description` fill the system prompts; `no_answer_reply` is the RAFT refusal target.
    """
    from accelerate import Accelerator

    if not cfg.stages:
        raise RagloraError(NO_STAGES)
    if max_steps is not None and max_steps < 1:
        raise RagloraError(f"--max-steps must be at least 1, got {max_steps}")
    selected = list(stages) if stages else [s.name for s in cfg.stages]
    for name in selected:
        cfg.stage(name)  # raises on an unknown name
    device = resolve_device(model_cfg.device)
    if model_cfg.load_in_4bit:
        check_4bit(device)
    accelerator = Accelerator(cpu=device == "cpu")
    if accelerator.device.type == "cpu" and active_allocator() == "system":
        tune_cpu_malloc()
    with accelerator.main_process_first():  # the packaged base is converted once, by one process
        base_path = resolve_base(model_cfg.base, cache_dir)
        tok = load_tokenizer(model_cfg.base, cache_dir=cache_dir)
    ctx = RunContext(
        cfg=cfg,
        model_cfg=model_cfg,
        tok=tok,
        prompts=system_prompts(
            model_cfg.system_prompt_file,
            model_cfg.rag_system_prompt_file,
            name=company_name,
            description=company_description,
        ),
        base_path=base_path,
        data_dir=Path(data_dir),
        adapters_dir=Path(adapters_dir),
        cache_dir=cache_dir,
        index_dir=index_dir,
        accelerator=accelerator,
        index=index,
        resume=resume,
        force=force,
        max_steps=max_steps,
        no_answer_reply=no_answer_reply,
    )
    return [_run_stage(ctx, i, stage) for i, stage in enumerate(cfg.stages) if stage.name in selected]


# ---------------------------------------------------------------------------------------------- one stage


@dataclass
class Chain:
    """Where a stage starts: the stages merged into the base, the adapter it continues (if any)."""

    parents: list[str]
    init_from: str | None
    parent_manifests: dict[str, dict]


def _run_stage(ctx: RunContext, i: int, stage: StageConfig) -> dict:
    """Train one stage (or skip it when its manifest has the same config hash); returns its summary."""
    t_start = time.perf_counter()
    reset_peak_memory(ctx.accelerator.device.type)
    lora = resolve_lora(ctx.cfg, stage)
    out_dir = stage_dir(ctx.adapters_dir, stage.name)
    chain = _resolve_chain(ctx, i, stage, lora)

    # data, and the hash of everything that shapes the stage
    train_rows, replay, data_files = stage_rows(i, stage, cfg=ctx.cfg, data_dir=ctx.data_dir, cache=ctx.train_cache)
    finder, exclude, withhold, judge = None, set(), set(), None
    if stage.raft:
        ctx.raft_index(stage)
        finder, exclude, withhold = ctx.held_out_gold()
        judge = ctx.raft_judge()
    config_hash = _config_hash(ctx, stage, lora, chain, data_files, exclude | {f"withhold:{c}" for c in withhold})
    existing = _read_json(out_dir / MANIFEST)
    if existing and existing.get("config_hash") == config_hash and not ctx.force:
        _say(ctx.accelerator, f"stage {stage.name}: already trained with this configuration, skipping ({out_dir})")
        return {"stage": stage.name, "skipped": True, "dir": str(out_dir), **existing.get("metrics", {})}
    train_examples, raft_stats, tok_stats = stage_examples(
        stage, train_rows, replay, seed=ctx.cfg.seed, tok=ctx.tok, prompts=ctx.prompts,
        max_length=ctx.model_cfg.max_length, index=ctx.index, gold_finder=finder, exclude_chunks=exclude,
        withhold_chunks=withhold, refusal_answer=ctx.no_answer_reply, judge=judge,
    )  # fmt: skip
    val_sets = {s.name: _stage_val_examples(ctx, s) for s in [*ctx.cfg.lineage(stage.name), stage]}
    _say(
        ctx.accelerator,
        f"stage {stage.name} ({stage.kind}): {len(train_examples)} examples ({len(replay)} replay); "
        f"parents {chain.parents}",
    )

    # model, training, validation loss before/after and forgetting
    ctx.put_retrieval_aside()
    model = _load_model(ctx, lora, chain)
    trainable, total = count_parameters(model)
    _say(
        ctx.accelerator,
        f"stage {stage.name}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), "
        f"method {lora.method}, device {ctx.accelerator.device}, processes {ctx.accelerator.num_processes}",
    )
    loss_module = CausalLMLoss(model, prompt_learning=lora.method in ("prompt_tuning", "prefix_tuning"))
    val_before = _val_loss(ctx, loss_module, val_sets[stage.name])
    ckpt_root = ctx.adapters_dir / CHECKPOINTS / stage.name
    result = _train(ctx, stage, loss_module, train_examples, ckpt_root=ckpt_root, config_hash=config_hash)
    wrapped = result.pop("model")
    val_after = {name: _val_loss(ctx, wrapped, ex) for name, ex in val_sets.items()}

    # save (atomic), main process only
    summary: dict = {"stage": stage.name, "kind": stage.kind, "skipped": False, "dir": str(out_dir)}
    if ctx.accelerator.is_main_process:
        metrics = {
            "final_train_loss": result["final_train_loss"],
            "validation_loss_before": val_before,
            "validation_loss": val_after,
            "forgetting": _forgetting(ctx, i, stage, val_before, val_after),
            **peak_memory_mb(ctx.accelerator.device.type),
            "allocator": active_allocator(),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_ratio": round(trainable / total, 6),
            **{k: result[k] for k in _RESULT_METRICS},
        }
        data = {"files": data_files, "train_examples": len(train_examples), "replay_examples": len(replay)}
        data.update(raft=raft_stats, **tok_stats)
        _save_stage(
            ctx, stage, lora, chain, wrapped, result["log_path"],
            config_hash=config_hash, metrics=metrics, data=data, t_start=t_start,
        )  # fmt: skip
        shutil.rmtree(ckpt_root, ignore_errors=True)
        summary.update(metrics)
        _say(
            ctx.accelerator,
            f"stage {stage.name}: done in {metrics['wall_seconds']:.0f}s, train loss {metrics['final_train_loss']:.4f}, "
            f"val loss {val_before} -> {val_after.get(stage.name)}, {metrics['tokens_per_s']} tokens/s -> {out_dir}",
        )
    ctx.accelerator.wait_for_everyone()
    ctx.accelerator.free_memory()
    del wrapped, loss_module, model
    gc.collect()
    if ctx.accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def _train(ctx: RunContext, stage: StageConfig, loss_module, train_examples, *, ckpt_root, config_hash) -> dict:
    return train_loop(
        stage=stage.name,
        loss_module=loss_module,
        train_examples=train_examples,
        stage_cfg=stage,
        ft_cfg=ctx.cfg,
        accelerator=ctx.accelerator,
        pad_id=ctx.tok.pad_token_id,
        max_length=ctx.model_cfg.max_length,
        ckpt_root=ckpt_root,
        config_hash=config_hash,
        resume=ctx.resume,
        seed=ctx.cfg.seed,
        max_steps_cap=ctx.max_steps,
    )


#: train_loop results copied into the manifest's metrics as they are.
_RESULT_METRICS = (
    "train_seconds",
    "tokens_per_s",
    "train_tokens",
    "padding_efficiency",
    "padding_efficiency_random_batches",
    "optimizer_steps",
    "resumed_from_step",
    "world_size",
    "ddp_params_in_sync",
    "weights_mb",
    "grads_and_adam_mb",
    "saved_activations_mb",
    "tensor_mb",
    "rss_at_train_start_mb",
)


def _resolve_chain(ctx: RunContext, i: int, stage: StageConfig, lora: LoraSettings) -> Chain:
    """The stage this one builds on (its `after`, else the one before it) must be trained; its manifest gives the
    parents."""
    prev = ctx.cfg.builds_on(stage.name)
    if prev is None:
        return Chain(parents=[], init_from=None, parent_manifests={})
    prev_manifest = _read_json(stage_dir(ctx.adapters_dir, prev.name) / MANIFEST)
    if prev_manifest is None:
        raise RagloraError(
            f"stage {stage.name} builds on stage {prev.name}, which has not been trained "
            f"(no {stage_dir(ctx.adapters_dir, prev.name) / MANIFEST}); run it first, "
            f"e.g. --stages {prev.name},{stage.name}"
        )
    if ctx.cfg.continue_previous_adapter:
        if prev_manifest.get("method") != lora.method:
            raise RagloraError(
                f"stage {stage.name}: continue_previous_adapter needs the same method as stage {prev.name} "
                f"({prev_manifest.get('method')} vs {lora.method})"
            )
        parents = list(prev_manifest.get("parents", []))
        init_from: str | None = prev.name
    else:
        parents = [*prev_manifest.get("parents", []), prev.name]
        init_from = None
    manifests = {p: _read_json(stage_dir(ctx.adapters_dir, p) / MANIFEST) or {} for p in parents}
    if init_from:
        manifests[init_from] = prev_manifest
    return Chain(parents=parents, init_from=init_from, parent_manifests=manifests)


def _config_hash(
    ctx: RunContext, stage: StageConfig, lora: LoraSettings, chain: Chain, data_files: dict, exclude: set[str]
) -> str:
    """Everything that changes what the stage learns; an unchanged hash means the stage can be skipped."""
    m = ctx.model_cfg
    stage_fields = stage.model_dump()
    if stage_fields["after"] is None:  # the default chain: configs written before `after` existed keep their hash
        del stage_fields["after"]
    hashed = {
        "stage": stage_fields,
        "lora": lora.model_dump(),
        "base": m.base,
        "max_length": m.max_length,
        "dtype": m.dtype,
        "load_in_4bit": m.load_in_4bit,
        "prompts": ctx.prompts,
        "seed": ctx.cfg.seed,
        "batching": [ctx.cfg.group_by_length, ctx.cfg.mega_batch_factor, ctx.cfg.packing],
        "continue_previous_adapter": ctx.cfg.continue_previous_adapter,
        "parents": {p: pm.get("adapter_sha256") for p, pm in chain.parent_manifests.items()},
        "data": {k: v["sha256"] for k, v in data_files.items()},
        "index": _index_digest(ctx.index, ctx.index_dir) if stage.raft else None,
        "max_steps_cap": ctx.max_steps,  # a smoke run is never mistaken for the full one
    }
    if stage.raft:
        hashed["held_out_gold"] = _digest(sorted(exclude))
        if stage.raft_no_gold_target == "refusal":
            hashed["no_answer_reply"] = ctx.no_answer_reply
    return _digest(hashed)


def _load_model(ctx: RunContext, lora: LoraSettings, chain: Chain):
    """Base + parents merged, with this stage's trainable method applied (or the previous adapter continued)."""
    from accelerate.utils import set_seed
    from peft import PeftModel

    m, cfg = ctx.model_cfg, ctx.cfg
    set_seed(cfg.seed)
    common = {"cache_dir": ctx.cache_dir, "attn_implementation": m.attn_implementation}
    if m.load_in_4bit:
        model, _ = load_merged_chain(
            m.base, ctx.adapters_dir, chain.parents, device="cuda", dtype=m.dtype, load_in_4bit=True, **common
        )
    else:
        model, _ = load_merged_chain(m.base, ctx.adapters_dir, chain.parents, device="cpu", dtype="float32", **common)
        # full fine-tuning keeps fp32 master weights; adapters train on a bf16 base on GPU
        if lora.method != "full":
            model.to(resolve_dtype(m.dtype, ctx.accelerator.device.type))
    if chain.init_from:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = PeftModel.from_pretrained(model, str(stage_dir(ctx.adapters_dir, chain.init_from)), is_trainable=True)
    else:
        model = apply_method(
            model, lora, load_in_4bit=m.load_in_4bit, gradient_checkpointing=cfg.gradient_checkpointing
        )
    if not m.load_in_4bit:
        model.to(ctx.accelerator.device)
    return model


def _val_loss(ctx: RunContext, loss_module, examples: list[dict]) -> float | None:
    return evaluate_loss(
        loss_module, examples, accelerator=ctx.accelerator, batch_size=ctx.cfg.eval_batch_size,
        pad_id=ctx.tok.pad_token_id,
    )  # fmt: skip


def _forgetting(ctx: RunContext, i: int, stage: StageConfig, val_before, val_after: dict) -> dict:
    """Validation loss of every stage this one is trained on top of, after its own training and after this one."""
    table = {}
    for s in ctx.cfg.lineage(stage.name):
        own = (_read_json(stage_dir(ctx.adapters_dir, s.name) / MANIFEST) or {}).get("metrics", {})
        after_own = (own.get("validation_loss") or {}).get(s.name)
        now = val_after.get(s.name)
        table[s.name] = {
            "after_own_stage": after_own,
            "after_this_stage": now,
            "delta": round(now - after_own, 6) if now is not None and after_own is not None else None,
        }
    table[stage.name] = {"before_this_stage": val_before, "after_this_stage": val_after.get(stage.name)}
    return table


def _save_stage(
    ctx: RunContext,
    stage: StageConfig,
    lora: LoraSettings,
    chain: Chain,
    wrapped,
    log_path: Path,
    *,
    config_hash: str,
    metrics: dict,
    data: dict,
    t_start: float,
) -> None:
    """Weights, train log, resolved config and manifest into a temp folder, then renamed over the stage folder."""
    m = ctx.model_cfg
    device_type = ctx.accelerator.device.type
    inner = ctx.accelerator.unwrap_model(wrapped).model
    out_dir = stage_dir(ctx.adapters_dir, stage.name)
    tmp = ctx.adapters_dir / f".tmp-{stage.name}-{int(time.time() * 1000)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        inner.save_pretrained(tmp)
        if lora.method == "full":
            ctx.tok.save_pretrained(tmp)
            weights = [p for p in tmp.iterdir() if p.suffix == ".safetensors"]
        else:
            weights = [tmp / ADAPTER_FILES[1]]
        shutil.copyfile(log_path, tmp / "train_log.jsonl")
        trainable, total = metrics["trainable_params"], metrics["total_params"]
        bytes_per_param = 2 if resolve_dtype(m.dtype, device_type) != torch.float32 else 4
        metrics["adapter_bytes"] = sum(p.stat().st_size for p in weights)
        metrics["full_model_bytes"] = (total - (trainable if lora.method != "full" else 0)) * bytes_per_param
        metrics["wall_seconds"] = round(time.perf_counter() - t_start, 2)  # everything but the final rename
        manifest = {
            "stage": stage.name,
            "kind": stage.kind,
            "method": lora.method,
            "base": m.base,
            "base_resolved": ctx.base_path,
            "parents": chain.parents,
            "initialized_from": chain.init_from,
            "config_hash": config_hash,
            "max_steps_cap": ctx.max_steps,
            "adapter_sha256": _digest([file_sha256(p) for p in sorted(weights)]),
            "lora": lora.model_dump(),
            "stage_config": stage.model_dump(),
            "data": data,
            "metrics": metrics,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        resolved = {"model": m.model_dump(), "finetune": ctx.cfg.model_dump(), "stage": stage.name}
        (tmp / "resolved_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        atomic_replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- data


def _kind_error(stage: StageConfig, path: Path, rows: list[dict]) -> str | None:
    texts = sum(1 for r in rows if is_text_example(r))
    if not rows:
        if stage.kind == "text":
            return (
                f"stage {stage.name} (kind: text): no document chunks in {path}; a text stage trains on the "
                "chunks of the documents in index.docs: add a folder there and rerun `raglora data`"
            )
        return f"stage {stage.name}: no training rows in {path}; check its sources/where and rerun `raglora data`"
    if stage.kind == "text" and texts < len(rows):
        return f'stage {stage.name} (kind: text): {path} holds conversations; a text stage needs {{"text"}} rows'
    if stage.kind == "chat" and texts:
        return f"stage {stage.name} (kind: chat): {path} holds document rows; set the stage's kind: text"
    return None


def stage_rows(i: int, stage: StageConfig, *, cfg: FinetuneConfig, data_dir: Path, cache: dict) -> tuple:
    """(training rows, replay rows drawn from the stages it is trained on top of, {role: file facts for the
    manifest})."""
    train_path = _data_path(data_dir, stage.train_file)
    if stage.name not in cache:
        rows = load_examples(train_path, stage=stage.name, allow_empty=True)
        problem = _kind_error(stage, train_path, rows)
        if problem:
            raise RagloraError(problem)
        cache[stage.name] = rows
    train_rows = cache[stage.name]
    data_files = {"train": {"path": str(train_path), "sha256": file_sha256(train_path), "rows": len(train_rows)}}
    if stage.validation_file:
        val_path = _data_path(data_dir, stage.validation_file)
        if not val_path.is_file():
            raise RagloraError(f"stage {stage.name}: validation file not found: {val_path}")
        data_files["validation"] = {"path": str(val_path), "sha256": file_sha256(val_path)}
    replay: list[dict] = []
    lineage = cfg.lineage(stage.name)
    if stage.replay_fraction > 0 and lineage:
        earlier = []
        for s in lineage:
            p = _data_path(data_dir, s.train_file)
            if s.name not in cache:
                cache[s.name] = load_examples(p, stage=s.name, allow_empty=True)
            earlier += cache[s.name]
            data_files[f"replay:{s.name}"] = {"path": str(p), "sha256": file_sha256(p)}
        replay = sample_replay(earlier, len(train_rows), stage.replay_fraction, seed=f"{cfg.seed}:{stage.name}")
    return train_rows, replay, data_files


def stage_examples(
    stage: StageConfig,
    rows: list[dict],
    replay: list[dict],
    *,
    seed: int,
    tok,
    prompts: dict,
    max_length: int,
    index,
    gold_finder=None,
    exclude_chunks=(),
    withhold_chunks=None,
    refusal_answer: str = REFUSAL_ANSWER,
    judge=None,
) -> tuple[list[dict], dict | None, dict]:
    """Tokenized training examples exactly as the stage trains on them (RAFT contexts added when configured).

    `exclude_chunks`: chunk ids never used as RAFT distractors (the gold chunks of held-out rows);
    `withhold_chunks`: chunk ids never shown at all (held-out rows' own chunks; default: all of exclude_chunks);
    `judge`: the groundedness judge of RAFT citations (default: `finetune.raft.raft_judge(index)`).
    """
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
            search_mode=stage.raft_search_mode or "hybrid",
            context_chars=stage.raft_context_chars,
            fits=fits,
            gold_finder=gold_finder,
            exclude_chunks=exclude_chunks,
            withhold_chunks=withhold_chunks,
            refusal_answer=refusal_answer,
            judge=judge,
        )
    train_examples, tok_stats = _tokenize_all(tok, examples + replay, prompts["plain"], max_length)
    if not train_examples:
        raise RagloraError(f"stage {stage.name}: no training example fits model.max_length={max_length}")
    return train_examples, raft_stats, tok_stats


def _tokenize_all(tok, examples: list[dict], system_prompt: str, max_length: int) -> tuple[list[dict], dict]:
    """Chat rows: chat template, loss on assistant turns, truncated to max_length. Text rows: plain text, loss on
    every token, split into windows of max_length.

    A closed-book row's assistant turns get their [n]-like text rewritten ("see [3]" -> "see (3)",
    `finetune.prompt.defuse_citations`): only RAFT targets carry [n], and there it cites passage n.
    """
    out, truncated, dropped, split, defused = [], 0, 0, 0, 0
    for ex in examples:
        if is_text_example(ex):
            windows = tokenize_text(tok, ex["text"], max_length)
            split += int(len(windows) > 1)
            dropped += int(not windows)
            out += [{**w, "id": ex["id"], "stage": ex["stage"]} for w in windows]
            continue
        if "raft" in ex:
            msgs = ex["messages"]
        else:
            msgs = with_system(_defuse_turns(ex["messages"]), system_prompt)
            defused += int(msgs[-len(ex["messages"]) :] != ex["messages"])
        full = tokenize_conversation(tok, msgs, None)
        t = tokenize_conversation(tok, msgs, max_length) if full and full["length"] > max_length else full
        if t is None:
            dropped += 1
            continue
        truncated += int(full["length"] > max_length)
        out.append({**t, "id": ex["id"], "stage": ex["stage"]})
    return out, {
        "truncated": truncated,
        "dropped": dropped,
        "split_into_windows": split,
        "citation_like_rewritten": defused,
    }


def _defuse_turns(messages: list[dict]) -> list[dict]:
    return [{**m, "content": defuse_citations(m["content"])} if m["role"] == "assistant" else m for m in messages]


def _val_examples(stage: StageConfig, *, data_dir, tok, prompts, max_length, limit, cache) -> list[dict]:
    """The stage's first `limit` validation rows, tokenized like its training rows (cached per run)."""
    if stage.name not in cache:
        if not stage.validation_file:
            cache[stage.name] = []
        else:
            path = _data_path(data_dir, stage.validation_file)
            rows = load_examples(path, stage=stage.name, allow_empty=True)[:limit]
            cache[stage.name] = _tokenize_all(tok, rows, prompts["plain"], max_length)[0]
    return cache[stage.name]


def _stage_val_examples(ctx: RunContext, stage: StageConfig) -> list[dict]:
    return _val_examples(
        stage, data_dir=ctx.data_dir, tok=ctx.tok, prompts=ctx.prompts, max_length=ctx.model_cfg.max_length,
        limit=ctx.cfg.eval_max_examples, cache=ctx.val_cache,
    )  # fmt: skip


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
