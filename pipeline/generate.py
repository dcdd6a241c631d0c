"""Generation: a dynamic batcher over `pipeline.stage_models.StageModels` that streams tokens.

`Generator` owns the model in one worker thread: concurrent requests queue, the worker collects up to
`max_batch_size` within `batch_wait_ms`, groups them by (stage, sampling parameters), left-pads and runs
`model.generate` (KV cache, greedy unless a temperature is given, repetition control on the answer tokens).
Tokens are streamed back per request through a batch-aware streamer; a per-row stopping criterion honours
each request's own `max_new_tokens` and cancellation (client disconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from pipeline.stage_models import StageModels
from raglora.errors import RagloraError

log = logging.getLogger("raglora.generate")

MIN_SAMPLING_TEMPERATURE = 1e-5


# -- requests and streaming ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. Serving, the terminal chat and evaluation all use these defaults."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    # Repetition control on the answer's own tokens (see `repetition_processors`): a small greedy model otherwise
    # falls into one line repeated until max_new_tokens. repetition_penalty, HF semantics: a seen
    # token's logit is divided by the penalty when positive, multiplied when negative; 1.0 = off.
    # no_repeat_ngram_size: no token n-gram of the answer occurs twice; 0 = off.
    # Measured by bench/sampling_defaults.py (40 validation questions of the kb stages, rag+lora-subdomain,
    # greedy, 48 new tokens; token F1, paired difference to off [95% bootstrap CI], loop rate = share of answers
    # with a line or word 4-gram >= 3 times; 2 shared CPU cores, load average 4.2-5.3 during the run):
    #   off     F1 0.397                          loops 0.125
    #   rp 1.1  F1 0.383  -0.014 [-0.081, +0.050]  loops 0
    #   rp 1.2  F1 0.357  -0.040 [-0.098, +0.012]  loops 0
    #   ngram 4 F1 0.397  -0.000 [-0.007, +0.005]  loops 0
    # So: a 4-gram ban, no penalty. Not 3: a marker " [1]." is 3 tokens, so a 3-gram ban forbids citing a
    # passage twice. The ban can respell a long word that recurs ("Attefall" -> "Atte Fall"), at no F1 cost here.
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 4

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise RagloraError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise RagloraError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")

    @property
    def greedy(self) -> bool:
        # Sampling at temperature -> 0 is greedy decoding; below this, logits / temperature overflow to inf and
        # torch.multinomial fails ("probability tensor contains inf/nan"), so such requests decode greedily.
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def group_key(self) -> tuple:
        repetition = (self.repetition_penalty, self.no_repeat_ngram_size)
        return (
            ("greedy", *repetition) if self.greedy else ("sample", self.temperature, self.top_p, self.seed, *repetition)
        )


class _AnswerTokensOnly(LogitsProcessor):
    """Runs a transformers logits processor on the generated tokens only.

    Every row of a batch is left-padded to `prompt_width`, so `input_ids[:, prompt_width:]` is each row's answer
    so far, whatever its prompt length. This keeps a batched row equal to the same request run alone (HF's
    processors over the whole row would penalise the left padding, which is often the EOS token, in short
    prompts only), and leaves the prompt out: a RAG answer should be free to copy its passages' words and the
    `[n]` markers the prompt numbers them with.
    """

    def __init__(self, processor: LogitsProcessor, prompt_width: int):
        self.processor = processor
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_width :]  # (B, tokens generated so far)
        return self.processor(answer, scores) if answer.shape[1] else scores


def repetition_processors(params: SamplingParams, prompt_width: int) -> LogitsProcessorList:
    """transformers' RepetitionPenaltyLogitsProcessor / NoRepeatNGramLogitsProcessor for `params`, applied to
    the answer tokens of a batch left-padded to `prompt_width` (empty when repetition control is off)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(
            _AnswerTokensOnly(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)), prompt_width)
        )
    if params.no_repeat_ngram_size > 0:
        processors.append(_AnswerTokensOnly(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size), prompt_width))
    return processors


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    total_s: float
    batch_size: int


_END = object()


