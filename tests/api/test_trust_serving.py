"""Trust at serve time: verified citations, the answerability gate, and hand-overs that write tickets.

The model's words are scripted (a stand-in for `Generator.submit`) where a test is about what serving does with
an answer, so the tests do not depend on what a tiny random model happens to say.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fake_embedder import FakeEmbedder
from fastapi.testclient import TestClient
from helpers import FAQ_ROWS, chat_body, make_index, make_service, serve_settings

from finetune.prompt import REFUSAL_ANSWER
from pipeline.answer import MODEL_HANDED_OVER
from pipeline.api.app import create_app
from pipeline.citations import verify_answer
from pipeline.gate import Gate
from pipeline.generate import GenerationHandle, SamplingParams
from pipeline.metrics import Judge

PASSAGES = [
    {
        "text": "An extension of a house normally needs a building permit from the municipality.",
        "title": "Extensions",
        "source": "bygglov-001",
        "chunk_id": "bygglov-001",
        "score": 0.9,
        "dense_score": 0.8,
    },
    {
        "text": "A deck lower than 1.8 metres above ground does not require a building permit.",
        "title": "Decks",
        "source": "altan-001",
        "chunk_id": "altan-001",
        "score": 0.5,
        "dense_score": 0.4,
    },
    {
        "text": "A garage larger than 15 square metres needs a building permit or a notification.",
        "title": "Garages",
        "source": "garage-001",
        "chunk_id": "garage-001",
        "score": 0.3,
        "dense_score": 0.2,
    },
]
EXTENSION = "An extension of a house normally needs a building permit from the municipality."
DECK = "A deck lower than 1.8 metres above ground does not require a building permit."
MADE_UP = "The fee for a permit is always exactly 500 kronor per square metre."
GOLD_REMOVED_QUESTION = "How long does a building permit take?"  # its answer is bygglov-002
CONFIDENT_GUESS = "A building permit takes about two days to process."


def fake_judge() -> Judge:
    embedder = FakeEmbedder()
    return Judge(embed=lambda texts: embedder.encode(list(texts)), threshold=0.6)


def script(monkeypatch, service, text: str) -> None:
    """Make the service's model "write" `text` (one delta) for every request."""

    def submit(prompt_ids, stage=None, params=None, loop=None):
        handle = GenerationHandle(prompt_ids, stage, params, loop=loop)
        handle.first_token_at = time.perf_counter()
        handle.token_ids = list(service.tokenizer(text, add_special_tokens=False)["input_ids"])
        handle._push_delta(text)
        handle._finish("stop")
        return handle

    monkeypatch.setattr(service.generator, "submit", submit)


def agreement_gate() -> Gate:
    """A hand-set gate: answerable when the dense and BM25 top-1 agree (p 0.99), else not (p 0.01)."""
    return Gate(mean=[0.0] * 6, scale=[1.0] * 6, coef=[0, 0, 0, 10.0, 0, 0], intercept=-5.0, threshold=0.5)


# ------------------------------------------------------------------------------------------- verify_answer


def test_each_sentence_cites_the_passages_that_support_it_and_wrong_markers_are_rejected():
    v = verify_answer(f"{EXTENSION} [2] {DECK}", PASSAGES, fake_judge())
    assert v.text == (
        "An extension of a house normally needs a building permit from the municipality [1]. "
        "A deck lower than 1.8 metres above ground does not require a building permit [2]."
    )
    assert v.rejected == [2]  # the model cited the deck passage for the extension sentence
    assert [c["n"] for c in v.citations] == [1, 2]
    assert v.unsupported == [] and v.supported_share == 1.0 and not v.handover


def test_citations_carry_the_passage_title_and_text():
    v = verify_answer(EXTENSION, PASSAGES, fake_judge())
    (c,) = v.citations
    assert c["title"] == "Extensions" and c["text"] == PASSAGES[0]["text"]
    assert c["chunk_id"] == "bygglov-001" and c["relevance"] == 0.8


