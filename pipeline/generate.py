"""Generation: a continuous-batching engine over `pipeline.stage_models.StageModels` that streams tokens.

`Generator` owns the model in one worker thread. Requests queue from any thread or event loop; each loop of the
worker (a *step*) admits waiting requests, runs at most one prefill chunk for the prompts that are joining, runs
one decode forward over every running row, streams each row its new text and lets finished rows leave. So a
request joins between two decode steps and never waits for a whole batch to finish (static batching did).

- KV cache: one left-padded cache for the running batch, not one per row. A decode step is then a single
  forward over a (rows, 1) input with nothing stacked per step. The cache is a `transformers.DynamicCache`
  whose layers (`_SlotLayer`) write into preallocated buffers instead of concatenating, so a step copies one
  column, not the whole cache. Copies happen on events only: when prompts join (the running cache and the
  joiners' cache are put side by side, the shorter one left-padded) and when rows leave (the survivors are
  selected, then the columns that became padding for every row are dropped). Padding columns are masked by
  the 2-D attention mask, rebuilt each step from each row's token count, and every row has its own position ids.
- Chunked prefill: joining prompts are prefilled in their own cache, at most `prefill_chunk_tokens` (padded)
  tokens per step, then merged, so running streams stall for at most one chunk per step. Short prompts that
  arrive together share one chunk; a long prompt is split over several steps. A single joining prompt that
  starts like the previous prompt of its stage (the same system prompt) copies that start's stored K/V instead
  of prefilling it again (automatic prefix caching as in vLLM, one entry per stage; `prefix_tokens_reused`).
- Stages: when `models.mixes_stages` (cumulative adapters) rows of any stage share a forward through
  `models.use_rows(stages)` (PEFT's per-row `adapter_names`). Otherwise the running batch holds one stage at a
  time: waiting requests are admitted oldest first and a request of another stage at the head of the queue
  stops admissions until the batch drains, so no stage starves.
- Decoding per row: greedy (one vectorised argmax over the batch) or sampling with the row's temperature and
  top_p and its own `torch.Generator` (seeded by `params.seed`, so a seeded sample does not depend on its batch
  mates); the repetition penalty and n-gram ban on the row's own answer tokens (kept incrementally, only for
  rows that ask for them); the row's own `max_new_tokens`, EOS and cancellation (client disconnect).
- Streaming detokenisation is incremental (prefix/read offsets as in vLLM and TGI): two short windows are
  decoded per token, never the whole answer, and an incomplete UTF-8 sequence waits for its next byte.
- A *batch* is one decode step: `batches_run` counts them, `batch_sizes` keeps recent row counts and
  `on_batch(rows, stage, seconds)` is called once per step (stage: the rows' stage when they share one, else
  None). `batching=False` runs the same engine with one row at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.cache_utils import DynamicLayer

from pipeline.stage_models import StageModels
from raglora import threads
from raglora.errors import RagloraError

log = logging.getLogger("raglora.generate")

MIN_SAMPLING_TEMPERATURE = 1e-5
CACHE_HEADROOM = 64  # free cache columns a buffer gets when it is (re)allocated; it then grows by half
BATCH_SIZES_KEPT = 10_000  # `Generator.batch_sizes` keeps the most recent decode steps only
PREFIX_MIN_TOKENS = 32  # a shared prompt start shorter than this is prefilled again (not worth a cache copy)


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
    the answer tokens of a batch left-padded to `prompt_width` (empty when repetition control is off).

    For `model.generate` callers; the engine keeps the same rules incrementally per row (`_Row`)."""
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
    """One queued request. Iterate (sync) or `astream()` (async) for text deltas; `result()` waits for the end.

    `batch_size` is the most rows this request shared a forward with. Producers (the engine, or another
    generator feeding the same handle) call `_push_delta` and `_finish`.
    """

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
        """Stop generating for this request (the worker notices before its next token)."""
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


