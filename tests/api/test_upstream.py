"""`serve.generator: openai` and `POST /v1/completions`: a second raglora server of the same tiny model and adapters
runs in-process (uvicorn in a thread on 127.0.0.1) as the upstream engine; answers through the proxy equal the local
ones (greedy). Fake upstreams stand in for down, slow and garbage engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.testclient import TestClient
from helpers import STAGES, make_service, prompt_ids, serve_settings
from tiny_model import make_tiny_model, make_tiny_tokenizer

from pipeline.answer import AnswerService
from pipeline.api.app import create_app
from pipeline.api.routers.completions import StopText
from pipeline.generate import SamplingParams
from pipeline.store import ConversationStore
from pipeline.upstream import UpstreamGenerator, UpstreamModels, api_root, resolve_upstream_models
from raglora.errors import RagloraError

AUTH = {"Authorization": "Bearer key-a"}
RAGLORA_NAMES = {s: f"raglora-lora-{s}" for s in STAGES}  # how a raglora upstream names a stage without retrieval
QUESTION = "Do I need a permit for an extension?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread; yields its /v1 URL."""
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, adapters_dir, index):
    """The local path: a raglora server (tiny model, three stages, the FAQ index) at a real port."""
    settings = serve_settings(tmp_path_factory.mktemp("upstream"), max_new_tokens_limit=64)
    service = make_service(settings, adapters_dir, index)
    app = create_app(serve=settings, service=service, configure_logs=False)
    with serving(app) as url:
        yield url, service
    service.close()


def proxy_service(url, adapters_dir, index, settings, **generator_options) -> AnswerService:
    """An AnswerService like helpers.make_service's, generating at `url` (no weights here)."""
    # context_window: what build_service reads from the base's config.json (a raglora upstream lists no max_model_len)
    options = {"api_key": "key-a", "upstream_models": RAGLORA_NAMES, "context_window": 512, **generator_options}
    generator = UpstreamGenerator(UpstreamModels.from_adapters(make_tiny_tokenizer(), adapters_dir), url=url, **options)
    return AnswerService(
        generator,
        index,
        store=ConversationStore(settings.db_path),
        retrieval={"k": 3, "mode": "hybrid"},
        handoff_threshold=settings.handoff_threshold,
        max_new_tokens_default=settings.max_new_tokens_default,
        versions={"test": True},
    )


@contextlib.contextmanager
def proxy_client(url, adapters_dir, index, tmp_path, **generator_options):
    settings = serve_settings(tmp_path, generator="openai", upstream_url=url)
    service = proxy_service(url, adapters_dir, index, settings, **generator_options)
    try:
        with TestClient(create_app(serve=settings, service=service, configure_logs=False)) as client:
            client.headers.update(AUTH)
            yield client
    finally:
        service.close()


@pytest.fixture(scope="module")
def proxy(upstream, adapters_dir, index, tmp_path_factory):
    with proxy_client(upstream[0], adapters_dir, index, tmp_path_factory.mktemp("proxy")) as client:
        yield client


def _chat(model: str, stream: bool = False, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "stream": stream,
            **extra}  # fmt: skip


def _sse_events(lines) -> list:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]" for line in lines if line.startswith("data: ")]


# -- the proxy path equals the local path -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["raglora-rag", "raglora-rag+lora-domain", "raglora-lora-subdomain"])
def test_proxy_chat_answer_equals_the_local_answer_greedy(upstream, proxy, model):
    local = httpx.post(f"{upstream[0]}/chat/completions", json=_chat(model), headers=AUTH, timeout=60).json()
    assert local["raglora"]["handoff"] is None and local["usage"]["completion_tokens"] > 0  # it generated
    got = proxy.post("/v1/chat/completions", json=_chat(model)).json()
    assert got["choices"][0]["message"]["content"] == local["choices"][0]["message"]["content"]
    assert got["choices"][0]["finish_reason"] == local["choices"][0]["finish_reason"]
    assert got["usage"] == local["usage"]  # token counts too (the upstream returns its token ids)
    assert got["raglora"]["citations"] == local["raglora"]["citations"]