def test_unsupported_sentence_is_listed_and_kept_or_dropped_by_policy():
    answer = f"{EXTENSION} [1] {MADE_UP} [1]"
    keep = verify_answer(answer, PASSAGES, fake_judge(), policy="keep")
    assert keep.unsupported == [MADE_UP]
    assert keep.text.endswith(MADE_UP) and keep.rejected == [1]  # [1] on the made-up sentence is not shown
    assert keep.supported_share == 0.5 and not keep.handover
    drop = verify_answer(answer, PASSAGES, fake_judge(), policy="drop")
    assert drop.text == "An extension of a house normally needs a building permit from the municipality [1]."
    assert drop.unsupported == [MADE_UP] and not drop.handover


def test_handover_policy_only_when_more_than_the_limit_is_unsupported():
    half = f"{EXTENSION} {MADE_UP}"
    assert not verify_answer(half, PASSAGES, fake_judge(), policy="handover", max_unsupported=0.5).handover
    assert verify_answer(half, PASSAGES, fake_judge(), policy="handover", max_unsupported=0.4).handover
    assert verify_answer(MADE_UP, PASSAGES, fake_judge(), policy="handover").handover
    # drop with nothing supported left would show an empty answer: it hands over instead
    dropped = verify_answer(MADE_UP, PASSAGES, fake_judge(), policy="drop")
    assert dropped.handover and dropped.text == ""


@pytest.mark.parametrize(
    "answer",
    [
        f"Since [2019] {DECK[0].lower()}{DECK[1:]}",
        f"{DECK[:-1]} [5].",
        f"{DECK[:-1]} [7][2019].",
    ],
)
def test_bracketed_text_that_is_not_a_passage_number_is_never_a_citation(answer):
    v = verify_answer(answer, PASSAGES, fake_judge())
    assert [c["n"] for c in v.citations] == [2]  # only the judge's passage
    assert v.rejected == []  # "[5]" with 3 passages is text, not a rejected citation
    for foreign in ("[2019]", "[5]", "[7]"):
        assert (foreign in v.text) == (foreign in answer)  # kept as the model wrote it
    assert "\u2060" not in v.text


def test_markers_after_the_end_punctuation_and_line_breaks_keep_the_layout():
    answer = f"Yes.\n- {EXTENSION} [1][3]\n- {DECK}\n[2]"
    v = verify_answer(answer, PASSAGES, fake_judge(), policy="keep")
    lines = v.text.split("\n")
    assert lines[1] == "- An extension of a house normally needs a building permit from the municipality [1]."
    assert lines[2] == "- A deck lower than 1.8 metres above ground does not require a building permit [2]."
    assert v.rejected == [3] and v.unsupported == ["Yes."]


def test_no_content_no_verdict():
    v = verify_answer("", PASSAGES, fake_judge(), policy="handover")
    assert math.isnan(v.supported_share) and not v.handover and v.citations == []


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="keep, drop, handover"):
        verify_answer(EXTENSION, PASSAGES, fake_judge(), policy="maybe")


# ------------------------------------------------------------------------------------------ the service


@pytest.fixture
def trust_service(tmp_path, adapters_dir, index):
    svc = make_service(serve_settings(tmp_path), adapters_dir, index, judge=fake_judge(), citation_policy="handover")
    yield svc
    svc.close()


def test_answer_shows_verified_citations_with_title_and_text(trust_service, monkeypatch):
    script(monkeypatch, trust_service, f"{FAQ_ROWS[0]['answer']} [2]")
    ans = trust_service.answer(FAQ_ROWS[0]["question"], [], mode="rag")
    assert ans.handoff is None
    assert [c["source"] for c in ans.citations] == ["bygglov-001"]
    assert ans.citations[0]["title"] and FAQ_ROWS[0]["answer"] in ans.citations[0]["text"]
    assert ans.citations[0]["question"] == FAQ_ROWS[0]["question"]  # a Q/A passage's readable heading
    assert ans.text.endswith("(bygglov) from the municipality [1].")
    assert ans.rejected_citations == [2] and ans.extension()["unsupported"] == []


