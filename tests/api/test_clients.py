"""Standard clients against a real uvicorn server in a thread: openai, LangChain ChatOpenAI, disconnects, browser."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from helpers import chat_body

from pipeline.api.app import create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(settings, service):
    """(base_url, service) of the app served by uvicorn on a free loopback port."""
    port = _free_port()
    app = create_app(serve=settings.model_copy(update={"port": port}), service=service)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", service
    srv.should_exit = True
    thread.join(20)


def test_openai_client_via_testclient(app):
    openai = pytest.importorskip("openai")
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="key-a", http_client=http)
        assert "raglora-rag" in [m.id for m in client.models.list()]
        resp = client.chat.completions.create(
            model="raglora-rag", messages=[{"role": "user", "content": "Do I need a building permit for an extension?"}]
        )
        assert resp.choices[0].message.role == "assistant"
        assert resp.usage.completion_tokens > 0
        assert resp.model_extra["raglora"]["citations"][0]["source"] == "bygglov-001"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_openai_client_streaming_against_uvicorn(server):
    openai = pytest.importorskip("openai")
    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="key-a")
    kwargs = {"model": "raglora-lora-domain", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_langchain_chat_openai(server):
    lc = pytest.importorskip("langchain_openai")
    base, _ = server
    llm = lc.ChatOpenAI(model="raglora-rag", base_url=base + "/v1", api_key="key-a", max_tokens=8, temperature=0)
    msg = llm.invoke("Do I need a building permit for an extension?")
    assert isinstance(msg.content, str)
    streamed = "".join(chunk.content for chunk in llm.stream("Do I need a building permit for an extension?"))
    assert streamed == msg.content


def test_client_disconnect_mid_stream(server):
    base, service = server
    body = chat_body("hello", model="raglora-base", stream=True, max_tokens=64)
    with httpx.Client(base_url=base, headers={"Authorization": "Bearer key-a"}, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then hang up
        deadline = time.time() + 10
        # the worker is free again: a new request completes and nothing is left queued
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=4))
        assert r.status_code == 200
        while service.generator._q.qsize() and time.time() < deadline:
            time.sleep(0.05)
        assert service.generator._q.qsize() == 0
        assert http.get("/health").json()["model_loaded"]


@pytest.mark.slow
def test_web_page_in_headless_chromium(server):
    """Needs `apt-get install chromium` and `pip install playwright` (no browser download: uses /usr/bin/chromium)."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is missing: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    base, _ = server
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.fill("#apikey", "key-a")
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length > 3")
            page.select_option("#model", "raglora-rag")
            page.wait_for_timeout(200)
            page.select_option("#model", "raglora-rag")
            page.fill("#input", "Do I need a building permit for an extension?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20000)
            assert page.locator(".citations li").first.get_attribute("data-chunk-id", timeout=5000) == "bygglov-001"
            assert page.locator(".msg.assistant .text").first.inner_text() != ""
        finally:
            browser.close()
