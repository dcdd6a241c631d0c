"""The composition root: one `AnswerService` from the root config (model, stage adapters, index, store, persona).

Everything project-specific comes from the config: the persona (`project.name`, `project.description`) fills
the system prompts, the hand-off replies are `project.handoff_reply` / `project.no_answer_reply`, the hand-off
and follow-up rules follow `index.language`, and the default stage is `serve.default_stage` or the deepest
trained stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.answer import AnswerService
from pipeline.generate import Generator, StageModels
from pipeline.handoff import DEFAULT_LANGUAGE, HANDOFF_REPLY, LOW_SCORE_REPLY
from pipeline.store import ConversationStore

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


def build_service(
    cfg,
    *,
    serve: ServeConfig | None = None,
    with_index: bool = True,
    with_store: bool = True,
    model_and_tokenizer: tuple | None = None,
    on_batch: Callable | None = None,
) -> AnswerService:
    """Load the base model once, its stage adapters, the index and the store, as configured.

    `cfg` is the root `pipeline.config.Config`; `serve` overrides `cfg.serve`.
    """
    serve = serve or serve_config(cfg)
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
        on_batch=on_batch,
    )
    index = None
    if with_index and not Path(cfg.paths.index_dir).exists():
        log.warning("no index at %s: rag modes are off (build it with `raglora index`)", cfg.paths.index_dir)
    if with_index and Path(cfg.paths.index_dir).exists():
        from retriever.embedder import load_embedder
        from retriever.index import load_index

        index = load_index(cfg.paths.index_dir, load_embedder(cfg.index.embedder))
    project = getattr(cfg, "project", None)
    versions = package_versions()
    versions["base_model"] = getattr(cfg.model, "base", None)
    versions["stages"] = models.stage_names
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
        store = ConversationStore(serve.db_path) if with_store else None
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
        )
    except BaseException:
        generator.close()  # a bad serve.default_stage must not leave the worker thread running
        if store is not None:
            store.close()
        raise
