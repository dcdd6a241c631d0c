"""Hypothetical-question indexing: which questions a chunk gets, that unchanged chunks reuse theirs, and that a
held-out FAQ question never reaches the index."""

from __future__ import annotations

import pytest

from raglora.errors import RagloraError
from retriever.chunking import Chunk, sha256
from retriever.questions import (
    add_questions_fn,
    generator_writer,
    heading_questions,
    parse_questions,
    question_prompt,
)


def _chunk(text: str, *, title: str = "", kind: str = "markdown", **meta) -> Chunk:
    return Chunk(
        chunk_id=f"doc#{sha256(text)[:6]}",
        text=text,
        source="doc.md",
        title=title,
        start=0,
        end=len(text),
        content_hash=sha256(text),
        doc_hash="d",
        metadata={"kind": kind, **meta},
    )


class FakeWriter:
    """Answers every prompt with a fixed completion and records the prompts it was given."""

    def __init__(self, completion: str = "1. How long does it take?\n2. What does it cost?\n"):
        self.completion = completion
        self.calls: list[list[list[dict]]] = []

    def __call__(self, prompts):
        self.calls.append(prompts)
        return [self.completion for _ in prompts]


def test_headings_from_markdown_title_headings_and_question_sentences():
    text = (
        "## How do I bleed a radiator?\n"
        "Turn the valve a quarter turn. Why does it gurgle? Air in the system.\n"
        "### Tools\n"
        "A radiator key."
    )
    chunk = _chunk(text, title="When should radiators be bled?")
    assert heading_questions(chunk, 5) == [
        "When should radiators be bled?",
        "How do I bleed a radiator?",
        "Why does it gurgle?",
    ]


def test_headings_from_plain_text_any_script_and_capped():
    chunk = _chunk("Värmepump. Hur ofta ska filtret bytas? Var tredje månad. 暖房はいつ点検しますか？", kind="text")
    assert heading_questions(chunk, 5) == ["Hur ofta ska filtret bytas?", "暖房はいつ点検しますか？"]
    assert heading_questions(chunk, 1) == ["Hur ofta ska filtret bytas?"]
    assert heading_questions(_chunk("No questions here. Just text.", title="Heat pumps"), 3) == []


def test_headings_never_use_the_faq_rows_own_question():
    question = "Do I need a permit for a deck?"
    # With the question in the chunk (question+answer index) and as the title (an FAQ row without a category).
    chunk = _chunk(f"{question}\n\nUsually not below 1.8 m.", title=question, kind="faq", question=question)
    assert heading_questions(chunk, 3) == []
    answers_only = _chunk("Usually not below 1.8 m.", title="altan", kind="faq", question=question)
    assert heading_questions(answers_only, 3) == []


def test_parse_questions_strips_numbering_and_drops_empty_duplicate_overlong_and_non_question_lines():
    completion = (
        "1. How long does it take?\n\n2) how long does it take?\n- What does it cost?\n"
        "A kitchen takes 2-3 months.\n" + "x" * 300 + "?\n"
    )
    assert parse_questions(completion, 3) == ["How long does it take?", "What does it cost?"]
    assert parse_questions("", 3) == []
    assert parse_questions("   \n\n", 3) == []


def test_generate_fills_questions_in_place_and_batches_every_prompt_once():
    chunks = [_chunk("Kitchens take 2-3 months."), _chunk("Roofs take 2 weeks."), _chunk("Kitchens take 2-3 months.")]
    writer = FakeWriter()
    add = add_questions_fn("generate", 2, generator_factory=lambda: writer)
    add(chunks, {})
    assert len(writer.calls) == 1 and len(writer.calls[0]) == 2  # one batch; the duplicate text is written once
    assert all(c.questions == ["How long does it take?", "What does it cost?"] for c in chunks)
    assert "Roofs take 2 weeks." in writer.calls[0][1][-1]["content"]
    assert chunks[0].index_text == "Kitchens take 2-3 months.\nHow long does it take?\nWhat does it cost?"


def test_unchanged_chunks_reuse_previous_questions_without_loading_the_generator():
    chunks = [_chunk("Kitchens take 2-3 months."), _chunk("Roofs take 2 weeks.")]
    previous = {c.content_hash: [f"old {i}?"] for i, c in enumerate(chunks)}
    factory_calls = []
    add = add_questions_fn("generate", 3, generator_factory=lambda: factory_calls.append(1) or FakeWriter())
    add(chunks, previous)
    assert factory_calls == []
    assert [c.questions for c in chunks] == [["old 0?"], ["old 1?"]]
    new = _chunk("Facades take a month.")
    writer = FakeWriter("What about facades?")
    add_questions_fn("generate", 3, generator_factory=lambda: writer)([*chunks, new], previous)
    assert [len(p) for p in writer.calls] == [1]  # only the new chunk
    assert new.questions == ["What about facades?"] and chunks[1].questions == ["old 1?"]