def detokenize_step(tokenizer, ids: list[int], prefix_offset: int, read_offset: int) -> tuple[str, int, int]:
    """The text that `ids[-1]` adds, decoding two short windows instead of the whole answer (vLLM/TGI).

    `ids[prefix_offset:read_offset]` is the window emitted last: decoding it together with the new tokens keeps
    what a token means next to its neighbours (SentencePiece's leading spaces, merges across tokens). An
    incomplete UTF-8 sequence decodes to U+FFFD at the end: then nothing is emitted until its next byte arrives.
    Start with offsets (0, 0) for an answer; returns (delta, prefix_offset, read_offset).
    """
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    new_text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=True)
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        return new_text[len(prefix_text) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


# -- KV cache ---------------------------------------------------------------------------------------------


class _SlotLayer(DynamicLayer):
    """A DynamicLayer that writes into preallocated (rows, heads, capacity, head_dim) buffers.

    `keys`/`values` are views of the first `n` columns, so a decode step writes one column instead of
    concatenating the whole cache (DynamicLayer's `torch.cat`). Columns past `n` are never read; left-padding
    columns are zero or a pad token's states, always finite, and masked.
    """

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self.n = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True
        cap = max(self.capacity, key_states.shape[-2])
        self._k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.n + key_states.shape[-2]
        if end > self._k.shape[-2]:
            cap = max(end, self._k.shape[-2] + max(CACHE_HEADROOM, self._k.shape[-2] // 2))
            self._k, self._v = self._resized(self._k, cap), self._resized(self._v, cap)
        self._k[:, :, self.n : end] = key_states
        self._v[:, :, self.n : end] = value_states
        self.n = end
        self._views()
        return self.keys, self.values

    def _resized(self, buf: torch.Tensor, cap: int) -> torch.Tensor:
        new = buf.new_empty((*buf.shape[:2], cap, buf.shape[-1]))
        new[:, :, : self.n] = buf[:, :, : self.n]
        return new

    def get_seq_length(self) -> int:
        return self.n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (a copy: rows left the batch)."""
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def drop_left(self, columns: int) -> None:
        """Forget the first `columns` columns (padding for every row left); a view, no copy."""
        if self.is_initialized and columns:
            self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
            self.n -= columns
            self._views()

    def reset(self) -> None:
        super().reset()
        self.n = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the engine's cache is not cropped")

    @classmethod
    def prefilled(cls, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> _SlotLayer:
        """A layer holding a copy of `keys`/`values` (a stored prompt start) with room for `capacity` columns."""
        out = cls(capacity)
        out.lazy_initialization(keys, values)
        out.n = keys.shape[-2]
        out._k[:, :, : out.n], out._v[:, :, : out.n] = keys, values
        out._views()
        return out

    @classmethod
    def stacked(cls, top: _SlotLayer, bottom: _SlotLayer, width: int) -> _SlotLayer:
        """`top`'s rows then `bottom`'s, each right-aligned to `width` columns (the shorter one left-padded)."""
        out = cls()
        out.device, out.is_initialized, out.n = top.device, True, width
        rows = (top._k.shape[0], bottom._k.shape[0])
        for name in ("_k", "_v"):
            a, b = getattr(top, name), getattr(bottom, name)
            buf = a.new_empty((rows[0] + rows[1], a.shape[1], width + CACHE_HEADROOM, a.shape[-1]))
            for start, src, n in ((0, a, top.n), (rows[0], b, bottom.n)):
                block = buf[start : start + src.shape[0]]
                block[:, :, : width - n].zero_()
                block[:, :, width - n : width] = src[:, :, :n]
            setattr(out, name, buf)
        out._views()
        return out


def _new_cache(capacity: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: _SlotLayer(capacity)
    return cache


# -- rows -------------------------------------------------------------------------------------------------


class _Row:
    """One request's decoding state in the engine."""

    __slots__ = ("handle", "stage", "params", "tokens", "generator", "ngram", "ngram_seen", "seen", "offsets")

    def __init__(self, handle: GenerationHandle, device: torch.device):
        p = handle.params
        self.handle, self.stage, self.params, self.tokens = handle, handle.stage, p, handle.token_ids
        self.generator: torch.Generator | None = None
        if not p.greedy:
            self.generator = torch.Generator(device=device)
            if p.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(p.seed)
        self.ngram = p.no_repeat_ngram_size
        self.ngram_seen: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram of the answer -> tokens that followed
        self.seen: set[int] | None = set() if p.repetition_penalty != 1.0 else None
        self.offsets = (0, 0)  # detokenize_step's prefix/read offsets

    def append(self, token: int) -> None:
        self.tokens.append(token)
        n = self.ngram
        if n and len(self.tokens) >= n:
            self.ngram_seen.setdefault(tuple(self.tokens[-n:-1]), set()).add(token)
        if self.seen is not None:
            self.seen.add(token)

    def banned(self) -> set[int] | tuple:
        """NoRepeatNGramLogitsProcessor's rule: tokens that would repeat an n-gram of the answer."""
        n, length = self.ngram, len(self.tokens)
        if not n or length + 1 < n:
            return ()
        return self.ngram_seen.get(tuple(self.tokens[length - n + 1 :]), ())

    def sample(self, scores: torch.Tensor) -> int:
        """Temperature, then top_p (TopPLogitsWarper's rule), then a draw from the row's own generator."""
        scores = scores / self.params.temperature
        if self.params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - self.params.top_p)
            remove[-1:] = False
            scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


def choose_tokens(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """The next token of each engine row from its (rows, vocab) float logits, modified in place: repetition
    control on the row's own answer for the rows that ask for it, one argmax for all rows, a draw for the
    sampling rows."""
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    sampled = []
    for i, row in enumerate(rows):
        if row.seen:
            ids = torch.tensor(list(row.seen), device=logits.device)
            s = logits[i, ids]
            logits[i, ids] = torch.where(s < 0, s * row.params.repetition_penalty, s / row.params.repetition_penalty)
        if row.ngram:
            banned = row.banned()
            ban_rows.extend([i] * len(banned))
            ban_cols.extend(banned)
        if row.generator is not None:
            sampled.append(i)
    if ban_rows:
        logits[ban_rows, ban_cols] = -float("inf")
    tokens = logits.argmax(-1).tolist()
    for i in sampled:
        tokens[i] = rows[i].sample(logits[i])
    return tokens


class _Joining:
    """Prompts being prefilled together: left-padded to `width`, a few columns (a chunk) per step."""

    def __init__(self, rows: list[_Row], pad_id: int, capacity: int):
        self.rows = rows
        self.lengths = [len(r.handle.prompt_ids) for r in rows]
        self.width = max(self.lengths)
        ids = torch.full((len(rows), self.width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, self.width - self.lengths[i] :] = torch.tensor(r.handle.prompt_ids, dtype=torch.long)
        self.ids = ids
        self.starts = torch.tensor([self.width - n for n in self.lengths], dtype=torch.long)  # first real column
        self.done = 0  # columns prefilled so far
        self.capacity = capacity
        self.reused = 0  # prompt tokens copied from a stored prompt start instead of prefilled
        self.cache = _new_cache(capacity)
        for r in rows:
            r.handle.batch_size = max(r.handle.batch_size, len(rows))


class _Running:
    """The rows being decoded, their shared left-padded cache and what each feeds next."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.n = 0  # cache columns in use; row i's tokens are its last `pos[i]` columns
        self.pos = torch.zeros(0, dtype=torch.long)  # (rows,) tokens each row has: its next position id
        self.next = torch.zeros(0, dtype=torch.long)  # (rows,) the token each row feeds next
        self.stages: list[str | None] = []
        self.stage: str | None = None  # the rows' stage when they share one, else None

    def _changed(self) -> None:
        self.stages = [r.stage for r in self.rows]
        kinds = set(self.stages)
        self.stage = next(iter(kinds)) if len(kinds) == 1 else None
        for r in self.rows:
            r.handle.batch_size = max(r.handle.batch_size, len(self.rows))

    def add(self, rows: list[_Row], cache: DynamicCache, width: int, pos: torch.Tensor, nxt: torch.Tensor) -> None:
        if not self.rows:
            self.cache, self.n, self.pos, self.next = cache, width, pos, nxt
        else:
            n = max(self.n, width)
            merged = DynamicCache()
            merged.layers = [_SlotLayer.stacked(a, b, n) for a, b in zip(self.cache.layers, cache.layers, strict=True)]
            self.cache, self.n = merged, n
            self.pos, self.next = torch.cat([self.pos, pos]), torch.cat([self.next, nxt])
        self.rows = self.rows + rows
        self._changed()
        self.trim()

    def keep(self, keep: list[int]) -> None:
        """Only rows `keep` stay (the others finished)."""
        if not keep:
            self.__init__()
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx.to(self.cache.layers[0].device))
        self.rows = [self.rows[i] for i in keep]
        self.pos, self.next = self.pos[idx], self.next[idx]
        self._changed()
        self.trim()

    def trim(self) -> None:
        """Drop the leading columns that are padding for every row."""
        first = self.n - int(self.pos.max())
        if first > 0:
            for layer in self.cache.layers:
                layer.drop_left(first)
            self.n -= first

    def mask(self, columns: int, pos: torch.Tensor) -> torch.Tensor:
        """(rows, columns) attention mask: row i's `pos[i]` tokens are its last columns."""
        return torch.arange(columns) >= (columns - pos)[:, None]


# -- the engine -------------------------------------------------------------------------------------------


def accept(
    generator, prompt_ids: list[int], stage: str | None, params: SamplingParams | None, loop
) -> GenerationHandle:
    """The checks every generator (this engine, `pipeline.upstream.UpstreamGenerator`) makes before it takes a
    request, and the handle it then feeds."""
    if generator._closing:
        raise RagloraError("the server is shutting down; retry shortly")
    if not prompt_ids:
        raise RagloraError("empty prompt")
    generator.models.check_stage(stage)
    return GenerationHandle(prompt_ids, stage, params or SamplingParams(), loop=loop)


class Generator:
    """Owns the model in one worker thread; `submit()` from any thread or event loop."""

    def __init__(
        self,
        models: StageModels,
        *,
        batching: bool = True,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10.0,
        prefill_chunk_tokens: int = 256,
        on_batch: Callable[[int, str | None, float], None] | None = None,
    ):
        if prefill_chunk_tokens < 1:
            raise RagloraError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.models = models
        self.tokenizer = models.tokenizer
        self.batching = batching
        self.max_batch_size = max(1, max_batch_size) if batching else 1
        self.batch_wait_s = batch_wait_ms / 1000.0 if batching else 0.0
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.on_batch = on_batch
        self.eos_ids = eos_token_ids(models.base, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids) if self.eos_ids else 0
        self.batches_run = 0
        self.batch_sizes: deque[int] = deque(maxlen=BATCH_SIZES_KEPT)
        self.mixes_stages = bool(getattr(models, "mixes_stages", False))
        self.device = models.device
        self.context_window = models.context_window
        params = inspect.signature(models.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._q: queue.Queue[GenerationHandle | None] = queue.Queue()
        self._waiting: deque[GenerationHandle] = deque()
        self._joining: _Joining | None = None
        self._running = _Running()
        # Per stage, the K/V of a recent prompt's start (prompts of one mode share their system prompt): a
        # single joining prompt that starts the same way copies it instead of prefilling it (vLLM's automatic
        # prefix caching, one entry per stage). The K/V depend on the stage's adapters, hence the key.
        self._prefixes: dict[str | None, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.prefix_tokens_reused = 0
        self._stopping = False
        self._closing = False
        # On CPU this thread keeps torch's intra-op threads; embedder work on other threads runs on one while the
        # engine runs (raglora.threads).
        self._cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else None
        if self._cpu_threads:
            threads.engine_started()
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
        handle = accept(self, prompt_ids, stage, params, loop)
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
        if self._cpu_threads:
            threads.engine_stopped()

    # Worker ------------------------------------------------------------------------------------------------

    def _take(self, item: GenerationHandle | None) -> None:
        if item is None:
            self._stopping = True
        else:
            self._waiting.append(item)

    def _receive(self, block: bool) -> None:
        """Move submitted requests to the waiting line; when idle, block for one and wait `batch_wait_ms` for
        company so that requests arriving together are prefilled together."""
        if block:
            self._take(self._q.get())
            deadline = time.perf_counter() + self.batch_wait_s
            while not self._stopping and len(self._waiting) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    self._take(self._q.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                self._take(self._q.get_nowait())
            except queue.Empty:
                return

    def _worker(self) -> None:
        if self._cpu_threads:
            torch.set_num_threads(self._cpu_threads)  # this thread's own setting: what its creator had
        with torch.inference_mode():
            while True:
                idle = not self._running.rows and self._joining is None and not self._waiting
                if idle and self._stopping:
                    self._receive(block=False)  # a request that raced in behind close()
                    if not self._waiting:
                        return
                    idle = False
                self._receive(block=idle)
                if any(h.cancelled for h in self._waiting):
                    for h in [h for h in self._waiting if h.cancelled]:
                        self._waiting.remove(h)
                        h._finish("cancelled")
                if self._joining is None:
                    self._admit()
                if self._running.rows:
                    self._decode_step()
                if self._joining is not None:
                    self._prefill_step()

    def _admit(self) -> None:
        """Start prefilling the oldest waiting requests that may join: as many as fit in one chunk (padded), or
        one long prompt; with one stage per batch, only the running stage's, up to the first of another."""
        room = self.max_batch_size - len(self._running.rows)
        if room <= 0 or not self._waiting:
            return
        stage = self._running.stage if self._running.rows else self._waiting[0].stage
        rows: list[_Row] = []
        width = 0
        while self._waiting and len(rows) < room:
            h = self._waiting[0]
            if not self.mixes_stages and h.stage != stage:
                break
            w = max(width, len(h.prompt_ids))
            if rows and (len(rows) + 1) * w > self.prefill_chunk_tokens:
                break
            self._waiting.popleft()
            if h.params.max_new_tokens < 1:
                h._finish("length")
                continue
            rows.append(_Row(h, self.device))
            width = w
        if rows:
            headroom = min(CACHE_HEADROOM, max(r.params.max_new_tokens for r in rows))
            self._joining = _Joining(rows, self.pad_id, width + headroom)
            if len(rows) == 1:
                self._reuse_prefix(self._joining)

    def _reuse_prefix(self, j: _Joining) -> None:
        """Start a single joining prompt from its stage's stored prompt start when they share enough tokens,
        and keep only the shared part stored (traffic converges on the common start, e.g. a system prompt)."""
        stage, prompt = j.rows[0].stage, j.rows[0].handle.prompt_ids
        stored = self._prefixes.get(stage)
        if stored is None:
            return
        tokens, kv = stored
        n, limit = 0, min(len(tokens), len(prompt) - 1)  # at least one token left to prefill for the logits
        while n < limit and tokens[n] == prompt[n]:
            n += 1
        if n < PREFIX_MIN_TOKENS:
            return
        if n < len(tokens):
            kv = [(k[:, :, :n], v[:, :, :n]) for k, v in kv]
            self._prefixes[stage] = (tokens[:n], kv)
        j.cache.layers = [_SlotLayer.prefilled(k, v, j.capacity) for k, v in kv]
        j.done = j.reused = n
        self.prefix_tokens_reused += n

    def _store_prefix(self, j: _Joining) -> None:
        """After a single prompt's prefill that found nothing to reuse, store its K/V for the next ones."""
        stage, prompt = j.rows[0].stage, j.rows[0].handle.prompt_ids
        if len(prompt) <= PREFIX_MIN_TOKENS:
            return
        kv = [(layer.keys[:1].clone(), layer.values[:1].clone()) for layer in j.cache.layers]
        self._prefixes[stage] = (list(prompt), kv)

    @contextlib.contextmanager
    def _module(self, stages: list[str | None]):
        if hasattr(self.models, "use_rows"):
            with self.models.use_rows(stages) as (module, kwargs):
                yield module, kwargs
        else:  # a StageModels without use_rows runs one stage per forward
            with self.models.use(stages[0]) as module:
                yield module, {}

    def _forward(self, stages, ids, mask, pos, cache) -> torch.Tensor:
        """One forward; returns the (rows, vocab) float32 logits of each row's last column."""
        dev = self.device
        with self._module(stages) as (module, kwargs):
            out = module(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                use_cache=True,
                **{self._cache_kw: cache},
                **self._extra_kw,
                **kwargs,
            )
        return out.logits[:, -1, :].float()

    def _prefill_step(self) -> None:
        """One chunk of the joining prompts; after the last, their first tokens and the merge into the batch."""
        j = self._joining
        try:
            if all(r.handle.cancelled for r in j.rows):
                for r in j.rows:
                    r.handle._finish("cancelled")
                self._joining = None
                return
            c0 = j.done
            c1 = min(j.width, c0 + max(1, self.prefill_chunk_tokens // len(j.rows)))
            cols = torch.arange(c0, c1)
            pos = (cols[None, :] - j.starts[:, None]).clamp_(min=0)
            mask = torch.arange(c1)[None, :] >= j.starts[:, None]
            logits = self._forward([r.stage for r in j.rows], j.ids[:, c0:c1], mask, pos, j.cache)
            j.done = c1
            if c1 < j.width:
                return
            self._joining = None
            if len(j.rows) == 1 and not j.reused:
                self._store_prefix(j)
            tokens = choose_tokens(j.rows, logits)
            now = time.perf_counter()
            lengths = torch.tensor(j.lengths, dtype=torch.long)
            keep = [
                i for i, (r, t) in enumerate(zip(j.rows, tokens, strict=True)) if self._advance(r, t, now, j.lengths[i])
            ]
            if not keep:
                return
            if len(keep) < len(j.rows):
                j.cache.batch_select_indices(torch.tensor(keep, device=self.device))
            width = j.width
            nxt = torch.tensor([tokens[i] for i in keep], dtype=torch.long)
            self._running.add([j.rows[i] for i in keep], j.cache, width, lengths[keep], nxt)
        except Exception as exc:  # never kill the worker: fail these requests instead
            log.exception("prefill failed for %d joining requests", len(j.rows))
            self._joining = None
            for r in j.rows:
                r.handle._finish("error", RagloraError(f"generation failed: {type(exc).__name__}"))

    def _decode_step(self) -> None:
        """One token for every running row (one forward), streamed; finished rows leave the batch."""
        run = self._running
        started = time.perf_counter()
        try:
            run.pos += 1  # the fed token is each row's newest
            logits = self._forward(
                run.stages, run.next[:, None], run.mask(run.n + 1, run.pos), run.pos[:, None] - 1, run.cache
            )
            run.n += 1
            tokens = choose_tokens(run.rows, logits)
            now = time.perf_counter()
            pos = run.pos.tolist()
            keep = [
                i for i, (r, t) in enumerate(zip(run.rows, tokens, strict=True)) if self._advance(r, t, now, pos[i])
            ]
            run.next = torch.tensor(tokens, dtype=torch.long)
            size, stage = len(run.rows), run.stage
            if len(keep) < size:
                run.keep(keep)
        except Exception as exc:  # never kill the worker: fail this step's requests instead
            log.exception("decode step failed for a batch of %d", len(run.rows))
            for r in run.rows:
                r.handle._finish("error", RagloraError(f"generation failed: {type(exc).__name__}"))
            self._running = _Running()
            return
        self.batches_run += 1
        self.batch_sizes.append(size)
        if self.on_batch is not None:
            with contextlib.suppress(Exception):
                self.on_batch(size, stage, time.perf_counter() - started)

    def _advance(self, row: _Row, token: int, now: float, length: int) -> bool:
        """Give `row` its new token; False when the row is done (EOS, max_new_tokens, cancelled, context full).
        `length`: the tokens the row holds before this one, i.e. the position it would be fed at."""
        h = row.handle
        if h.cancelled:
            h._finish("cancelled")
            return False
        if token in self.eos_ids:
            self._flush(row)
            h._finish("stop")
            return False
        if h.first_token_at is None:
            h.first_token_at = now
        row.append(token)
        delta, *offsets = detokenize_step(self.tokenizer, row.tokens, *row.offsets)
        row.offsets = tuple(offsets)
        h._push_delta(delta)
        if len(row.tokens) >= row.params.max_new_tokens or length >= self.context_window:
            self._flush(row)
            h._finish("length")
            return False
        return True

    def _flush(self, row: _Row) -> None:
        """At the end, whatever the incremental decoding held back (an incomplete UTF-8 sequence)."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if text.startswith(row.handle.text):
            row.handle._push_delta(text[len(row.handle.text) :])


__all__ = [
    "GenerationHandle",
    "GenerationResult",
    "Generator",
    "SamplingParams",
    "accept",
    "detokenize_step",
    "eos_token_ids",
    "repetition_processors",
]