@pytest.mark.parametrize("model", ["raglora-rag", "raglora-rag+lora-subdomain"])
def test_proxy_chat_stream_equals_the_local_answer_greedy(upstream, proxy, model):
    local = httpx.post(f"{upstream[0]}/chat/completions", json=_chat(model), headers=AUTH, timeout=60).json()
    with proxy.stream("POST", "/v1/chat/completions", json=_chat(model, stream=True)) as resp:
        assert resp.status_code == 200
        events = _sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices")]
    assert len([d for d in deltas if d]) > 1  # streamed in pieces, not in one block at the end
    assert "".join(deltas) == local["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=24),
        SamplingParams(max_new_tokens=24, repetition_penalty=1.5, no_repeat_ngram_size=0),
    ],
)
def test_text_prompts_and_repetition_controls_reach_the_engine(upstream, adapters_dir, params):
    url, local = upstream
    tok = make_tiny_tokenizer()
    ids = prompt_ids(tok, "Hello, how are you?")
    gen = UpstreamGenerator(
        UpstreamModels.from_adapters(tok, adapters_dir),
        url=url,
        api_key="key-a",
        upstream_models=RAGLORA_NAMES,
        prompt_format="text",
    )
    try:
        for stage in (None, "general"):
            want = local.generator.generate(ids, stage=stage, params=params)
            got = gen.generate(ids, stage=stage, params=params)
            assert (got.text, got.completion_tokens, got.finish_reason) == (
                want.text,
                want.completion_tokens,
                want.finish_reason,
            )
    finally:
        gen.close()


def test_concurrent_requests_each_get_their_own_answer(upstream, adapters_dir):
    url, local = upstream
    tok = make_tiny_tokenizer()
    gen = UpstreamGenerator(UpstreamModels.from_adapters(tok, adapters_dir), url=url, api_key="key-a",
                            upstream_models=RAGLORA_NAMES, context_window=512)  # fmt: skip
    jobs = [(prompt_ids(tok, q), stage) for q in ("Hello", "What is your name?") for stage in (None, *STAGES)]
    params = SamplingParams(max_new_tokens=16)
    try:
        handles = [gen.submit(ids, stage=stage, params=params) for ids, stage in jobs]  # all in flight together
        got = [h.result(timeout=60).text for h in handles]
    finally:
        gen.close()
    want = [local.generator.generate(ids, stage=stage, params=params).text for ids, stage in jobs]
    assert got == want and len(set(want)) > 1


def test_build_service_in_openai_mode_loads_no_weights_and_answers_as_locally(upstream, adapters_dir, tmp_path):
    from pipeline.api.settings import ServeConfig
    from pipeline.config import Config
    from pipeline.service import build_service

    cfg = Config.model_validate({"paths": {"adapters_dir": str(adapters_dir), "index_dir": str(tmp_path / "none")}})
    tok = make_tiny_tokenizer()
    serve = ServeConfig(
        db_path=str(tmp_path / "p.db"),
        generator="openai",
        upstream_url=upstream[0].removesuffix("/v1"),  # the /v1 root is found either way
        upstream_api_key="key-a",
        upstream_models=RAGLORA_NAMES,
    )
    proxied = build_service(cfg, serve=serve, model_and_tokenizer=(None, tok))  # no model: it must not need one
    local_serve = ServeConfig(db_path=str(tmp_path / "l.db"), prefill_chunk_tokens=32)
    local = build_service(cfg, serve=local_serve, model_and_tokenizer=(make_tiny_model(tok), tok))
    try:
        assert isinstance(proxied.generator, UpstreamGenerator)
        assert local.generator.prefill_chunk_tokens == 32  # the local engine gets its serve settings
        assert proxied.models.stage_names == list(STAGES) and proxied.default_stage == "subdomain"
        assert proxied.versions["generator"]["models"]["(base)"] == "raglora-base"  # the upstream's first model
        params = SamplingParams(max_new_tokens=16)
        for mode, stage in (("base", None), ("lora", "general"), ("lora", None)):
            want = local.answer("hello there", [], mode=mode, stage=stage, params=params)
            got = proxied.answer("hello there", [], mode=mode, stage=stage, params=params)
            assert (got.text, got.completion_tokens) == (want.text, want.completion_tokens)
    finally:
        proxied.close()
        local.close()


