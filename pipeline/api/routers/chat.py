"""OpenAI-compatible `POST /v1/chat/completions` (JSON or SSE), with a `raglora` extension object.

The answer shown is the checked one (`AnswerService.finish`): RAG answers carry verified citations (each with the
passage's title and text) and the sentences no passage supports (`raglora.unsupported`); a hand-over carries its
ticket id (`raglora.handoff.ticket_id`), readable with the conversation at `GET /v1/conversations/{id}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, StreamingResponse

from pipeline.answer import ASKED_FOR_PERSON, MODEL_HANDED_OVER, Answer, AnswerService, Prepared
from pipeline.api.deps import MetricsDep, PrincipalDep, ServiceDep, SettingsDep
from pipeline.api.errors import STORE_UNAVAILABLE, ApiError
from pipeline.api.metrics import ApiMetrics
from pipeline.api.schemas import ChatCompletion, ChatRequest, chunk_body, completion_body, error_responses
from pipeline.api.settings import ServeConfig
from pipeline.generate import GenerationHandle, SamplingParams
from pipeline.store import StoreError
from pipeline.upstream import UpstreamError
from raglora.errors import RagloraError

log = logging.getLogger("raglora.api")

router = APIRouter(tags=["chat"])

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _check_limits(body: ChatRequest, settings: ServeConfig) -> int:
    if len(body.messages) > settings.max_messages:
        raise ApiError(
            f"too many messages: {len(body.messages)} (limit {settings.max_messages})", 422, param="messages"
        )
    for i, m in enumerate(body.messages):
        n = len(m.text())
        if n > settings.max_message_chars:
            raise ApiError(
                f"messages[{i}].content is too long: {n} characters (limit {settings.max_message_chars})",
                422,
                code="message_too_long",
                param=f"messages.{i}.content",
            )
    if not body.messages[-1].text().strip():
        raise ApiError("the last user message is empty", 422, param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        return settings.max_new_tokens_default
    if not 1 <= max_tokens <= settings.max_new_tokens_limit:
        raise ApiError(
            f"max_tokens must be between 1 and {settings.max_new_tokens_limit}, got {max_tokens}",
            422,
            param="max_tokens",
        )
    return max_tokens


def _client_system(body: ChatRequest, settings: ServeConfig) -> list[str]:
    """The texts of the client's system/developer messages for the prompt, or a 400 when the server refuses them.

    Never dropped silently: `serve.client_system: append` puts them under the project's own system prompt
    (AnswerService.prepare), `reject` answers 400 naming the first one. Empty ones carry nothing and are skipped.
    """
    found = [(i, m) for i, m in enumerate(body.messages) if m.role in ("system", "developer") and m.text().strip()]
    if not found:
        return []
    i, first = found[0]
    if settings.client_system == "reject" or settings.max_client_system_chars == 0:
        raise ApiError(
            f"messages[{i}] has role {first.role!r}: this server does not accept system or developer messages from "
            "clients; put the instruction in the user message",
            400,
            code="client_system_not_allowed",
            param=f"messages.{i}.role",
        )
    return [m.text() for _, m in found]


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _timing(prepared: Prepared, t0: float, handle: GenerationHandle | None) -> dict:
    ttft = None
    if handle is not None and handle.first_token_at is not None:
        ttft = round((handle.first_token_at - t0) * 1000, 2)
    return {
        "retrieval_ms": round(prepared.retrieval_ms, 2),
        "ttft_ms": ttft,
        "total_ms": round((time.perf_counter() - t0) * 1000, 2),
        "batch_size": handle.batch_size if handle is not None else 0,
        "prompt_history_dropped": prepared.dropped_history,
    }


async def _finish_turn(
    service: AnswerService,
    prepared: Prepared,
    handle: GenerationHandle | None,
    cid: str | None,
    history: list[dict],
    t0: float,
):
    """Store the turn (committed before the client sees the end) and build the Answer; shared by JSON and SSE."""
    if handle is None:  # a hand-off: the fixed reply, no generation
        text, reason, n_tokens = prepared.handoff_text or "", "stop", 0
    else:
        text, reason, n_tokens = handle.text, handle.finish_reason or "stop", len(handle.token_ids)
    return await asyncio.to_thread(
        service.finish,
        prepared,
        text,
        conversation_id=cid,
        finish_reason=reason,
        completion_tokens=n_tokens,
        timing=_timing(prepared, t0, handle),
        history=history,
    )


def _handoff_kind(reason: str) -> str:
    if reason == ASKED_FOR_PERSON:
        return "asked"
    if reason == MODEL_HANDED_OVER:
        return "model"
    if reason.startswith("the documentation does not support"):
        return "unsupported"
    return "low_score"  # retrieval: the answerability gate or the handoff_threshold rule


def _observe(
    metrics: ApiMetrics, prepared: Prepared, answer: Answer, handle: GenerationHandle | None, t0: float, stream: bool
):
    metrics.completions.labels(prepared.model, str(stream).lower()).inc()
    metrics.prompt_tokens.labels(prepared.mode).inc(len(prepared.prompt_ids))
    if handle is not None:
        metrics.completion_tokens.labels(prepared.mode).inc(len(handle.token_ids))
        if handle.first_token_at is not None:
            metrics.ttft.labels(prepared.mode).observe(handle.first_token_at - t0)
        metrics.generation.labels(prepared.mode).observe(time.perf_counter() - t0)
    if answer.handoff is not None:
        metrics.handoffs.labels(_handoff_kind(answer.handoff["reason"])).inc()


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "model": ChatCompletion,
            "description": "The answer (JSON), or with `stream: true` server-sent `chat.completion.chunk` events",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 404, 413, 422, 429, 503),
    },
)
async def chat_completions(
    body: ChatRequest,
    principal: PrincipalDep,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    x_conversation_id: Annotated[str | None, Header()] = None,
) -> JSONResponse | StreamingResponse:
    t0 = time.perf_counter()
    max_tokens = _check_limits(body, settings)
    client_system = _client_system(body, settings)
    mode, stage = service.resolve_model(body.model)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
    )
    conversation_id = body.conversation_id or x_conversation_id
    if conversation_id is not None and not CONVERSATION_ID.fullmatch(conversation_id):
        raise ApiError("conversation_id must be 1-64 characters of A-Z a-z 0-9 _ . : -", 422, param="conversation_id")
    dialogue = [m for m in body.messages if m.role in ("user", "assistant")]
    question = dialogue[-1].text()
    history = [{"role": m.role, "content": m.text()} for m in dialogue[:-1]]

    def prepare() -> tuple[str | None, list[dict], Prepared]:
        cid = service.open_conversation(conversation_id, principal.owner)
        hist = history
        # A client that sends only the new message of a known conversation gets the stored history.
        if not hist and conversation_id is not None and cid == conversation_id:
            hist = service.stored_history(cid)
        prepared = service.prepare(
            question,
            hist,
            mode=mode,
            stage=stage,
            max_new_tokens=max_tokens,
            client_system=client_system,
            max_client_system_chars=settings.max_client_system_chars,
        )
        return cid, hist, prepared

    cid, history, prepared = await asyncio.to_thread(prepare)
    loop = asyncio.get_running_loop()
    handle = service.start(prepared, params, loop=loop)
    completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    log.info(
        "chat completion",
        extra={
            "event": "chat",
            "model": prepared.model,
            "stream": body.stream,
            "conversation_id": cid,
            "key_id": principal.key_id,
            "prompt_tokens": len(prepared.prompt_ids),
            "handoff": prepared.handoff_reason,
        },
    )

    if not body.stream:
        if handle is not None:
            try:
                async for _ in handle.astream():
                    pass
            except UpstreamError:
                raise  # the generation engine failed (serve.generator: openai): 502/504 (pipeline.api.app)
            except RagloraError as exc:
                raise ApiError(str(exc), 503, code="generation_failed") from None
            finally:
                if not handle.done:
                    handle.cancel()
        answer = await _finish_turn(service, prepared, handle, cid, history, t0)
        _observe(metrics, prepared, answer, handle, t0, False)
        return JSONResponse(
            completion_body(
                completion_id=completion_id,
                created=created,
                model=prepared.model,
                text=answer.text,
                finish_reason=answer.finish_reason,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                extension=answer.extension(),
            ),
            headers={"X-Conversation-Id": cid or ""},
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _stream(service, metrics, prepared, handle, cid, history, t0, completion_id, created, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Conversation-Id": cid or ""},
    )


async def _stream(
    service: AnswerService,
    metrics: ApiMetrics,
    prepared: Prepared,
    handle: GenerationHandle | None,
    cid: str | None,
    history: list[dict],
    t0: float,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    common = {"completion_id": completion_id, "created": created, "model": prepared.model}
    finished = False
    try:
        yield _sse(chunk_body(**common, delta={"role": "assistant", "content": ""}))
        streamed = ""
        if handle is None:
            streamed = prepared.handoff_text or ""
            yield _sse(chunk_body(**common, delta={"content": streamed}))
        else:
            async for delta in handle.astream():
                streamed += delta
                yield _sse(chunk_body(**common, delta={"content": delta}))
        answer = await _finish_turn(service, prepared, handle, cid, history, t0)
        finished = True
        _observe(metrics, prepared, answer, handle, t0, True)
        # Tokens are streamed as generated, before the answer can be checked, and a delta cannot take text back.
        # So after the check: when the citation policy hands the turn over, every client (a plain OpenAI one too)
        # gets the hand-over reply as one more content delta (a model that wrote a hand-over reply itself has
        # said so already); and when the shown text differs from the streamed one (markers rewritten to the
        # verified passages, unsupported sentences dropped, a hand-over), the final chunk's `raglora.text` holds
        # the text as shown and stored, which a raglora-aware client (the chat page) puts in place of the stream.
        extension = answer.extension()
        if answer.handoff is not None and handle is not None and answer.handoff["reason"] != MODEL_HANDED_OVER:
            yield _sse(chunk_body(**common, delta={"content": "\n\n" + answer.text}))
        if answer.text != streamed:
            extension["text"] = answer.text
        yield _sse(chunk_body(**common, delta={}, finish_reason=answer.finish_reason, extension=extension))
        if include_usage:
            usage = {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            }
            yield _sse(chunk_body(**common, delta={}, usage=usage, empty_choices=True))
        yield _sse("[DONE]")
    except StoreError as exc:
        finished = True
        log.error("conversation store failed", extra={"event": "store_error", "error": str(exc)})
        error = {"message": STORE_UNAVAILABLE, "type": "server_error", "code": "store_unavailable", "param": None}
        yield _sse({"error": error})
        yield _sse("[DONE]")
    except RagloraError as exc:
        finished = True
        code = exc.code if isinstance(exc, UpstreamError) else "generation_failed"
        yield _sse({"error": {"message": str(exc), "type": "server_error", "code": code, "param": None}})
        yield _sse("[DONE]")
    finally:
        if handle is not None and not handle.done:
            handle.cancel()  # client went away: free the batch slot at the next token
        if not finished and handle is not None:
            log.info("stream cancelled by the client", extra={"event": "stream_cancelled", "conversation_id": cid})
