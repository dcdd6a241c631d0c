"""The project's base model as the writer of hypothetical questions (`index.doc_questions: generate`).

retriever.questions knows what to ask and how to parse it; this module supplies the model, through the same
batching engine that serves chat, loaded only when some chunk needs new questions.
"""

from __future__ import annotations

import contextlib
from functools import partial


def base_model_writer(cfg, per_chunk: int, stack: contextlib.ExitStack):
    """A generator factory for retriever.questions.add_questions_fn; the engine closes with `stack`."""
    writer = []  # loaded once, on the first call

    def factory():
        if writer:
            return writer[0]
        from finetune.model import load_base
        from finetune.prompt import chat_ids
        from pipeline.generate import Generator, SamplingParams
        from pipeline.stage_models import StageModels
        from retriever.questions import generator_writer

        mc = cfg.model
        model, tok = load_base(mc.base, cache_dir=cfg.paths.base_cache_dir, device=mc.device, dtype=mc.dtype)
        gen = Generator(StageModels(model, tok), max_batch_size=cfg.eval.batch_size, batch_wait_ms=50)
        stack.callback(gen.close)
        # One short question per line: ~25 tokens each. Lines may repeat words, so no n-gram ban.
        params = SamplingParams(max_new_tokens=25 * per_chunk, no_repeat_ngram_size=0)
        writer.append(generator_writer(gen, partial(chat_ids, tok, add_generation_prompt=True), params))
        return writer[0]

    return factory


def add_questions_for(cfg, stack: contextlib.ExitStack):
    """The `add_questions` callable `raglora index` passes to build_index (None when doc_questions is off);
    its `.settings` name the base model too, so another model's questions are not reused."""
    from retriever.questions import add_questions_fn

    ic = cfg.index
    factory = base_model_writer(cfg, ic.doc_questions_per_chunk, stack) if ic.doc_questions == "generate" else None
    add = add_questions_fn(ic.doc_questions, ic.doc_questions_per_chunk, generator_factory=factory)
    if add is not None and ic.doc_questions == "generate":
        add.settings["model"] = cfg.model.base
    return add
