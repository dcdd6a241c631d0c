"""The composition root: one `AnswerService` from the root config (model, stage adapters, index, store, persona).

Everything project-specific comes from the config: the persona (`project.name`, `project.description`) fills
the system prompts, the hand-off replies are `project.handoff_reply` / `project.no_answer_reply`, the hand-off
and follow-up rules follow `index.language`, and the default stage is `serve.default_stage` or the deepest
trained stage. With an index, the service also gets the answerability gate fitted by `raglora gate` (when there is
one and `serve.gate` is on) and the groundedness judge that verifies citations, calibrated on the index's chunks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.answer import AnswerService
from pipeline.generate import Generator
from pipeline.handoff import DEFAULT_LANGUAGE, HANDOFF_REPLY, LOW_SCORE_REPLY
from pipeline.metrics import JUDGE_CALIBRATION_METHOD, Judge, calibrate_judge
from pipeline.stage_models import StageModels
from pipeline.store import ConversationStore
from raglora.files import atomic_write_text, file_sha256

if TYPE_CHECKING:
    from pipeline.api.settings import ServeConfig

log = logging.getLogger("raglora.answer")


def serve_config(cfg) -> ServeConfig:
    from pipeline.api.settings import ServeConfig

    serve = getattr(cfg, "serve", None)
    return serve if serve is not None else ServeConfig()


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("raglora", "torch", "transformers", "peft", "fastapi"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def build_judge(index, n_pairs: int, seed: int = 0, *, cache: str | Path | None = None) -> tuple[Judge, dict]:
    """The groundedness judge on the index's embedder, its threshold calibrated on `n_pairs` (sentence, passage)
    pairs drawn from the index's chunks (`pipeline.metrics.calibrate_judge`, seeded: the same index gives the same
    threshold). Returns (judge, calibration); calibration["seconds"] is what it cost at this start.

    Calibration embeds every sentence of the sampled passages (~8 s for 100 pairs on the demo index on two CPU
    cores), so the result is kept in `cache` (a JSON file) under a key of the index manifest, the embedder, the
    pairs and the seed: a restart on the same index reuses it; a rebuilt index or another embedder recalibrates.
    """
    embedder = index.embedder

    def embed(texts):
        return embedder.encode(list(texts), batch_size=64)

    t0 = time.perf_counter()
    manifest = Path(index.path) / "manifest.json"
    key = {
        "index_manifest": file_sha256(manifest) if manifest.exists() else None,
        "embedder": getattr(embedder, "name", None),
        "n_pairs": n_pairs,
        "seed": seed,
        "method": JUDGE_CALIBRATION_METHOD,
    }
    calibration = None
    if cache is not None and key["index_manifest"] is not None and Path(cache).exists():
        try:
            stored = json.loads(Path(cache).read_text(encoding="utf-8"))
            if stored.get("key") == key:
                calibration = dict(stored["calibration"], cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            calibration = None  # unreadable: calibrate again and overwrite it
    if calibration is None:
        calibration = calibrate_judge([c.text for c in index.chunks], embed, n_pairs, seed=seed)
        if cache is not None and key["index_manifest"] is not None:
            try:
                atomic_write_text(cache, json.dumps({"key": key, "calibration": calibration}, indent=2) + "\n")
            except OSError as exc:  # a read-only artifacts folder must not stop serving
                log.warning("could not cache the judge calibration at %s: %s", cache, exc)
    calibration["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "citation judge: threshold %.3f from %s pairs (%s) in %.2fs",
        calibration["threshold"],
        calibration.get("n_supported", 0),
        "cached" if calibration.get("cached") else "calibrated",
        calibration["seconds"],
    )
    return Judge(embed=embed, threshold=float(calibration["threshold"])), calibration


def gate_dir(cfg) -> Path:
    """Where `raglora gate` writes the answerability gate: paths.gate_dir, else <artifacts_dir>/gate."""
    configured = getattr(cfg.paths, "gate_dir", None)
    return Path(configured) if configured else Path(cfg.paths.artifacts_dir) / "gate"


def config_context_window(base: str, cache_dir) -> int | None:
    """The base model's max_position_embeddings from its config.json alone (no weights); None when unreadable."""
    from transformers import AutoConfig

    from finetune.model import resolve_base

    try:
        return int(AutoConfig.from_pretrained(resolve_base(base, cache_dir)).max_position_embeddings)
    except Exception:  # no config here: the upstream's max_model_len or the tokenizer's limit decides
        return None


def upstream_generator(cfg, serve: ServeConfig, tokenizer=None, on_batch: Callable | None = None):
    """`serve.generator: openai`: the tokenizer and the stages' manifests are read here, the weights stay upstream.

    Checks the upstream's model list (pipeline.upstream): a stage it does not serve stops startup with one line.
    """
    from pipeline.upstream import UpstreamGenerator, UpstreamModels

    context_window = None  # a given tokenizer (tests): the upstream's max_model_len, else the tokenizer's limit
    if tokenizer is None:
        from finetune.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.base, cache_dir=cfg.paths.base_cache_dir)
        context_window = config_context_window(cfg.model.base, cfg.paths.base_cache_dir)
    models = UpstreamModels.from_adapters(tokenizer, cfg.paths.adapters_dir)
    return UpstreamGenerator(
        models,
        url=serve.upstream_url,
        api_key=serve.upstream_api_key,
        upstream_models=serve.upstream_models,
        base_model=serve.upstream_base_model,
        timeout_s=serve.upstream_timeout_s,
        prompt_format=serve.upstream_prompt,
        on_batch=on_batch,
        context_window=context_window,
    )


