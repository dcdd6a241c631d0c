"""The answer pipeline: modes, prompt building, history truncation, condensing, hand-off, redaction, store."""

from __future__ import annotations

import pytest
from helpers import FAQ_ROWS

from finetune.prompt import build_messages, load_system_prompt
from pipeline.answer import condense_query, wants_human
from pipeline.redact import redact
from pipeline.store import ConversationNotFound, ConversationStore, owner_of
from raglora.errors import RagloraError


@pytest.mark.parametrize(
    ("mode", "stage", "retrieves"),
    [("base", None, False), ("rag", None, True), ("lora", "general", False), ("rag+lora", "subdomain", True)],
)
def test_every_mode(service, mode, stage, retrieves):
    ans = service.answer("Do I need a building permit for an extension?", [], mode=mode, stage=stage)
    assert ans.mode == mode and ans.stage == stage
    assert bool(ans.citations) == retrieves
    assert ans.handoff is None
    assert ans.completion_tokens > 0
    if retrieves:
        assert ans.citations[0]["source"] == "bygglov-001"
        assert {"source", "title", "chunk_id", "score"} <= set(ans.citations[0])


def test_rag_prompt_uses_shared_builder_numbered_context(service):
    prep = service.prepare("Do I need a building permit for an extension?", [], mode="rag")
    system = load_system_prompt(None, True)
    assert prep.messages[0] == {"role": "system", "content": system}
    assert "[1] (" in prep.messages[-1]["content"] and "[2] (" in prep.messages[-1]["content"]
    hits = [h.to_dict() for h in service.index.search(prep.retrieval_query, k=len(prep.citations), mode="hybrid")]
    assert prep.messages == build_messages(prep.question, contexts=hits, history=[], system_prompt=system)


def test_injected_document_cannot_change_the_system_message(service):
    prep = service.prepare("What are the office opening hours?", [], mode="rag")
    assert any(c["source"] == "inject-001" for c in prep.citations)
    assert prep.messages[0]["content"] == load_system_prompt(None, True)
    assert "ignore all previous instructions" not in prep.messages[0]["content"]
    user = prep.messages[-1]["content"]
    assert "ignore all previous instructions" in user  # quoted as data inside the context block of the user turn
    assert user.index("<<<CONTEXT") < user.index("ignore all previous") < user.index("CONTEXT>>>")


def test_history_is_truncated_oldest_first_by_tokens(service):
    window = service.models.context_window
    history = []
    for i in range(12):
        history += [
            {"role": "user", "content": f"question {i} " + "word " * 20},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    prep = service.prepare("And what about a garage?", history, mode="lora", max_new_tokens=16)
    assert len(prep.prompt_ids) + 16 <= window
    assert prep.dropped_history > 0
    kept = [m["content"] for m in prep.messages[1:-1]]
    assert kept, "the newest turns are kept"
    assert kept[0].startswith("question")  # history still starts with a user turn
    assert "answer 11" in kept[-1]  # the newest turn survives
    assert not any("question 0 " in k for k in kept)  # the oldest is gone


def test_too_long_question_is_a_clear_error(service):
    with pytest.raises(RagloraError, match="too long"):
        service.prepare("permit " * 600, [], mode="base", max_new_tokens=16)


def test_follow_up_condensing():
    history = [
        {"role": "user", "content": "Do I need a building permit for a garage?"},
        {"role": "assistant", "content": "Yes."},
    ]
    assert (
        condense_query("How much does it cost?", history)
        == "Do I need a building permit for a garage? How much does it cost?"
    )
    assert condense_query("And a deck?", history).startswith("Do I need")
    standalone = "What is the deadline for a building permit decision in Stockholm municipality?"
    assert condense_query(standalone, history) == standalone
    assert condense_query("How much does it cost?", []) == "How much does it cost?"


def test_follow_up_retrieval_uses_the_condensed_query(service):
    history = [
        {"role": "user", "content": "Can I build a garage without a permit?"},
        {"role": "assistant", "content": "..."},
    ]
    prep = service.prepare("and if it is bigger?", history, mode="rag")
    assert prep.retrieval_query.startswith("Can I build a garage")
    assert prep.citations[0]["source"] == "garage-001"


@pytest.mark.parametrize(
    "text",
    [
        "I want to talk to a human",
        "Can I speak to someone please?",
        "agent",
        "Connect me with a real person",
    ],
)
def test_explicit_handoff_requests(text):
    assert wants_human(text)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Jag vill prata med en människa", "sv"),
        ("Kan jag tala med kundtjänst?", "sv"),
        ("Ich möchte mit einem Menschen sprechen", "de"),
        ("Je veux parler à un humain", "fr"),
        ("Quiero hablar con una persona", "es"),
        ("I want to talk to a human", "sv"),  # English always counts too
    ],
)
def test_handoff_requests_in_the_configured_language(text, language):
    assert wants_human(text, language)


