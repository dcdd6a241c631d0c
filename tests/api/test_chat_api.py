"""The HTTP API through TestClient (lifespan runs): OpenAI shapes, SSE, auth, limits, persistence, ops."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from helpers import chat_body, make_service, serve_settings

from pipeline.api.app import create_app
from pipeline.api.settings import ServeConfig
from raglora.errors import RagloraError


def sse_events(text: str) -> list[str]:
    return [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]


def test_models_lists_one_name_per_mode_and_stage(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    for name in [
        "raglora-base",
        "raglora-rag",
        "raglora-lora-domain",
        "raglora-rag+lora-subdomain",
        "raglora-lora-general",
    ]:
        assert name in ids


@pytest.mark.parametrize("model", ["raglora-base", "raglora-rag", "raglora-lora-general", "raglora-rag+lora-domain"])
def test_completion_every_mode(client, model):
    r = client.post("/v1/chat/completions", json=chat_body(model=model))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] > 0
    ext = body["raglora"]
    assert ext["conversation_id"] and ext["timing"]["total_ms"] > 0
    assert bool(ext["citations"]) == model.startswith("raglora-rag")


def test_stage_switching_per_request_does_not_reload(client, service):
    loads = service.models.adapter_loads
    for model in ["raglora-lora-general", "raglora-lora-subdomain", "raglora-base", "raglora-rag+lora-domain"] * 2:
        assert client.post("/v1/chat/completions", json=chat_body(model=model)).status_code == 200
    assert service.models.adapter_loads == loads


def test_streaming_sse_format(client):
    with client.stream(
        "POST", "/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True})
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["raglora"]["citations"][0]["source"] == "bygglov-001"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_streamed_text_equals_non_streamed_greedy(client):
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=10)).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, max_tokens=10)) as r:
        chunks = [json.loads(e) for e in sse_events(r.read().decode())[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == full


def test_auth_required_and_wrong_key(app):
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200  # operations stay open


def test_env_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGLORA_API_KEYS", "env-1, env-2")
    assert ServeConfig(api_keys=["cfg"]).resolved_api_keys() == ["cfg", "env-1", "env-2"]


def test_conversations_belong_to_their_key(client):
    r = client.post("/v1/chat/completions", json=chat_body())
    cid = r.json()["raglora"]["conversation_id"]
    assert client.get(f"/v1/conversations/{cid}").status_code == 200
    other = {"Authorization": "Bearer key-b"}
    r = client.get(f"/v1/conversations/{cid}", headers=other)
    assert r.status_code == 404 and "error" in r.json()
    # nor can another key continue (write into) it
    r = client.post("/v1/chat/completions", json=chat_body(conversation_id=cid), headers=other)
    assert r.status_code == 404
    assert client.get("/v1/conversations/does-not-exist").status_code == 404


def test_conversation_id_from_header_and_stored_history(client):
    r = client.post(
        "/v1/chat/completions",
        json=chat_body("Can I build a garage without a permit?"),
        headers={"X-Conversation-Id": "conv-1"},
    )
    assert r.json()["raglora"]["conversation_id"] == "conv-1"
    r = client.post("/v1/chat/completions", json=chat_body("and if it is bigger?", conversation_id="conv-1"))
    assert r.json()["raglora"]["citations"][0]["source"] == "garage-001"  # follow-up condensed with stored history
    msgs = client.get("/v1/conversations/conv-1").json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]


def test_rate_limit(tmp_path, service):
    settings = serve_settings(tmp_path, rate_limit_per_minute=3)
    with TestClient(create_app(serve=settings, service=service)) as c:
        codes = [c.get("/v1/models", headers={"Authorization": "Bearer key-a"}).status_code for _ in range(5)]
        assert codes[:3] == [200] * 3 and codes[3:] == [429] * 2
        r = c.get("/v1/models", headers={"Authorization": "Bearer key-a"})
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        assert c.get("/v1/models", headers={"Authorization": "Bearer key-b"}).status_code == 200  # per key


def test_persistence_across_restart(tmp_path, adapters_dir, index):
    settings = serve_settings(tmp_path)
    first = make_service(settings, adapters_dir, index)
    with TestClient(create_app(serve=settings, service=first)) as c:
        c.headers["Authorization"] = "Bearer key-a"
        cid = c.post(
            "/v1/chat/completions", json=chat_body("my mail is a.b@example.com, I want to talk to a human")
        ).json()["raglora"]["conversation_id"]
    first.close()
    second = make_service(settings, adapters_dir, index)
    with TestClient(create_app(serve=settings, service=second)) as c:
        c.headers["Authorization"] = "Bearer key-a"
        data = c.get(f"/v1/conversations/{cid}").json()
    second.close()
    assert data["messages"][0]["content"] == "my mail is [EMAIL], I want to talk to a human"
    assert data["handoffs"][0]["reason"] == "user asked for a person"


def test_handoff_low_score_in_api(client):
    body = client.post("/v1/chat/completions", json=chat_body("xyzzy quux")).json()
    assert body["raglora"]["handoff"]["ticket_id"] >= 1
    assert "colleague" in body["choices"][0]["message"]["content"]


def test_logs_are_json_and_never_contain_keys_or_pii(client):
    import io
    import logging

    from pipeline.api.logs import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("raglora")
    logger.addHandler(handler)
    try:
        client.post("/v1/chat/completions", json=chat_body("My personnummer is 19811218-9876, talk to a human"))
        client.get("/v1/models", headers={"Authorization": "Bearer wrong-key"})
        logger.info("user wrote %s", "mail me at a@b.se", extra={"authorization": "Bearer key-a"})
    finally:
        logger.removeHandler(handler)
    err = buf.getvalue()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "chat" for line in lines)
    assert "key-a" not in err and "wrong-key" not in err and "19811218" not in err and "a@b.se" not in err
    assert any(line.get("status") == 401 for line in lines)


BAD_REQUESTS = [
    ("empty messages", {"model": "raglora-rag", "messages": []}, 422),
    ("wrong role", {"messages": [{"role": "robot", "content": "hi"}]}, 422),
    ("last is assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, 422),
    ("non-string content", {"messages": [{"role": "user", "content": 123}]}, 422),
    ("object content", {"messages": [{"role": "user", "content": {"a": 1}}]}, 422),
    ("empty content", {"messages": [{"role": "user", "content": "   "}]}, 422),
    ("messages not a list", {"messages": "hi"}, 422),
    ("max_tokens 0", {**chat_body(), "max_tokens": 0}, 422),
    ("max_tokens huge", {**chat_body(), "max_tokens": 100000}, 422),
    ("max_tokens string", {**chat_body(), "max_tokens": "many"}, 422),
    ("temperature", {**chat_body(), "temperature": 5}, 422),
    ("n=2", {**chat_body(), "n": 2}, 422),
    ("seed beyond what a torch generator takes", {**chat_body(), "temperature": 0.7, "seed": 2**70}, 422),
    ("long message", chat_body("x" * 2001), 422),
    ("too many messages", {"messages": [{"role": "user", "content": "hi"}] * 51}, 422),
    ("bad conversation id", {**chat_body(), "conversation_id": "../../etc"}, 422),
    ("unknown model", {**chat_body(), "model": "gpt-4"}, 404),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_matrix(client, name, body, status):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if name == "unknown model":
        assert "raglora-rag" in err["message"]


def test_invalid_json_and_oversized_body(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/chat/completions", content=b"x" * 70000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(100):
            yield b"x" * 1000

    r = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_bad_input_never_500_and_server_keeps_working(client):
    for body in [None, [], {"messages": [None]}, {"messages": [{"role": "user"}]}, {"messages": [{"content": "x"}]}]:
        r = client.post("/v1/chat/completions", json=body)
        assert 400 <= r.status_code < 500, (body, r.text)
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_unexpected_error_is_500_json_without_traceback(app, service, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(service, "prepare", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer key-a"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error" and "secret" not in r.text and "Traceback" not in r.text


def test_health_and_metrics(client):
    health = client.get("/health").json()
    assert health["model_loaded"] and health["index_loaded"] and health["stages"] == ["general", "domain", "subdomain"]
    assert "versions" in health
    client.post("/v1/chat/completions", json=chat_body())
    client.post("/v1/chat/completions", json=chat_body("talk to a human please"))
    text = client.get("/metrics").text
    for name in [
        "raglora_http_requests_total",
        "raglora_http_request_duration_seconds_bucket",
        "raglora_time_to_first_token_seconds_bucket",
        "raglora_completion_tokens_total",
        "raglora_handoffs_total",
        "raglora_batch_size_bucket",
    ]:
        assert name in text
    assert 'raglora_handoffs_total{reason="asked"} 1.0' in text


def test_web_page_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/chat/completions" in r.text


def test_no_keys_refuses_public_bind(tmp_path, monkeypatch):
    monkeypatch.delenv("RAGLORA_API_KEYS", raising=False)
    with pytest.raises(RagloraError, match="without API keys"):
        create_app(serve=ServeConfig(host="0.0.0.0", db_path=str(tmp_path / "x.db")), service=object())


def test_no_keys_on_loopback_serves_anonymously(tmp_path, service, monkeypatch):
    monkeypatch.delenv("RAGLORA_API_KEYS", raising=False)
    settings = serve_settings(tmp_path, api_keys=[])
    with TestClient(create_app(serve=settings, service=service)) as c:
        assert c.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert c.get("/health").json()["auth"] is False