def test_the_model_writing_the_handover_reply_creates_a_ticket(trust_service, monkeypatch):
    script(monkeypatch, trust_service, REFUSAL_ANSWER)
    cid = trust_service.open_conversation(None)
    ans = trust_service.answer(FAQ_ROWS[1]["question"], [], mode="rag", conversation_id=cid)
    assert ans.handoff["reason"] == MODEL_HANDED_OVER and ans.handoff["ticket_id"] >= 1
    assert ans.text == trust_service.no_answer_reply and ans.citations == []
    assert [t["id"] for t in trust_service.store.handoffs(cid)] == [ans.handoff["ticket_id"]]


def test_the_model_writing_the_handover_reply_without_rag_creates_a_ticket(trust_service, monkeypatch):
    script(monkeypatch, trust_service, "I don't know, let me connect you with a colleague.")
    cid = trust_service.open_conversation(None)
    ans = trust_service.answer("hello", [], mode="lora", stage="general", conversation_id=cid)
    assert ans.handoff["reason"] == MODEL_HANDED_OVER and trust_service.store.handoffs(cid)


def test_mostly_unsupported_answer_is_handed_over_with_a_ticket(trust_service, monkeypatch):
    script(monkeypatch, trust_service, f"{MADE_UP} [1]")
    cid = trust_service.open_conversation(None)
    ans = trust_service.answer(FAQ_ROWS[0]["question"], [], mode="rag", conversation_id=cid)
    assert ans.handoff["ticket_id"] >= 1 and "does not support the answer" in ans.handoff["reason"]
    assert ans.text == trust_service.no_answer_reply and ans.citations == []
    assert trust_service.store.handoffs(cid)[0]["reason"] == ans.handoff["reason"]


def test_keep_policy_lists_unsupported_sentences_in_the_extension(trust_service, monkeypatch):
    trust_service.citation_policy = "keep"
    script(monkeypatch, trust_service, f"{MADE_UP} [1]")
    ans = trust_service.answer(FAQ_ROWS[0]["question"], [], mode="rag")
    assert ans.handoff is None and ans.text == MADE_UP
    assert ans.extension()["unsupported"] == [MADE_UP] and ans.extension()["rejected_citations"] == [1]


def test_gate_saying_no_hands_over_with_a_ticket_naming_probability_and_threshold(trust_service):
    trust_service.gate = agreement_gate()
    cid = trust_service.open_conversation(None)
    prep = trust_service.prepare(GOLD_REMOVED_QUESTION, [], mode="rag", exclude_chunks=["bygglov-002"])
    assert prep.handoff_reason is not None and "p_answerable 0.007 < threshold 0.500" in prep.handoff_reason
    assert prep.gate["answerable"] is False and "top1_agree" in prep.gate["features"]
    assert trust_service.start(prep, SamplingParams()) is None  # nothing is generated
    ans = trust_service.finish(
        prep, "", conversation_id=cid, finish_reason="stop", completion_tokens=0, timing={}, history=[]
    )
    assert ans.text == trust_service.no_answer_reply and ans.extension()["gate"]["p_answerable"] < 0.5
    assert [t["id"] for t in trust_service.store.handoffs(cid)] == [ans.handoff["ticket_id"]]
    answered = trust_service.prepare(FAQ_ROWS[0]["question"], [], mode="rag")
    assert answered.handoff_reason is None and answered.gate["p_answerable"] > 0.5


def test_gate_sees_the_excluded_chunks_and_replaces_the_threshold(trust_service):
    seen = {}

    class Spy:
        def decide(self, index, query, *, exclude=(), retrieval=None):
            seen["exclude"] = list(exclude)
            from pipeline.gate import GateDecision

            return GateDecision(True, 0.9, 0.5, {})

    trust_service.gate = Spy()
    trust_service.handoff_threshold = 0.99  # would hand everything over; the gate decides instead
    prep = trust_service.prepare("xyzzy quux", [], mode="rag", exclude_chunks=["bygglov-001"])
    assert seen["exclude"] == ["bygglov-001"] and prep.handoff_reason is None