def test_handoff_patterns_are_per_language():
    assert not wants_human("Jag vill prata med en människa", "en")
    assert not wants_human("Jag vill prata med en människa", "de")
    assert not wants_human("Vad kostar bygglovet?", "sv")


def test_follow_up_words_follow_the_language():
    history = [{"role": "user", "content": "Behöver jag bygglov för ett garage på tomten?"}]
    question = "Vad kostar det ungefär för ett stort garage?"  # long, but "det" leans on the previous turn
    assert condense_query(question, history, "sv").startswith("Behöver jag")
    assert condense_query(question, history, "en") == question


@pytest.mark.parametrize(
    "text", ["Do I need a permit for a deck?", "How long does it take?", "What does the agency charge?"]
)
def test_ordinary_questions_are_not_handoffs(text):
    assert not wants_human(text)


def test_configured_handoff_and_no_answer_replies(settings, adapters_dir, index):
    from helpers import make_service

    svc = make_service(
        settings,
        adapters_dir,
        index,
        handoff_reply="A person from Acme Heating will take over.",
        no_answer_reply="Acme Heating's documents do not cover that.",
    )
    try:
        asked = svc.answer("I want to talk to a human", [], mode="rag")
        assert asked.text == "A person from Acme Heating will take over." and asked.handoff
        missed = svc.answer("xyzzy quux", [], mode="rag")
        assert missed.text == "Acme Heating's documents do not cover that." and missed.handoff
    finally:
        svc.close()


def test_handoff_on_request_writes_ticket(service):
    ans = service.answer("I want to talk to a human, my phone is 070-123 45 67", [], mode="rag")
    assert ans.handoff and ans.handoff["ticket_id"]
    assert "colleague" in ans.text
    tickets = service.store.handoffs(ans.conversation_id)
    assert tickets[0]["reason"] == "user asked for a person"
    assert "[PHONE]" in tickets[0]["transcript"][0]["content"] and "070" not in str([t["transcript"] for t in tickets])


def test_handoff_on_low_retrieval_score(service):
    ans = service.answer("xyzzy quux", [], mode="rag+lora")
    assert ans.handoff and "no relevant documentation" in ans.handoff["reason"]
    assert service.store.handoffs(ans.conversation_id)[0]["conversation_id"] == ans.conversation_id
    ok = service.answer("Do I need a building permit for an extension?", [], mode="rag")
    assert ok.handoff is None


def test_base_and_lora_modes_never_hand_off_on_score(service):
    assert service.answer("xyzzy quux", [], mode="lora").handoff is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail anna.svensson@example.se now", "mail [EMAIL] now"),
        ("pnr 19811218-9876.", "pnr [PERSONNUMMER]."),
        ("pnr 811218-9876", "pnr [PERSONNUMMER]"),
        ("pnr 8112189876", "pnr [PERSONNUMMER]"),
        ("ring +46 70 123 45 67", "ring [PHONE]"),
        ("ring 070-123 45 67!", "ring [PHONE]!"),
        ("call (555) 123-4567", "call [PHONE]"),
        ("A deck under 1.8 metres since 2019, PBL 9 kap. 4 f §, costs 25 000 kr", None),
    ],
)
def test_redaction(text, expected):
    assert redact(text) == (text if expected is None else expected)


def test_store_persists_and_isolates_owners(tmp_path):
    db = tmp_path / "c.db"
    store = ConversationStore(db)
    cid, created = store.open_conversation(None, owner_of("a"))
    assert created
    store.add_messages(cid, [{"role": "user", "content": "my email is x@y.se"}])
    store.close()
    again = ConversationStore(db)
    assert again.transcript(cid, owner_of("a"))["messages"][0]["content"] == "my email is [EMAIL]"
    with pytest.raises(ConversationNotFound):
        again.transcript(cid, owner_of("b"))
    with pytest.raises(ConversationNotFound):
        again.open_conversation(cid, owner_of("b"))
    assert "x@y.se" not in db.read_bytes().decode("latin-1")
    again.close()


def test_faq_fixture_ids_unique():
    assert len({r["id"] for r in FAQ_ROWS}) == len(FAQ_ROWS)


def test_chat_repl_streams_and_switches_mode(service):
    import io

    from pipeline.answer import chat_repl

    lines = iter(
        [
            "/mode lora",
            "/stage domain",
            "hello there",
            "/mode rag",
            "Do I need a building permit for an extension?",
            "/sources",
            "/quit",
        ]
    )
    out = io.StringIO()
    assert chat_repl(service=service, input_fn=lambda _prompt: next(lines), out=out) == 0
    text = out.getvalue()
    assert "bot> " in text and "sources: [1]" in text and "bygglov-001" in text