# -- startup check ------------------------------------------------------------------------------------------------


def test_upstream_without_a_stage_stops_startup_with_one_line_naming_it(upstream, adapters_dir):
    url = upstream[0]
    models = UpstreamModels.from_adapters(make_tiny_tokenizer(), adapters_dir)
    # A raglora upstream lists raglora-* names, not bare stage names: by default every stage is missing.
    with pytest.raises(RagloraError) as err:
        UpstreamGenerator(models, url=url, api_key="key-a")
    message = str(err.value)
    assert "\n" not in message and url in message
    assert all(f"'{s}' (stage {s})" in message for s in STAGES)
    with pytest.raises(RagloraError, match=r"'missing-one' \(stage domain\)"):
        UpstreamGenerator(models, url=url, api_key="key-a", upstream_models={**RAGLORA_NAMES, "domain": "missing-one"})
    with pytest.raises(RagloraError, match=r"HTTP 401.*upstream_api_key"):
        UpstreamGenerator(models, url=url, api_key="wrong", upstream_models=RAGLORA_NAMES)
    with pytest.raises(RagloraError, match=r"cannot reach the upstream at http://127\.0\.0\.1:\d+/v1"):
        UpstreamGenerator(models, url=f"http://127.0.0.1:{_free_port()}", upstream_models=RAGLORA_NAMES)


def test_resolve_upstream_models_maps_stages_and_defaults_the_base_to_the_first_listed():
    names = resolve_upstream_models(["base-model", "a", "B"], ["a", "b"], {"b": "B"}, None, "http://x/v1")
    assert names == {None: "base-model", "a": "a", "b": "B"}
    with pytest.raises(RagloraError, match="serve.upstream_models names 'c', which is not a trained stage"):
        resolve_upstream_models(["a"], ["a"], {"c": "a"}, None, "http://x/v1")
    with pytest.raises(RagloraError, match=r"'big' \(base\)"):
        resolve_upstream_models(["a"], ["a"], {}, "big", "http://x/v1")
    assert api_root("http://h:8000/") == api_root("http://h:8000/v1/") == "http://h:8000/v1"


# -- a failing upstream: 502 / 504, nothing stored -------------------------------------------------------------------


async def _forever(closed: threading.Event):
    try:
        while True:
            yield 'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n'
            await asyncio.sleep(30)  # then silence: only closing the connection can end the request
    finally:
        closed.set()