def build_service(
    cfg,
    *,
    serve: ServeConfig | None = None,
    with_index: bool = True,
    with_store: bool = True,
    model_and_tokenizer: tuple | None = None,
    on_batch: Callable | None = None,
) -> AnswerService:
    """Load the base model once, its stage adapters, the index and the store, as configured; with
    `serve.generator: openai` only the tokenizer, and generation goes to the upstream engine.

    `cfg` is the root `pipeline.config.Config`; `serve` overrides `cfg.serve`.
    """
    serve = serve or serve_config(cfg)
    if serve.generator == "openai":
        tokenizer = model_and_tokenizer[1] if model_and_tokenizer is not None else None
        generator = upstream_generator(cfg, serve, tokenizer, on_batch)
        models = generator.models
    else:
        if model_and_tokenizer is None:
            from finetune.model import load_base

            mc = cfg.model
            model, tokenizer = load_base(
                mc.base,
                cache_dir=cfg.paths.base_cache_dir,
                device=mc.device,
                dtype=mc.dtype,
                attn_implementation=mc.attn_implementation,
            )
        else:
            model, tokenizer = model_and_tokenizer
        models = StageModels(model, tokenizer, cfg.paths.adapters_dir, strategy=serve.adapter_strategy)
        generator = Generator(
            models,
            batching=serve.batching,
            max_batch_size=serve.max_batch_size,
            batch_wait_ms=serve.batch_wait_ms,
            prefill_chunk_tokens=serve.prefill_chunk_tokens,
            on_batch=on_batch,
        )
    index = None
    if with_index and not Path(cfg.paths.index_dir).exists():
        log.warning("no index at %s: rag modes are off (build it with `raglora index`)", cfg.paths.index_dir)
    if with_index and Path(cfg.paths.index_dir).exists():
        from retriever.embedder import load_embedder
        from retriever.index import load_index

        index = load_index(cfg.paths.index_dir, load_embedder(cfg.index.embedder))
        check = getattr(index, "check_search_settings", None)
        if check is not None:  # an out-of-range nprobe fails at startup, not on every request
            check(cfg.retrieval.nprobe, cfg.retrieval.ef_search)
    reranker = None
    if index is not None and cfg.retrieval.reranker:
        from retriever.rerank import load_reranker

        reranker = load_reranker(cfg.retrieval.reranker)  # once, at startup: a bad path fails here, not per request
    project = getattr(cfg, "project", None)
    versions = package_versions()
    versions["base_model"] = getattr(cfg.model, "base", None)
    versions["stages"] = models.stage_names
    if reranker is not None:
        versions["reranker"] = reranker.name
    if serve.generator == "openai":
        versions["generator"] = {
            "upstream": generator.url,
            "models": {s or "(base)": n for s, n in generator.model_names.items()},
        }
    from finetune.prompt import system_prompts

    # The same prompt files and persona as training and evaluation.
    prompts = system_prompts(
        cfg.model.system_prompt_file,
        cfg.model.rag_system_prompt_file,
        name=cfg.project.name,
        description=cfg.project.description,
    )
    system_prompt, rag_system_prompt = prompts["plain"], prompts["rag"]
    store = None
    try:
        gate = judge = calibration = None
        if index is not None:
            index_dir = Path(cfg.paths.index_dir)
            cache = index_dir.with_name(index_dir.name + ".judge.json")  # beside the index (artifacts/index.judge.json)
            judge, calibration = build_judge(index, serve.judge_calibration_pairs, cache=cache)
            versions["citation_judge"] = {
                "threshold": calibration["threshold"],
                "calibration_s": calibration["seconds"],
                "cached": bool(calibration.get("cached")),
            }
            answerability = f"handoff_threshold {serve.handoff_threshold}"
            if serve.gate:
                from pipeline.gate import load_gate, stale_reason

                gate = load_gate(gate_dir(cfg))
                stale = stale_reason(gate_dir(cfg), cfg.paths.index_dir) if gate is not None else None
                if gate is None:
                    log.info("no answerability gate at %s: hand-over by serve.handoff_threshold", gate_dir(cfg))
                elif stale:
                    # Its features were calibrated on other documents: its probabilities mean nothing here.
                    log.warning("%s; until then hand-over by serve.handoff_threshold", stale)
                    gate, answerability = None, f"{answerability} (stale gate: {stale})"
                else:
                    answerability = f"gate {gate_dir(cfg)}"
            versions["answerability"] = answerability
        store = ConversationStore(serve.db_url or serve.db_path) if with_store else None
        return AnswerService(
            generator,
            index,
            store=store,
            system_prompt=system_prompt,
            rag_system_prompt=rag_system_prompt,
            retrieval=cfg.retrieval.model_dump(),
            handoff_threshold=serve.handoff_threshold,
            default_mode=serve.default_mode,
            default_stage=serve.default_stage,
            max_new_tokens_default=serve.max_new_tokens_default,
            versions=versions,
            handoff_reply=getattr(project, "handoff_reply", None) or HANDOFF_REPLY,
            no_answer_reply=getattr(project, "no_answer_reply", None) or LOW_SCORE_REPLY,
            language=getattr(getattr(cfg, "index", None), "language", None) or DEFAULT_LANGUAGE,
            gate=gate,
            judge=judge,
            judge_calibration=calibration,
            reranker=reranker,
            citation_policy=serve.citations,
            max_unsupported_share=serve.max_unsupported_share,
        )
    except BaseException:
        generator.close()  # a bad serve.default_stage (or gate) must not leave the worker thread running
        if store is not None:
            store.close()
        raise
