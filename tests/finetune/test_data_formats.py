"""Format detection/conversion (messages, ShareGPT, Alpaca) and clear errors for bad data files."""

from __future__ import annotations

import pytest
from ft_helpers import write_jsonl

from finetune.data import detect_format, load_examples, to_messages
from raglora.errors import RagloraError


def test_detects_and_converts_openai_messages():
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert detect_format(row) == "messages"
    assert to_messages(row) == row["messages"]


def test_detects_and_converts_sharegpt_with_system():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye"},
        ]
    }
    assert detect_format(row) == "sharegpt"
    assert [m["role"] for m in to_messages(row)] == ["system", "user", "assistant", "user", "assistant"]
    assert to_messages(row)[4] == {"role": "assistant", "content": "Goodbye"}


def test_detects_and_converts_alpaca_with_and_without_input():
    row = {"instruction": "Translate", "input": "hej", "output": "hello"}
    assert detect_format(row) == "alpaca"
    assert to_messages(row) == [
        {"role": "user", "content": "Translate\n\nhej"},
        {"role": "assistant", "content": "hello"},
    ]
    assert to_messages({"instruction": "Say hi", "output": "hi"})[0]["content"] == "Say hi"


def test_formats_are_detected_per_line_in_one_file(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "a", "output": "b"},
            {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
            {"id": "x", "messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]},
        ],
    )
    examples = load_examples(path, stage="s")
    assert [e["messages"][-1]["content"] for e in examples] == ["b", "d", "f"]
    assert examples[2]["id"] == "x"
    assert examples[0]["question"] == "a" and examples[0]["answer"] == "b"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n', encoding="utf-8")
    with pytest.raises(RagloraError, match=r"bad\.jsonl:3: malformed JSON"):
        load_examples(path, stage="s")


def test_unknown_format_and_bad_role_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"instruction": "a", "output": "b"}, {"prompt": "x"}])
    with pytest.raises(RagloraError, match=r"f\.jsonl:2: unknown format"):
        load_examples(path, stage="s")
    path = write_jsonl(tmp_path / "g.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(RagloraError, match=r"g\.jsonl:1: messages\[0\]\.role: unknown role 'robot'"):
        load_examples(path, stage="s")


def test_row_without_assistant_answer_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(RagloraError, match=r"h\.jsonl:1: no non-empty assistant message"):
        load_examples(path, stage="s")


def test_empty_dataset_and_missing_file_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(RagloraError, match=r"empty\.jsonl has no examples"):
        load_examples(tmp_path / "empty.jsonl", stage="s")
    with pytest.raises(RagloraError, match="dataset file not found"):
        load_examples(tmp_path / "nope.jsonl", stage="s")
