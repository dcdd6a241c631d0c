"""OpenAI legacy `POST /v1/completions` (JSON or SSE): continue a prompt with the base model or a stage adapter.

No retrieval, no conversation, no answer check: the raw engine, the way vLLM or llama.cpp server offer it, so raglora
can itself be the upstream of another raglora (`serve.generator: openai`) and OpenAI clients find the route they
expect. `model` is a stage name, the base (`"base"`, the base model's name) or a raglora model name without
retrieval (`raglora-base`, `raglora-lora[-<stage>]`). `prompt` is one string (tokenized as is, without added special
tokens: a rendered chat template carries its own) or one list of token ids. Extension fields: `repetition_penalty`,
`no_repeat_ngram_size` (SamplingParams' defaults when absent) and `return_token_ids` (vLLM's: the choice carries
`prompt_token_ids` and `token_ids`; each stream chunk the ids generated since the previous one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.answer import AnswerService
from pipeline.api.deps import MetricsDep, PrincipalDep, ServiceDep, SettingsDep
from pipeline.api.errors import ApiError
from pipeline.api.schemas import Seed, StreamOptions, error_responses
from pipeline.api.settings import ServeConfig
from pipeline.generate import GenerationHandle, SamplingParams
from pipeline.routing import LORA_MODES, RAG_MODES, UnknownModel
from pipeline.upstream import UpstreamError
from raglora.errors import RagloraError

log = logging.getLogger("raglora.api")

router = APIRouter(tags=["completions"])

BASE_ALIASES = ("base",)
MAX_STOPS = 4  # as OpenAI


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1)
    best_of: int | None = Field(None, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    # Bounded so that dividing a logit by the penalty cannot overflow to inf (sampling would fail on it).
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=1024)
    return_token_ids: bool = False


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


# -- pure pieces ---------------------------------------------------------------------------------------------


def completion_stage(service: AnswerService, name: str) -> str | None:
    """The stage (None: the base) a completions `model` names; UnknownModel (404) listing the valid names."""
    stages = service.models.stage_names
    if name in stages:
        return name
    base_names = {*BASE_ALIASES, service.versions.get("base_model"), getattr(service.tokenizer, "name_or_path", None)}
    if name in base_names - {None, ""}:
        return None
    try:
        mode, stage = service.resolve_model(name)
    except UnknownModel:
        mode, stage = None, None
    if mode in RAG_MODES:
        raise ApiError(
            f"model {name!r} retrieves, which /v1/completions does not: use /v1/chat/completions, or a stage name "
            "or 'base' here",
            422,
            code="model_not_supported",
            param="model",
        )
    if mode is None:
        valid = [*stages, *sorted(n for n in base_names if n)]
        raise UnknownModel(name, valid)
    return stage if mode in LORA_MODES else None


def completion_prompt_ids(prompt: Any, tokenizer, context_window: int, max_tokens: int) -> list[int]:
    """One prompt's token ids; ApiError 422 for several prompts, an empty one, unknown ids or one that does not fit."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                f"prompt: one prompt per request, got {len(prompt)} (send them as separate requests)",
                422,
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    else:
        ids = [int(t) for t in prompt]
        vocab = len(tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(f"prompt: token id {bad[0]} is outside the vocabulary (0-{vocab - 1})", 422, param="prompt")
    if not ids:
        raise ApiError("prompt is empty", 422, param="prompt")
    if len(ids) + max_tokens > context_window:
        raise ApiError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context window "
            f"({context_window} tokens)",
            422,
            code="context_length_exceeded",
            param="prompt",
        )
    return ids


class StopText:
    """Cuts generated text before the first stop string. Streaming holds back the tail that could still begin
    one (at most the longest stop string less one character), so no stop string's start is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of it released
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; returns what may be released now."""
        if self.stopped:
            return ""
        self.text += delta
        start = max(0, self.sent - self.hold)
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            self.stopped = True
            return self._release(min(found))
        return self._release(len(self.text) - self.hold)

    def flush(self) -> str:
        """The held-back tail, once generation has ended without a stop string."""
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    @property
    def released(self) -> str:
        return self.text[: self.sent]


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", 422, param="stop")
    if any(not s for s in stops):
        raise ApiError("stop: stop strings must not be empty", 422, param="stop")
    return stops


def _check_unsupported(body: CompletionRequest) -> None:
    for name, used in (
        ("echo", body.echo),
        ("logprobs", body.logprobs not in (None, 0)),
        ("suffix", body.suffix is not None),
    ):
        if used:
            raise ApiError(f"{name} is not supported by this server", 422, code="unsupported_parameter", param=name)


def _max_tokens(body: CompletionRequest, settings: ServeConfig) -> int:
    if body.max_tokens is None:
        return settings.max_new_tokens_default
    if body.max_tokens > settings.max_new_tokens_limit:
        raise ApiError(
            f"max_tokens must be between 1 and {settings.max_new_tokens_limit}, got {body.max_tokens}",
            422,
            param="max_tokens",
        )
    return body.max_tokens