def test_generate_handles_empty_output():
    chunks = [_chunk("Kitchens take 2-3 months.")]
    add_questions_fn("generate", 3, generator_factory=lambda: FakeWriter(""))(chunks, {})
    assert chunks[0].questions == [] and chunks[0].index_text == chunks[0].text


def test_generate_drops_the_faq_rows_own_question_if_the_model_repeats_it():
    chunk = _chunk("Usually not below 1.8 m.", kind="faq", question="Do I need a permit for a deck?")
    writer = FakeWriter("Do I need a permit for a deck?\nHow high may a deck be?")
    add_questions_fn("generate", 3, generator_factory=lambda: writer)([chunk], {})
    assert chunk.questions == ["How high may a deck be?"]
    assert "permit for a deck" not in str(writer.calls)  # the prompt holds the answer text only


def test_modes_and_bad_settings():
    assert add_questions_fn("off", 3) is None
    with pytest.raises(RagloraError, match="unknown doc_questions mode 'llm'"):
        add_questions_fn("llm", 3)
    with pytest.raises(RagloraError, match="doc_questions_per_chunk"):
        add_questions_fn("headings", 0)
    with pytest.raises(RagloraError, match="generate needs"):
        add_questions_fn("generate", 3)
    chunks = [_chunk("Why is it cold? Because."), _chunk("Plain.")]
    add_questions_fn("headings", 3)(chunks, {})
    assert [c.questions for c in chunks] == [["Why is it cold?"], []]


def test_generate_with_the_tiny_model_through_the_serving_generator():
    from finetune.prompt import chat_ids
    from pipeline.generate import Generator, SamplingParams
    from pipeline.stage_models import StageModels
    from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    gen = Generator(StageModels(make_tiny_model(tok), tok), batch_wait_ms=5)
    try:
        writer = generator_writer(
            gen, lambda m: chat_ids(tok, m, add_generation_prompt=True), SamplingParams(max_new_tokens=6)
        )
        chunks = [_chunk("Kitchens take 2-3 months."), _chunk("Roofs take 2 weeks.")]
        add_questions_fn("generate", 2, generator_factory=lambda: writer)(chunks, {})
    finally:
        gen.close()
    for c in chunks:  # random weights: whatever came out, it obeys the limits
        assert len(c.questions) <= 2 and all(len(q) <= 200 for q in c.questions)
    assert question_prompt(chunks[0], 2)[-1]["content"].endswith("Kitchens take 2-3 months.")


def test_the_callable_names_the_settings_its_questions_depend_on():
    assert add_questions_fn("headings", 2).settings == {"doc_questions": "headings", "per_chunk": 2}
    generate = add_questions_fn("generate", 3, generator_factory=FakeWriter).settings
    assert generate["doc_questions"] == "generate" and generate["per_chunk"] == 3 and len(generate["prompt"]) == 12


def test_an_index_rebuild_reuses_questions_only_when_written_the_same_way(tmp_path):
    from fake_embedder import FakeEmbedder

    from retriever.index import build_index, load_index

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "help.md").write_text("# Passwords\n\nClick reset on the login page.\n", encoding="utf-8")
    seen = []

    def add(chunks, previous):
        seen.append(dict(previous))
        for c in chunks:
            c.questions = previous.get(c.content_hash) or ["How do I get back into my account?"]

    def build(settings):
        add.settings = settings
        build_index([tmp_path / "docs"], tmp_path / "ix", FakeEmbedder(), chunk_size=300, chunk_overlap=0,
                    show_progress=False, add_questions=add)  # fmt: skip

    build({"doc_questions": "generate", "per_chunk": 1})
    index = load_index(tmp_path / "ix")
    assert index.chunks[0].questions == ["How do I get back into my account?"]
    assert index.manifest["doc_questions"] == {"doc_questions": "generate", "per_chunk": 1}
    build({"doc_questions": "generate", "per_chunk": 1})
    assert list(seen[1].values()) == [["How do I get back into my account?"]]
    build({"doc_questions": "generate", "per_chunk": 2})
    assert seen[2] == {}
