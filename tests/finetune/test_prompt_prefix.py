"""The shared prompt: system prompts, context rendering, and the serving prompt is a prefix of training ids."""

from __future__ import annotations

import pytest
from tiny_model import make_tiny_tokenizer

from finetune.data import IGNORE_INDEX, tokenize_conversation, with_system
from finetune.prompt import (
    CONTEXT_BEGIN,
    CONTEXT_END,
    build_messages,
    chat_ids,
    load_system_prompt,
)
from raglora.errors import RagloraError

CONTEXTS = [
    {"title": "bygglov", "text": "A bygglov is a building permit."},
    {"title": "", "text": "Decks   are\nfree."},
]


def test_default_system_prompts_state_the_persona_and_rag_rules():
    plain = load_system_prompt(None, with_context=False, name="Acme Heating")
    rag = load_system_prompt(None, with_context=True, name="Acme Heating")
    assert "Acme Heating" in plain and "Acme Heating" in rag
    assert "construction" not in load_system_prompt(None, with_context=True)  # company-neutral templates
    for phrase in ("only", "[n]", "human colleague", "never instructions"):
        assert phrase in rag
    assert "[n]" not in plain


def test_custom_and_missing_system_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("  Be nice.\n", encoding="utf-8")
    assert load_system_prompt(tmp_path / "p.txt", with_context=True) == "Be nice."
    with pytest.raises(RagloraError, match="system prompt file not found"):
        load_system_prompt(tmp_path / "missing.txt", with_context=False)


def test_build_messages_renders_numbered_delimited_context_then_question():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    msgs = build_messages("Do I need a permit?", contexts=CONTEXTS, history=history, system_prompt="SYS")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    user = msgs[-1]["content"]
    assert "[1] (bygglov) A bygglov is a building permit." in user
    assert "[2] Decks are free." in user
    assert user.index(CONTEXT_BEGIN) < user.index("[1]") < user.index(CONTEXT_END) < user.index("Do I need a permit?")
    assert build_messages("Q?", system_prompt="SYS")[-1] == {"role": "user", "content": "Q?"}


def test_build_messages_rejects_bad_history():
    with pytest.raises(RagloraError, match="history"):
        build_messages("Q", history=[{"role": "system", "content": "x"}], system_prompt="S")


@pytest.mark.parametrize("contexts", [None, CONTEXTS])
def test_serving_prompt_is_a_prefix_of_the_training_tokenisation(contexts):
    tok = make_tiny_tokenizer()
    history = [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Fine."}]
    msgs = build_messages("Do I need a permit?", contexts=contexts, history=history, system_prompt="You help.")
    served = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert served == chat_ids(tok, msgs, add_generation_prompt=True)
    train = tokenize_conversation(tok, [*msgs, {"role": "assistant", "content": "Yes, a bygglov."}])
    assert train["input_ids"][: len(served)] == served
    # and the first trained token is the one right after the prompt
    first = next(i for i, label in enumerate(train["labels"]) if label != IGNORE_INDEX and i > 0 and i >= len(served))
    assert first == len(served)


def test_row_system_prompt_is_kept_else_ours_is_added():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert with_system(msgs, "OURS")[0] == {"role": "system", "content": "OURS"}
    own = [{"role": "system", "content": "THEIRS"}, *msgs]
    assert with_system(own, "OURS") == own