# ------------------------------------------------------------------------------------------------ the API


@pytest.fixture
def trust_client(tmp_path, trust_service):
    with TestClient(create_app(serve=serve_settings(tmp_path), service=trust_service)) as c:
        c.headers["Authorization"] = "Bearer key-a"
        yield c


def test_api_citations_carry_title_and_text(trust_client, trust_service, monkeypatch):
    script(monkeypatch, trust_service, FAQ_ROWS[0]["answer"])
    body = trust_client.post("/v1/chat/completions", json=chat_body(FAQ_ROWS[0]["question"])).json()
    ext = body["raglora"]
    assert ext["handoff"] is None and ext["unsupported"] == []
    assert ext["citations"][0]["title"] and FAQ_ROWS[0]["answer"] in ext["citations"][0]["text"]
    assert body["choices"][0]["message"]["content"].endswith(" [1].")


def test_stream_ends_with_the_checked_answer_and_a_handover_notice(trust_client, trust_service, monkeypatch):
    script(monkeypatch, trust_service, MADE_UP)
    r = trust_client.post("/v1/chat/completions", json=chat_body(FAQ_ROWS[0]["question"], stream=True))
    events = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == MADE_UP + "\n\n" + trust_service.no_answer_reply  # even a plain client sees the hand-over
    ext = events[-1]["raglora"]
    assert ext["handoff"]["ticket_id"] >= 1 and ext["text"] == trust_service.no_answer_reply
    stored = trust_client.get(f"/v1/conversations/{ext['conversation_id']}").json()
    assert stored["messages"][-1]["content"] == trust_service.no_answer_reply
    assert stored["handoffs"][0]["id"] == ext["handoff"]["ticket_id"]
    assert stored["messages"][-1]["meta"]["handoff"] == ext["handoff"]  # a reloaded chat can show the ticket


# ------------------------------------------------------------------- a gold-removed question, openai client