def fake_upstream(behaviour: dict) -> FastAPI:
    """An engine that lists every model but answers completions as `behaviour["kind"]` says."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        cards = [{"id": n, "object": "model"} for n in ("tiny", *RAGLORA_NAMES.values())]
        cards[0]["max_model_len"] = 300  # as vLLM reports it
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions():
        kind = behaviour["kind"]
        if kind == "forever":  # one "a", then silence until the client disconnects
            return StreamingResponse(_forever(behaviour["closed"]), media_type="text/event-stream")
        if kind == "slow":
            await asyncio.sleep(3)
        if kind == "garbage":
            return PlainTextResponse("<html>502 Bad Gateway</html>")
        if kind == "error":
            return JSONResponse({"error": {"message": "the engine is overloaded"}}, status_code=500)
        return JSONResponse({"id": "x", "object": "text_completion"})  # no choices

    return app


@pytest.fixture(scope="module")
def fake(adapters_dir, tmp_path_factory):
    behaviour = {"kind": "garbage"}
    with serving(fake_upstream(behaviour)) as url, proxy_client(
        url, adapters_dir, None, tmp_path_factory.mktemp("fake"), timeout_s=0.5
    ) as client:  # fmt: skip
        yield behaviour, client


def _stored(client, cid: str) -> list:
    resp = client.get(f"/v1/conversations/{cid}")
    return resp.json()["messages"] if resp.status_code == 200 else []


@pytest.mark.parametrize(
    ("kind", "status", "code", "words"),
    [
        ("slow", 504, "upstream_timeout", "sent nothing for 0.5s"),
        ("garbage", 502, "upstream_error", "not JSON"),
        ("no_choices", 502, "upstream_error", "without choices"),
        ("error", 502, "upstream_error", "HTTP 500: the engine is overloaded"),
    ],
)
def test_failing_upstream_gives_an_openai_error_and_stores_no_turn(fake, kind, status, code, words):
    behaviour, client = fake
    behaviour["kind"] = kind
    cid = f"c-{kind}"
    resp = client.post("/v1/chat/completions", json=_chat("raglora-lora-general", conversation_id=cid))
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["code"] == code and error["type"] == "server_error" and words in error["message"]
    with client.stream("POST", "/v1/chat/completions", json=_chat("raglora-lora", True, conversation_id=cid)) as s:
        events = _sse_events(s.iter_lines())
    assert events[-2]["error"]["code"] == code and events[-1] == "[DONE]"
    resp = client.post("/v1/completions", json={"model": "general", "prompt": "Hello"})
    assert resp.status_code == status and resp.json()["error"]["code"] == code
    assert _stored(client, cid) == []  # neither the question nor an answer that was never produced


def test_upstream_that_goes_down_gives_502_and_stores_no_turn(adapters_dir, tmp_path):
    with serving(fake_upstream({"kind": "garbage"})) as url:
        stack = contextlib.ExitStack()
        client = stack.enter_context(proxy_client(url, adapters_dir, None, tmp_path))
    with stack:  # the engine has stopped; the proxy started while it was up
        resp = client.post("/v1/chat/completions", json=_chat("raglora-lora-general", conversation_id="c-down"))
        assert resp.status_code == 502
        assert url in resp.json()["error"]["message"] and "unreachable" in resp.json()["error"]["message"]
        assert _stored(client, "c-down") == []


def test_the_engines_max_model_len_is_the_context_window_prompts_are_fitted_to(fake):
    _, client = fake
    assert client.app.state.service.models.context_window == 300  # over the configured 512


def test_a_cancelled_request_closes_its_upstream_stream(adapters_dir):
    """A client that goes away cancels its handle; the engine must see the connection close and stop generating."""
    behaviour = {"kind": "forever", "closed": threading.Event()}
    with serving(fake_upstream(behaviour)) as url:
        models = UpstreamModels.from_adapters(make_tiny_tokenizer(), adapters_dir)
        gen = UpstreamGenerator(models, url=url, upstream_models=RAGLORA_NAMES)
        try:
            handle = gen.submit([5, 6, 7], stage="general")
            assert next(iter(handle)) == "a"  # streaming
            handle.cancel()
            assert handle.result(timeout=5).finish_reason == "cancelled"
            assert behaviour["closed"].wait(5)
        finally:
            gen.close()


# -- POST /v1/completions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "stage"), [("general", "general"), ("base", None), ("raglora-lora-domain", "domain")]
)
def test_completions_continue_the_prompt_like_the_generator(upstream, model, stage):
    url, local = upstream
    ids = prompt_ids(local.tokenizer, "Hello, how are you?")
    want = local.generator.generate(ids, stage=stage, params=SamplingParams(max_new_tokens=10))
    text = local.tokenizer.decode(ids, skip_special_tokens=False)
    for prompt in (ids, text, [ids], [text]):
        body = {"model": model, "prompt": prompt, "max_tokens": 10, "return_token_ids": True}
        got = httpx.post(f"{url}/completions", json=body, headers=AUTH, timeout=60).json()
        assert got["object"] == "text_completion" and got["model"] == model
        choice = got["choices"][0]
        assert choice["text"] == want.text and choice["finish_reason"] == want.finish_reason
        assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == want.completion_tokens
        assert got["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": want.completion_tokens,
            "total_tokens": len(ids) + want.completion_tokens,
        }


def test_completions_stream_chunks_join_to_the_json_text(upstream):
    url, local = upstream
    body = {"model": "subdomain", "prompt": prompt_ids(local.tokenizer, "What is your name?"), "max_tokens": 12}
    whole = httpx.post(f"{url}/completions", json=body, headers=AUTH, timeout=60).json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", f"{url}/completions", json=stream, headers=AUTH, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"] and events[-2]["choices"] == []
    chunks = [e["choices"][0] for e in events[:-2]]
    assert all(e["object"] == "text_completion" for e in events[:-2])
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    assert sum(len(c["token_ids"]) for c in chunks) == whole["usage"]["completion_tokens"]


def test_completions_stop_string_cuts_the_text(upstream):
    url, local = upstream
    body = {"model": "base", "prompt": prompt_ids(local.tokenizer, "Hello"), "max_tokens": 12}
    full = httpx.post(f"{url}/completions", json=body, headers=AUTH, timeout=60).json()["choices"][0]["text"]
    assert len(full) > 4
    stop = full[2:4]
    cut = httpx.post(f"{url}/completions", json={**body, "stop": [stop]}, headers=AUTH, timeout=60).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/completions", json={**body, "stop": stop, "stream": True}, headers=AUTH) as r:
        chunks = [e["choices"][0] for e in _sse_events(r.iter_lines())[:-1]]
    assert "".join(c["text"] for c in chunks) == full[: full.index(stop)] and chunks[-1]["finish_reason"] == "stop"


def test_stop_text_never_releases_the_start_of_a_stop_string():
    stop = StopText(["END", "\n\n"])
    released = [stop.feed(d) for d in ("Hello E", "N", "D there")]
    assert released == ["Hello", " ", ""] and stop.stopped and stop.released == "Hello "
    assert stop.feed("more") == "" and stop.flush() == ""
    stop = StopText(["xyz"])
    assert [stop.feed("abcx"), stop.feed("y"), stop.flush()] == ["ab", "c", "xy"] and not stop.stopped


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "general", "prompt": ["one", "two"]}, 422, "one prompt per request, got 2"),
        ({"model": "general", "prompt": [[5, 6], [7]]}, 422, "one prompt per request, got 2"),
        ({"model": "general", "prompt": ""}, 422, "prompt is empty"),
        ({"model": "general", "prompt": []}, 422, "prompt is empty"),
        ({"model": "general", "prompt": [5, 999999]}, 422, "token id 999999 is outside the vocabulary"),
        ({"model": "general", "prompt": "hi", "max_tokens": 100000}, 422, "max_tokens must be between 1 and 64"),
        ({"model": "general", "prompt": "hi " * 600}, 422, "exceeds the context window (512 tokens)"),
        ({"model": "raglora-rag", "prompt": "hi"}, 422, "retrieves, which /v1/completions does not"),
        ({"model": "general", "prompt": "hi", "echo": True}, 422, "echo is not supported"),
        ({"model": "general", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "at most 4 stop strings"),
        ({"model": "general", "prompt": "hi", "n": 2}, 422, "n:"),
        ({"prompt": "hi"}, 422, "model: Field required"),
        ({"model": "nope", "prompt": "hi"}, 404, "unknown model 'nope'; valid models: general, domain, subdomain"),
    ],
)
def test_completions_bad_input_is_one_clear_line(upstream, body, status, words):
    resp = httpx.post(f"{upstream[0]}/completions", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == status
    message = resp.json()["error"]["message"]
    assert words in message and "\n" not in message


def test_completions_need_the_api_key(upstream):
    resp = httpx.post(f"{upstream[0]}/completions", json={"model": "base", "prompt": "hi"}, timeout=60)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