def test_chat_help_names_the_trained_stages(service):
    import io

    from pipeline.chat import chat_repl

    lines = iter(["/help", "/stage nonsense", "/quit"])
    out = io.StringIO()
    chat_repl(service=service, input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert "/stage general|domain|subdomain" in text
    assert "available stages: general, domain, subdomain" in text


def test_build_service_from_root_config(tmp_path, adapters_dir):
    from tiny_model import make_tiny_model, make_tiny_tokenizer

    from pipeline.answer import build_service
    from pipeline.api.settings import ServeConfig
    from pipeline.config import Config

    cfg = Config.model_validate({"paths": {"adapters_dir": str(adapters_dir), "index_dir": str(tmp_path / "no-index")}})
    tok = make_tiny_tokenizer()
    svc = build_service(
        cfg, serve=ServeConfig(db_path=str(tmp_path / "c.db")), model_and_tokenizer=(make_tiny_model(tok), tok)
    )
    try:
        assert svc.index is None and svc.default_mode == "lora"  # rag+lora falls back without an index
        assert svc.model_names()[0] == "raglora-base" and "raglora-lora-subdomain" in svc.model_names()
        assert svc.answer("hello", [], mode="lora").completion_tokens > 0
    finally:
        svc.close()


def _root_config(tmp_path, adapters_dir, **sections):
    from pipeline.config import Config

    paths = {"adapters_dir": str(adapters_dir), "index_dir": str(tmp_path / "no-index")}
    return Config.model_validate({"paths": paths, **sections})


def _tiny():
    from tiny_model import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    return make_tiny_model(tok), tok


def test_build_service_takes_persona_replies_and_language_from_the_project(tmp_path, adapters_dir):
    from pipeline.api.settings import ServeConfig
    from pipeline.service import build_service

    project = {
        "name": "Acme Heating",
        "description": "installs heat pumps and boilers",
        "handoff_reply": "Hold on, a person from Acme takes over.",
        "no_answer_reply": "Acme's manuals do not say.",
    }
    cfg = _root_config(tmp_path, adapters_dir, project=project, index={"language": "sv"})
    svc = build_service(cfg, serve=ServeConfig(db_path=str(tmp_path / "c.db")), model_and_tokenizer=_tiny())
    try:
        for prompt in (svc.system_prompt, svc.rag_system_prompt):
            assert "Acme Heating, which installs heat pumps and boilers." in prompt
            assert "{name}" not in prompt and "Swedish construction" not in prompt
        assert svc.handoff_reply == project["handoff_reply"] and svc.no_answer_reply == project["no_answer_reply"]
        assert svc.language == "sv"
        ans = svc.answer("Jag vill prata med en människa", [], mode="lora")  # Swedish hand-off rules are on
        assert ans.text == project["handoff_reply"] and ans.handoff["reason"] == "user asked for a person"
        prep = svc.prepare("hello", [], mode="lora")
        assert prep.messages[0]["content"] == svc.system_prompt
    finally:
        svc.close()


def test_configured_default_stage_that_is_not_trained_fails_at_startup(tmp_path, adapters_dir):
    from pipeline.api.settings import ServeConfig
    from pipeline.service import build_service

    cfg = _root_config(tmp_path, adapters_dir)
    serve = ServeConfig(db_path=str(tmp_path / "c.db"), default_stage="boilers")
    with pytest.raises(RagloraError, match=r"serve.default_stage 'boilers' is not a trained stage.*general"):
        build_service(cfg, serve=serve, model_and_tokenizer=_tiny())


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("", "You are the customer service assistant of Acme Heating. "),
        ("installs heat pumps and boilers", "of Acme Heating, which installs heat pumps and boilers. "),
        ("A heating firm in Malmö.", "of Acme Heating, a heating firm in Malmö. "),
        ("We install heat pumps.", "of Acme Heating. We install heat pumps. "),
    ],
)
def test_persona_fills_the_packaged_templates(description, expected):
    for with_context in (False, True):
        prompt = load_system_prompt(None, with_context, name="Acme Heating", description=description)
        assert expected in prompt and "{" not in prompt


def test_custom_prompt_file_placeholders_and_other_braces(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('Speak for {name}{description}. Reply as JSON {"answer": ...} {unknown}', encoding="utf-8")
    text = load_system_prompt(path, True, name="Acme", description="sells boilers")
    assert text == 'Speak for Acme, which sells boilers. Reply as JSON {"answer": ...} {unknown}'
    assert load_system_prompt(None, False).startswith("You are the customer service assistant of our company.")
