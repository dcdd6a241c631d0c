"""Token generation by an OpenAI-compatible engine (`serve.generator: openai`): vLLM, llama.cpp server, TGI, SGLang,
or another raglora server.

raglora keeps what it owns (retrieval, the prompt rendered with the training chat template, citations, the gate,
hand-off, conversations, auth, rate limits); the engine only continues our prompt at `POST {upstream_url}/completions`,
sent as token ids (`upstream_prompt: ids`, exact) or as the rendered string (`text`, for TGI; an engine that adds a
BOS token to text prompts would double the template's own, so prefer ids where the engine takes them). Never its
chat endpoint: its template may differ from the one the adapters were trained with.

`UpstreamGenerator` has the surface of `pipeline.generate.Generator` that AnswerService, the API and evaluation use
(`submit` -> a `GenerationHandle`, `generate`, `close`, `models`, `tokenizer`, `on_batch`). Requests run as tasks
on one event loop in a background thread (httpx.AsyncClient, always streamed so first tokens arrive as the engine
makes them); the engine batches. `UpstreamModels` stands in for `StageModels`: stage names and order from the local
adapters' manifests, no weights. The startup check (`GET {upstream_url}/models`) refuses to start, with one line,
when a model serving would route to is not listed. A failed request ends its handle with `UpstreamError` (HTTP 502:
unreachable, refused, garbage) or `UpstreamTimeout` (504); the API maps them to OpenAI-style error bodies, and a
failed turn is never stored (the handle raises before `AnswerService.finish`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.generate import GenerationHandle, GenerationResult, SamplingParams, accept
from pipeline.stage_models import StageInfo, StageSet, discover_stages
from raglora.errors import RagloraError

log = logging.getLogger("raglora.upstream")

FALLBACK_CONTEXT_WINDOW = 2048
_CANCEL_POLL_S = 0.05  # how often cancelled handles (client gone) are looked for; their upstream request is closed


class UpstreamError(RagloraError):
    """The upstream engine failed a request: unreachable, an error status, or a response that is not a completion."""

    status = 502
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The upstream engine sent nothing for `upstream_timeout_s`."""

    status = 504
    code = "upstream_timeout"


@dataclass
class UpstreamModels(StageSet):
    """What routing and prompting need of `StageModels`, without weights: the trained stages (from the manifests
    under the adapters folder) and the context window."""

    tokenizer: object
    stages: dict[str, StageInfo]
    context_window: int = FALLBACK_CONTEXT_WINDOW
    strategy: str = "upstream"
    adapter_loads: int = 0
    switches: int = 0

    @classmethod
    def from_adapters(cls, tokenizer, adapters_dir: str | Path | None, **kwargs) -> UpstreamModels:
        return cls(tokenizer, {s.name: s for s in discover_stages(adapters_dir)}, **kwargs)


