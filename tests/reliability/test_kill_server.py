"""SIGKILL the API server (uvicorn, tiny model, 127.0.0.1) during traffic: no acknowledged turn is lost.

"Acknowledged" means the client got the whole answer: an HTTP 200 JSON body, or a stream up to `[DONE]`
with its final chunk. Every such turn must be in the restarted server's `GET /v1/conversations/{id}`, as a
user message directly followed by its assistant reply, and every stored conversation must be complete.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from rel_helpers import KEYS, TinyServer, headers

from pipeline.redact import redact

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Do I need a building permit for an extension?",
    "How long does a building permit take?",
    "Is a permit required for a deck?",
    "What does a building permit cost?",
    "Can I build a garage without a permit?",
]


async def _turn(client: httpx.AsyncClient, key: str, cid: str, question: str, stream: bool) -> str:
    """One chat turn; returns the answer text once fully received (= acknowledged), else raises."""
    body = {"model": "raglora-rag", "messages": [{"role": "user", "content": question}], "conversation_id": cid}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=headers(key))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text, finished, done = "", False, False
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers(key)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finished = finished or choice["finish_reason"] is not None
    if not (done and finished):
        raise ConnectionError("stream ended early")
    return text


async def _client_loop(url: str, n: int, stop: asyncio.Event, acked: list[tuple[str, str, str, str]]) -> None:
    rng = random.Random(n)
    key = KEYS[n % 2]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        turn = 0
        while not stop.is_set():
            cid = f"kill-{n}-{turn // 3}"  # three turns per conversation, then a new one
            question = f"{rng.choice(QUESTIONS)} (client {n} turn {turn})"
            try:
                answer = await _turn(client, key, cid, question, stream=turn % 2 == 1)
            except (httpx.HTTPError, ConnectionError, AssertionError):
                if stop.is_set():
                    return
                await asyncio.sleep(0.05)
                continue
            acked.append((key, cid, question, answer))
            turn += 1


async def _traffic_then_kill(server: TinyServer, seconds: float, clients: int) -> list[tuple[str, str, str, str]]:
    acked: list[tuple[str, str, str, str]] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_client_loop(server.url, n, stop, acked)) for n in range(clients)]
    await asyncio.sleep(seconds)
    await asyncio.to_thread(server.kill)  # SIGKILL with requests in flight
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return acked


def _complete(messages: list[dict]) -> bool:
    roles = [m["role"] for m in messages]
    return len(roles) % 2 == 0 and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))


def test_sigkill_during_traffic_loses_no_acknowledged_turn(tmp_path):
    server = TinyServer(tmp_path).start()
    try:
        t0 = time.monotonic()
        acked = asyncio.run(_traffic_then_kill(server, seconds=4.0, clients=8))
        assert server.proc.returncode == -9
        assert len(acked) >= 20, (
            f"too little traffic before the kill ({len(acked)} turns in {time.monotonic() - t0:.1f}s)"
        )

        print(
            f"\nserver kill: {len(acked)} acknowledged turns in {len({t[1] for t in acked})} conversations before SIGKILL"
        )
        server.start()  # same database file
        by_cid: dict[str, list[tuple[str, str, str, str]]] = {}
        for turn in acked:
            by_cid.setdefault(turn[1], []).append(turn)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for cid, turns in by_cid.items():
                key = turns[0][0]
                r = client.get(f"/v1/conversations/{cid}", headers=headers(key))
                assert r.status_code == 200, (cid, r.text)
                messages = r.json()["messages"]
                assert _complete(messages), (cid, [m["role"] for m in messages])
                pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
                for _, _, question, answer in turns:
                    assert (question, redact(answer)) in pairs, (cid, question)
                other = KEYS[1 - KEYS.index(key)]
                assert client.get(f"/v1/conversations/{cid}", headers=headers(other)).status_code == 404

            # ... and the restarted server carries on a conversation that was cut by the kill.
            cid, key = next(iter(by_cid)), by_cid[next(iter(by_cid))][0][0]
            body = {"messages": [{"role": "user", "content": "And after the restart?"}], "conversation_id": cid}
            r = client.post("/v1/chat/completions", json=body, headers=headers(key))
            assert r.status_code == 200, r.text
            stored = client.get(f"/v1/conversations/{cid}", headers=headers(key)).json()["messages"]
            assert stored[-2]["content"] == "And after the restart?" and _complete(stored)
        assert '"unhandled error"' not in server.log_text()
    finally:
        server.kill()