def _finish_reason(handle: GenerationHandle, stop: StopText) -> str:
    return "stop" if stop.stopped or handle.finish_reason != "length" else "length"


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _generation_error(exc: RagloraError) -> RagloraError:
    # UpstreamError goes on to its own handler (502/504, pipeline.api.app); a local failure is a 503.
    return exc if isinstance(exc, UpstreamError) else ApiError(str(exc), 503, code="generation_failed")


# -- the route ----------------------------------------------------------------------------------------------------


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: {
            "model": TextCompletion,
            "description": "The completion (JSON), or with `stream: true` server-sent `text_completion` chunks",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 404, 413, 422, 429, 503),
    },
)
async def completions(
    body: CompletionRequest, principal: PrincipalDep, service: ServiceDep, settings: SettingsDep, metrics: MetricsDep
) -> JSONResponse | StreamingResponse:
    """Continue one prompt with the base model or a stage adapter (no retrieval, nothing stored)."""
    t0 = time.perf_counter()
    _check_unsupported(body)
    stops = _stops(body.stop)
    max_tokens = _max_tokens(body, settings)
    stage = completion_stage(service, body.model)
    ids = completion_prompt_ids(body.prompt, service.tokenizer, service.models.context_window, max_tokens)
    defaults = SamplingParams()
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        repetition_penalty=defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
        no_repeat_ngram_size=(
            defaults.no_repeat_ngram_size if body.no_repeat_ngram_size is None else body.no_repeat_ngram_size
        ),
    )
    handle = service.generator.submit(ids, stage=stage, params=params, loop=asyncio.get_running_loop())
    common = {"id": "cmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": body.model}
    mode = "lora" if stage is not None else "base"
    # Requests count under their route (raglora_http_requests), not as chat completions; tokens and times by mode.
    metrics.prompt_tokens.labels(mode).inc(len(ids))
    log.info(
        "completion",
        extra={
            "event": "completion",
            "model": body.model,
            "stream": body.stream,
            "key_id": principal.key_id,
            "prompt_tokens": len(ids),
        },
    )
    stop = StopText(stops)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(handle, stop, common, body.return_token_ids, include_usage, metrics, mode, t0),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        async for delta in handle.astream():
            stop.feed(delta)
            if stop.stopped:
                break
    except RagloraError as exc:
        raise _generation_error(exc) from None
    finally:
        if not handle.done:
            handle.cancel()
    stop.flush()
    _observe(metrics, handle, mode, t0)
    choice: dict[str, Any] = {
        "index": 0,
        "text": stop.released,
        "logprobs": None,
        "finish_reason": _finish_reason(handle, stop),
    }
    if body.return_token_ids:
        choice.update(prompt_token_ids=ids, token_ids=list(handle.token_ids))
    n = len(handle.token_ids)
    usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    return JSONResponse({**common, "object": "text_completion", "choices": [choice], "usage": usage})


def _observe(metrics, handle: GenerationHandle, mode: str, t0: float) -> None:
    metrics.completion_tokens.labels(mode).inc(len(handle.token_ids))
    if handle.first_token_at is not None:
        metrics.ttft.labels(mode).observe(handle.first_token_at - t0)
    metrics.generation.labels(mode).observe(time.perf_counter() - t0)


async def _stream(
    handle: GenerationHandle,
    stop: StopText,
    common: dict,
    return_token_ids: bool,
    include_usage: bool,
    metrics,
    mode: str,
    t0: float,
) -> AsyncIterator[str]:
    sent_ids = 0

    def chunk(text: str, finish_reason: str | None = None) -> str:
        nonlocal sent_ids
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if return_token_ids:
            ids = list(handle.token_ids)  # the worker appends to it; a copy is one consistent view
            choice["token_ids"], sent_ids = ids[sent_ids:], len(ids)
        return _sse({**common, "object": "text_completion", "choices": [choice]})

    try:
        async for delta in handle.astream():
            out = stop.feed(delta)
            if out:
                yield chunk(out)
            if stop.stopped:
                break
        out = stop.flush()
        if out:
            yield chunk(out)
        if not handle.done:
            handle.cancel()  # a stop string ended it early
        yield chunk("", _finish_reason(handle, stop))
        _observe(metrics, handle, mode, t0)
        if include_usage:
            n, p = len(handle.token_ids), len(handle.prompt_ids)
            usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
            yield _sse({**common, "object": "text_completion", "choices": [], "usage": usage})
        yield _sse("[DONE]")
    except RagloraError as exc:
        code = exc.code if isinstance(exc, UpstreamError) else "generation_failed"
        yield _sse({"error": {"message": str(exc), "type": "server_error", "code": code, "param": None}})
        yield _sse("[DONE]")
    finally:
        if not handle.done:
            handle.cancel()  # the client went away: free the slot