def api_root(url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1/` -> `http://host:8000/v1` (every engine serves under /v1)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _error_text(raw: bytes | str, limit: int = 300) -> str:
    """The message of an error body ({"error": {"message"}}, {"error": "..."}, {"detail"}, {"message"}) or its text."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        for value in (err.get("message") if isinstance(err, dict) else err, data.get("detail"), data.get("message")):
            if value:
                text = value if isinstance(value, str) else json.dumps(value)
                break
    text = " ".join(text.split())
    return (text[:limit] + "...") if len(text) > limit else text or "(empty body)"


def resolve_upstream_models(
    listed: list[str], stages: list[str], mapping: dict[str, str], base_model: str | None, url: str
) -> dict[str | None, str]:
    """The upstream's model name for each stage (None: the plain base), checked against what it lists.

    Args:
        listed: the ids of the upstream's `GET /models`, in its order.
        mapping: `serve.upstream_models` (stage -> upstream name; default the stage's own name).
        base_model: `serve.upstream_base_model`; None takes the first listed model (vLLM lists the base first).
    Raises:
        RagloraError, one line naming every missing model and the upstream URL.
    """
    unknown = [s for s in mapping if s not in stages]
    if unknown:
        raise RagloraError(
            f"serve.upstream_models names {', '.join(map(repr, unknown))}, which is not a trained stage "
            f"(trained: {', '.join(stages) or 'none'})"
        )
    if not listed:
        raise RagloraError(f"the upstream at {url} lists no models at GET {url}/models")
    names: dict[str | None, str] = {None: base_model or listed[0]}
    names.update({s: mapping.get(s, s) for s in stages})
    missing = [f"{name!r} ({'base' if stage is None else 'stage ' + stage})" for stage, name in names.items()
               if name not in listed]  # fmt: skip
    if missing:
        raise RagloraError(
            f"the upstream at {url} does not serve {', '.join(missing)}; it lists {', '.join(map(repr, listed))}: "
            "serve them there (vLLM: --lora-modules <stage>=<the stage's folder from `raglora export`>) or map them "
            "with serve.upstream_models / serve.upstream_base_model"
        )
    return names


def completion_request(
    prompt_ids: list[int], params: SamplingParams, *, model: str, prompt_format: str, tokenizer
) -> dict:
    """The `/v1/completions` body for one request: our rendered prompt, our sampling parameters, streamed.

    The repetition controls go as extension fields (raglora and vLLM read `repetition_penalty`; raglora also
    `no_repeat_ngram_size`; engines ignore fields they do not know); `return_token_ids` (vLLM, raglora) gives exact
    completion token counts.
    """
    prompt: list[int] | str = list(prompt_ids)
    if prompt_format == "text":
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": params.max_new_tokens,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "stream": True,
        "return_token_ids": True,
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    return body


# -- feeding GenerationHandle (its producer side; pipeline.generate owns the class) ----------------------------


def _deliver(handle: GenerationHandle, text: str, token_ids: list[int]) -> None:
    if (text or token_ids) and handle.first_token_at is None:
        handle.first_token_at = time.perf_counter()
    handle.token_ids.extend(token_ids)
    handle._push_delta(text)


def _end(handle: GenerationHandle, reason: str, error: BaseException | None = None) -> None:
    handle._finish(reason, error)


@dataclass
class _Reply:
    """What one upstream completion gave: text arrives through the handle, these are the rest."""

    finish_reason: str | None = None
    done: bool = False  # [DONE] seen
    choices: int = 0  # chunks that carried a choice
    ids_seen: bool = False


class UpstreamGenerator:
    """Generation by an OpenAI-compatible engine; `submit()` from any thread or event loop (see the module doc)."""

    batching = False  # the engine batches; raglora does not

    def __init__(
        self,
        models: UpstreamModels,
        *,
        url: str,
        api_key: str | None = None,
        upstream_models: dict[str, str] | None = None,
        base_model: str | None = None,
        timeout_s: float = 120.0,
        prompt_format: str = "ids",
        on_batch: Callable[[int, str | None, float], None] | None = None,
        context_window: int | None = None,
    ):
        """Checks the upstream's `GET /models` (RagloraError, one line, when it is down or lacks a model).

        Args:
            api_key: sent as `Authorization: Bearer`; RAGLORA_UPSTREAM_API_KEY overrides it.
            timeout_s: connecting, and each wait for the next bytes of a response (not the whole generation).
            context_window: when the upstream does not report `max_model_len`; None: the tokenizer's, else 2048.
        """
        if prompt_format not in ("ids", "text"):
            raise RagloraError(f"serve.upstream_prompt must be 'ids' or 'text', got {prompt_format!r}")
        self.models = models
        self.tokenizer = models.tokenizer
        self.url = api_root(url)
        self.prompt_format = prompt_format
        self.timeout_s = timeout_s
        self.on_batch = on_batch  # kept for the API's wiring; batches happen upstream, so it is never called
        self.batches_run = 0
        self.batch_sizes: list[int] = []
        key = os.environ.get("RAGLORA_UPSTREAM_API_KEY") or api_key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        listed, cards = self._list_models()
        self.model_names = resolve_upstream_models(
            listed, models.stage_names, dict(upstream_models or {}), base_model, self.url
        )
        window = cards.get(self.model_names[None], {}).get("max_model_len")  # vLLM reports it
        window = window if isinstance(window, int) and window > 0 else None
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        models.context_window = int(
            window or context_window or (tok_max if tok_max and tok_max < 1_000_000 else FALLBACK_CONTEXT_WINDOW)
        )
        self._closing = False
        self._active: dict[int, tuple[GenerationHandle, asyncio.Task]] = {}  # id(handle) -> (handle, its request)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve_loop, name="raglora-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        log.info("generation by the upstream at %s: %s", self.url, self.model_names)

    # Startup -----------------------------------------------------------------------------------------------

    def _list_models(self) -> tuple[list[str], dict[str, dict]]:
        where = f"GET {self.url}/models"
        try:
            resp = httpx.get(f"{self.url}/models", headers=self._headers, timeout=self.timeout_s)
        except httpx.TimeoutException:
            raise RagloraError(f"the upstream did not answer {where} within {self.timeout_s}s") from None
        except httpx.HTTPError as exc:
            raise RagloraError(f"cannot reach the upstream at {self.url} ({where}): {exc}") from None
        if resp.status_code != 200:
            hint = (
                " (check serve.upstream_api_key / RAGLORA_UPSTREAM_API_KEY)" if resp.status_code in (401, 403) else ""
            )
            raise RagloraError(f"{where} answered HTTP {resp.status_code}{hint}: {_error_text(resp.content)}")
        try:
            data = resp.json()["data"]
            cards = {str(card["id"]): card for card in data}
        except (ValueError, KeyError, TypeError):
            raise RagloraError(f"{where} did not return an OpenAI model list: {_error_text(resp.content)}") from None
        return list(cards), cards

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
        self._loop.call_soon_threadsafe(self._start, handle)
        return handle

    def generate(
        self, prompt_ids: list[int], *, stage: str | None = None, params: SamplingParams | None = None
    ) -> GenerationResult:
        return self.submit(prompt_ids, stage=stage, params=params).result()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting requests, let the running ones finish (up to `timeout`), close the connections."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # Event loop thread ---------------------------------------------------------------------------------------

    def _serve_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        timeout = httpx.Timeout(self.timeout_s)
        self._client = httpx.AsyncClient(headers=self._headers, timeout=timeout)
        watcher = self._loop.create_task(self._watch_cancels())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            watcher.cancel()
            self._loop.run_until_complete(asyncio.wait([watcher]))
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()

    async def _watch_cancels(self) -> None:
        """A cancelled handle (client went away) closes its upstream request, so the engine stops generating."""
        while True:
            await asyncio.sleep(_CANCEL_POLL_S)
            for handle, task in list(self._active.values()):
                if handle.cancelled and not task.done():
                    task.cancel()

    async def _drain(self, timeout: float | None) -> None:
        tasks = [task for _, task in self._active.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _start(self, handle: GenerationHandle) -> None:
        if handle.cancelled:
            _end(handle, "cancelled")
            return
        task = self._loop.create_task(self._run(handle))
        self._active[id(handle)] = (handle, task)
        task.add_done_callback(lambda _: self._active.pop(id(handle), None))

    async def _run(self, handle: GenerationHandle) -> None:
        model = self.model_names[handle.stage]
        body = completion_request(
            handle.prompt_ids, handle.params, model=model, prompt_format=self.prompt_format, tokenizer=self.tokenizer
        )
        where = f"the upstream at {self.url} (model {model!r})"
        reply = _Reply()
        try:
            async with self._client.stream("POST", f"{self.url}/completions", json=body) as resp:
                if resp.status_code != 200:
                    raw = await resp.aread()
                    raise UpstreamError(f"{where} answered HTTP {resp.status_code}: {_error_text(raw)}")
                if "text/event-stream" in resp.headers.get("content-type", ""):
                    await self._read_stream(resp, handle, reply, where)
                else:  # an engine that ignores stream: true answers with one JSON completion
                    self._read_choice(_json(await resp.aread(), where), handle, reply, where)
                    reply.done = True
            if not reply.choices:
                raise UpstreamError(f"{where} returned no completion choices")
            if not (reply.done or reply.finish_reason):
                raise UpstreamError(f"{where} ended its stream before the completion finished")
            if not reply.ids_seen:  # an engine without return_token_ids: count our tokenizer's tokens of the text
                handle.token_ids[:] = self.tokenizer(handle.text, add_special_tokens=False)["input_ids"]
            _end(handle, "length" if reply.finish_reason == "length" else "stop")
        except asyncio.CancelledError:
            _end(handle, "cancelled")
        except UpstreamError as exc:
            log.warning("upstream generation failed: %s", exc)
            _end(handle, "error", exc)
        except httpx.TimeoutException:
            exc = UpstreamTimeout(f"{where} sent nothing for {self.timeout_s}s (serve.upstream_timeout_s)")
            log.warning("upstream generation failed: %s", exc)
            _end(handle, "error", exc)
        except httpx.HTTPError as exc:
            error = UpstreamError(f"{where} is unreachable or broke the connection: {type(exc).__name__}: {exc}")
            log.warning("upstream generation failed: %s", error)
            _end(handle, "error", error)
        except Exception as exc:  # never leave a handle hanging
            log.exception("upstream generation failed")
            _end(handle, "error", UpstreamError(f"{where}: {type(exc).__name__}: {exc}"))

    async def _read_stream(self, resp: httpx.Response, handle: GenerationHandle, reply: _Reply, where: str) -> None:
        from httpx_sse import EventSource

        async for event in EventSource(resp).aiter_sse():
            if event.data.strip() == "[DONE]":
                reply.done = True
                return
            if not event.data.strip():
                continue
            self._read_choice(_json(event.data, where), handle, reply, where)

    def _read_choice(self, data, handle: GenerationHandle, reply: _Reply, where: str) -> None:
        """One JSON completion or stream chunk: its text (and token ids) to the handle."""
        if not isinstance(data, dict):
            raise UpstreamError(f"{where} sent something other than a completion: {_error_text(json.dumps(data))}")
        if data.get("error"):
            raise UpstreamError(f"{where} reported an error: {_error_text(json.dumps(data))}")
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise UpstreamError(f"{where} sent a body without choices: {_error_text(json.dumps(data))}")
        for choice in choices[:1]:
            text = choice.get("text") if isinstance(choice, dict) else None
            if not isinstance(text, str):
                raise UpstreamError(f"{where} sent a choice without text: {_error_text(json.dumps(choice))}")
            ids = choice.get("token_ids")
            ids = [int(t) for t in ids] if isinstance(ids, list) else []
            reply.ids_seen = reply.ids_seen or isinstance(choice.get("token_ids"), list)
            reply.choices += 1
            if handle.cancelled:
                raise asyncio.CancelledError
            _deliver(handle, text, ids)
            if choice.get("finish_reason"):
                reply.finish_reason = str(choice["finish_reason"])


def _json(raw: bytes | str, where: str):
    try:
        return json.loads(raw)
    except ValueError:
        raise UpstreamError(f"{where} sent a response that is not JSON: {_error_text(raw)}") from None


__all__ = [
    "UpstreamError",
    "UpstreamGenerator",
    "UpstreamModels",
    "UpstreamTimeout",
    "api_root",
    "completion_request",
    "resolve_upstream_models",
]