class GenerationHandle:
    """One queued request. Iterate (sync) or `astream()` (async) for text deltas; `result()` waits for the end."""

    def __init__(self, prompt_ids: list[int], stage: str | None, params: SamplingParams, loop=None):
        self.id = uuid.uuid4().hex[:12]
        self.prompt_ids = list(prompt_ids)
        self.stage = stage
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.batch_size = 0
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    # producer side (worker thread)
    def _emit(self, item) -> None:
        if self._loop is None:
            self._q.put(item)
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)

    def _push_delta(self, delta: str) -> None:
        if delta:
            self.text += delta
            self._emit(delta)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        self.error = error
        self.finished_at = time.perf_counter()
        self._done.set()
        self._emit(_END)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating for this request (the worker notices at its next token)."""
        self._cancel.set()

    # consumer side
    def __iter__(self) -> Iterator[str]:
        if self._loop is not None:
            raise RuntimeError("this handle was submitted with an event loop: use astream()")
        while True:
            item = self._q.get()
            if item is _END:
                break
            yield item
        if self.error is not None:
            raise self.error

    async def astream(self) -> AsyncIterator[str]:
        if self._loop is None:
            raise RuntimeError("this handle was submitted without an event loop: iterate it instead")
        while True:
            item = await self._q.get()
            if item is _END:
                break
            yield item
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason or "stop",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.submitted,
            total_s=(self.finished_at or time.perf_counter()) - self.submitted,
            batch_size=self.batch_size,
        )


class _RowStreamer(BaseStreamer):
    """Splits each generated token column across the batch's handles and detokenizes incrementally."""

    def __init__(self, handles: list[GenerationHandle], tokenizer, eos_ids: set[int]):
        self.handles = handles
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        tokens = value.reshape(len(self.handles), -1)[:, -1].tolist()
        now = time.perf_counter()
        for handle, tok in zip(self.handles, tokens, strict=True):
            if handle.done:
                continue
            if handle.cancelled:
                handle._finish("cancelled")
                continue
            if tok in self.eos_ids:
                self._flush(handle)
                handle._finish("stop")
                continue
            if handle.first_token_at is None:
                handle.first_token_at = now
            handle.token_ids.append(tok)
            self._flush(handle, final=False)
            if len(handle.token_ids) >= handle.params.max_new_tokens:
                self._flush(handle)
                handle._finish("length")

    def _flush(self, handle: GenerationHandle, final: bool = True) -> None:
        text = self.tokenizer.decode(handle.token_ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(handle.text):
            handle._push_delta(text[len(handle.text) :])

    def end(self) -> None:
        for handle in self.handles:
            if not handle.done:
                self._flush(handle)
                handle._finish("cancelled" if handle.cancelled else "stop")


class _RowStop(StoppingCriteria):
    def __init__(self, handles: list[GenerationHandle]):
        self.handles = handles

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        flags = [h.done or h.cancelled for h in self.handles]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


class Generator:
    """Owns the model in one worker thread; `submit()` from any thread or event loop."""

    def __init__(
        self,
        models: StageModels,
        *,
        batching: bool = True,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10.0,
        on_batch: Callable[[int, str | None, float], None] | None = None,
    ):
        self.models = models
        self.tokenizer = models.tokenizer
        self.batching = batching
        self.max_batch_size = max_batch_size if batching else 1
        self.batch_wait_s = batch_wait_ms / 1000.0 if batching else 0.0
        self.on_batch = on_batch
        self.eos_ids = eos_token_ids(models.base, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids) if self.eos_ids else 0
        self.batches_run = 0
        self.batch_sizes: list[int] = []
        self._q: queue.Queue[GenerationHandle | None] = queue.Queue()
        self._closing = False
        self._thread = threading.Thread(target=self._worker, name="raglora-generator", daemon=True)
        self._thread.start()

    # API ---------------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        *,
        stage: str | None = None,
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> GenerationHandle:
        if self._closing:
            raise RagloraError("the server is shutting down; retry shortly")
        if not prompt_ids:
            raise RagloraError("empty prompt")
        self.models.check_stage(stage)
        handle = GenerationHandle(prompt_ids, stage, params or SamplingParams(), loop=loop)
        self._q.put(handle)
        return handle

    def generate(
        self, prompt_ids: list[int], *, stage: str | None = None, params: SamplingParams | None = None
    ) -> GenerationResult:
        return self.submit(prompt_ids, stage=stage, params=params).result()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting requests, finish the queued and running ones, stop the worker."""
        if self._closing:
            return
        self._closing = True
        self._q.put(None)
        self._thread.join(timeout)

    # Worker ------------------------------------------------------------------------------------------------

    def _collect(self, first: GenerationHandle) -> tuple[list[GenerationHandle], bool]:
        batch = [first]
        stop = False
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _worker(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is None:
                # drain anything that raced in behind the sentinel
                pending = []
                while True:
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        pending.append(item)
                if not pending:
                    break
                batch, stop = pending, True
            else:
                batch, stop = self._collect(first)
            groups: dict[tuple, list[GenerationHandle]] = {}
            for handle in batch:
                if handle.cancelled:
                    handle._finish("cancelled")
                    continue
                groups.setdefault((handle.stage, handle.params.group_key()), []).append(handle)
            for (stage, _), handles in groups.items():
                for i in range(0, len(handles), self.max_batch_size):
                    self._run_group(handles[i : i + self.max_batch_size], stage)

    def _run_group(self, handles: list[GenerationHandle], stage: str | None) -> None:
        started = time.perf_counter()
        try:
            device = self.models.device
            width = max(len(h.prompt_ids) for h in handles)
            ids = torch.full((len(handles), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(handles), width), dtype=torch.long)
            for row, h in enumerate(handles):
                n = len(h.prompt_ids)
                ids[row, width - n :] = torch.tensor(h.prompt_ids, dtype=torch.long)
                mask[row, width - n :] = 1
                h.batch_size = len(handles)
            params = handles[0].params
            gen_cfg = GenerationConfig(
                max_new_tokens=max(h.params.max_new_tokens for h in handles),
                do_sample=not params.greedy,
                temperature=None if params.greedy else params.temperature,
                top_p=None if params.greedy else params.top_p,
                top_k=None,
                eos_token_id=sorted(self.eos_ids) or None,
                pad_token_id=self.pad_id,
            )
            if not params.greedy and params.seed is not None:
                torch.manual_seed(params.seed)
            streamer = _RowStreamer(handles, self.tokenizer, self.eos_ids)
            with torch.inference_mode(), self.models.use(stage) as model:
                model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_cfg,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_RowStop(handles)]),
                    logits_processor=repetition_processors(params, width),
                )
            streamer.end()
        except Exception as exc:  # never kill the worker: fail this group's requests instead
            log.exception("generation failed for a batch of %d", len(handles))
            for h in handles:
                h._finish("error", RagloraError(f"generation failed: {type(exc).__name__}"))
        self.batches_run += 1
        self.batch_sizes.append(len(handles))
        if self.on_batch is not None:
            with contextlib.suppress(Exception):
                self.on_batch(len(handles), stage, time.perf_counter() - started)


__all__ = [
    "GenerationHandle",
    "GenerationResult",
    "Generator",
    "SamplingParams",
    "eos_token_ids",
    "repetition_processors",
]