@pytest.fixture(scope="module")
def gold_removed_index(tmp_path_factory):
    """The FAQ without the row that answers GOLD_REMOVED_QUESTION: retrieval still finds plausible passages."""
    return make_index(tmp_path_factory.mktemp("kb-gold-removed"), [r for r in FAQ_ROWS if r["id"] != "bygglov-002"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("answerability", ["gate", "threshold"])
def test_gold_removed_question_through_openai_client_creates_a_ticket(
    answerability, tmp_path, adapters_dir, gold_removed_index, monkeypatch
):
    """The answer's passage is not in the index. With a fitted gate the gate hands over before generation; with
    the threshold rule retrieval looks relevant enough (best cosine > 0.2), the model guesses, and the judge
    finds no passage for the guess: a hand-over either way, with a ticket the conversations endpoint shows."""
    openai = pytest.importorskip("openai")
    port = _free_port()
    settings = serve_settings(tmp_path, port=port)
    service = make_service(
        settings,
        adapters_dir,
        gold_removed_index,
        judge=fake_judge(),
        citation_policy="handover",
        gate=agreement_gate() if answerability == "gate" else None,
    )
    script(monkeypatch, service, CONFIDENT_GUESS)
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(serve=settings, service=service),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not srv.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="key-a")
        resp = client.chat.completions.create(
            model="raglora-rag", messages=[{"role": "user", "content": GOLD_REMOVED_QUESTION}]
        )
        ext = resp.model_extra["raglora"]
        assert resp.choices[0].message.content == service.no_answer_reply
        assert CONFIDENT_GUESS not in resp.choices[0].message.content
        expected = "answerability gate" if answerability == "gate" else "does not support the answer"
        assert expected in ext["handoff"]["reason"]
        conversation = httpx.get(
            f"{base}/v1/conversations/{ext['conversation_id']}", headers={"Authorization": "Bearer key-a"}
        ).json()
        (ticket,) = conversation["handoffs"]
        assert ticket["id"] == ext["handoff"]["ticket_id"] and ticket["reason"] == ext["handoff"]["reason"]
    finally:
        srv.should_exit = True
        thread.join(20)
        service.close()


# --------------------------------------------------------------------------------------------- build_service


def _built(tmp_path, adapters_dir, monkeypatch, gate_manifest_index_sha: str | None):
    """A root config over a real index folder (fake embedder) and a gate folder; build_service on it."""
    from tiny_model import make_tiny_model, make_tiny_tokenizer

    import retriever.embedder
    from pipeline.api.settings import ServeConfig
    from pipeline.config import Config
    from pipeline.service import build_service
    from raglora.files import file_sha256

    monkeypatch.setattr(retriever.embedder, "load_embedder", lambda *a, **k: FakeEmbedder())
    rows = [dict(r, answer=r["answer"] + f" Ask the municipality about case {i}.") for i, r in enumerate(FAQ_ROWS)]
    if not (tmp_path / "index").exists():
        make_index(tmp_path, rows)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir(exist_ok=True)
    (gate_dir / "gate.json").write_text(json.dumps(agreement_gate().to_dict()), encoding="utf-8")
    sha = gate_manifest_index_sha or file_sha256(tmp_path / "index" / "manifest.json")
    (gate_dir / "manifest.json").write_text(json.dumps({"fitted": True, "index": {"manifest_sha256": sha}}))
    paths = {"adapters_dir": str(adapters_dir), "index_dir": str(tmp_path / "index"), "gate_dir": str(gate_dir)}
    cfg = Config.model_validate({"paths": paths})
    tok = make_tiny_tokenizer()
    serve = ServeConfig(db_path=str(tmp_path / "c.db"), judge_calibration_pairs=6)
    return build_service(cfg, serve=serve, model_and_tokenizer=(make_tiny_model(tok), tok))


def test_build_service_loads_the_gate_and_a_calibrated_judge_cached_beside_the_index(
    tmp_path, adapters_dir, monkeypatch
):
    svc = _built(tmp_path, adapters_dir, monkeypatch, None)
    try:
        assert svc.gate is not None and svc.citation_policy == "handover"
        assert svc.versions["answerability"].startswith("gate ")
        first = svc.versions["citation_judge"]
        assert svc.judge.threshold == first["threshold"] != 0.6  # calibrated, not the default
    finally:
        svc.close()
    cache = json.loads((tmp_path / "index.judge.json").read_text(encoding="utf-8"))
    assert cache["calibration"]["threshold"] == first["threshold"] and cache["key"]["n_pairs"] == 6
    again = _built(tmp_path, adapters_dir, monkeypatch, None)
    try:
        assert again.judge.threshold == first["threshold"] and not first["cached"]
        assert again.versions["citation_judge"]["cached"]  # same index: reused, not recalibrated
    finally:
        again.close()


def test_a_gate_fitted_on_another_index_is_not_used(tmp_path, adapters_dir, monkeypatch):
    svc = _built(tmp_path, adapters_dir, monkeypatch, "0" * 64)
    try:
        assert svc.gate is None and "stale gate" in svc.versions["answerability"]
        assert svc.handoff_threshold == 0.3  # the fallback rule
    finally:
        svc.close()


def test_an_answer_that_opens_with_a_copied_passage_header_drops_the_header():
    v = verify_answer(f"[1] ({PASSAGES[0]['title']}) {EXTENSION}", PASSAGES, fake_judge())
    assert v.text == f"{EXTENSION[:-1]} [1]." and v.rejected == []
    other = verify_answer(f"[1] (not the title) {EXTENSION}", PASSAGES, fake_judge())
    assert "(not the title)" in other.text  # only the prompt's own header is dropped
