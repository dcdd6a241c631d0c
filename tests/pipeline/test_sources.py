"""Reading a company's own Q/A files: formats, field detection, ids, duplicates and the errors users see."""

import json

import pytest

from pipeline.datasets import collapse_duplicates
from pipeline.sources import detect_fields, load_source, read_records
from raglora.errors import RagloraError


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_csv_delimiter_is_sniffed_and_ticket_style_headers_are_mapped(tmp_path, sep):
    rows = [["Ticket No", "Customer wrote", "Agent resolution", "Product line", "KB article"]]
    rows += [[f"T-{i}", f"question {i} about boilers?", f"answer {i}", "boilers", "boilers.html"] for i in range(3)]
    path = _write(tmp_path, "t.csv", "\n".join(sep.join(r) for r in rows) + "\n")
    out, report = load_source(name="tickets", path=path)
    assert report.fields == {"question": "Customer wrote", "answer": "Agent resolution", "id": "Ticket No",
                             "category": "Product line", "source": "KB article"}  # fmt: skip
    assert out[1]["id"] == "T-1" and out[1]["category"] == "boilers" and out[1]["source"] == "boilers.html"
    assert out[1]["messages"] == [
        {"role": "user", "content": "question 1 about boilers?"},
        {"role": "assistant", "content": "answer 1"},
    ]


def test_common_names_win_and_people_or_dates_are_never_mistaken_for_fields():
    fields = detect_fields(["customer_email", "created date", "Subject", "Resolution", "topic"], {})
    assert fields == {"question": "Subject", "answer": "Resolution", "id": None, "category": "topic", "source": None}
    assert detect_fields(["a", "b"], {"question": "b", "answer": "a"})["question"] == "b"
    swedish = detect_fields(["Ärende-ID", "Kundens fråga", "Svar", "Kategori"], {})
    assert swedish == {
        "question": "Kundens fråga",
        "answer": "Svar",
        "id": "Ärende-ID",
        "category": "Kategori",
        "source": None,
    }


def test_alpaca_sharegpt_and_multi_turn_messages_are_detected(tmp_path):
    alpaca = _write(tmp_path, "a.json", json.dumps([{"instruction": "Q?", "input": "", "output": "A."}]))
    share = _write(
        tmp_path,
        "s.jsonl",
        json.dumps({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}) + "\n",
    )
    turns = [
        {"role": r, "content": c}
        for r, c in [("user", "Hi"), ("assistant", "Hello!"), ("user", "Price?"), ("assistant", "100 kr.")]
    ]
    msgs = _write(tmp_path, "m.jsonl", json.dumps({"id": "c1", "messages": turns}) + "\n")
    (a,), ra = load_source(name="a", path=alpaca)
    (s,), rs = load_source(name="s", path=share)
    (m,), rm = load_source(name="m", path=msgs)
    assert (ra.format, rs.format, rm.format) == ("alpaca", "sharegpt", "messages")
    assert a["question"] == s["question"] == "Q?" and a["answer"] == "A."
    assert m["question"] is None and m["answer"] is None and len(m["messages"]) == 4  # trains on every assistant turn


def test_missing_ids_get_a_stable_content_hash(tmp_path):
    path = _write(tmp_path, "q.jsonl", '{"q": "How?", "a": "Like this."}\n{"q": "Why?", "a": "Because."}\n')
    first, _ = load_source(name="faq", path=path)
    again, _ = load_source(name="faq", path=path)
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert first[0]["id"] != first[1]["id"] and first[0]["id"].startswith("faq-")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.csv", "", r"empty.csv: the file is empty"),
        ("nodelim.csv", "a,b\nc;d;e\nf|g|h|i\n", r"nodelim.csv: cannot find the CSV delimiter"),
        (
            "onecol.csv",
            "notes\nhello there\n",
            r"onecol.csv: no question and no answer column found \(columns: notes\)",
        ),
        (
            "fields.csv",
            "colour,size\nred,big\n",
            r"fields.csv: no question and no answer column found \(columns: colour, size\); name them with --question-field",
        ),
        (
            "blank.jsonl",
            '{"question": "", "answer": ""}\n',
            r"blank.jsonl: no usable question/answer rows \(1 skipped: row 1: empty question\)",
        ),
        ("bad.txt", "x", r"unsupported data file type .txt"),
    ],
)
def test_unusable_files_are_one_clear_error_naming_the_file(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(RagloraError, match=message):
        load_source(name="x", path=path)


def test_a_mapped_column_that_does_not_exist_is_named(tmp_path):
    path = _write(tmp_path, "t.csv", "q,a\nHow?,Like this.\n")
    with pytest.raises(RagloraError, match=r"question_field 'Subject' is not a column"):
        load_source(name="x", path=path, question_field="Subject")


def test_near_duplicate_questions_collapse_across_sources_and_clashing_ids_are_refused():
    def row(i, q):
        return {
            "id": i,
            "question": q,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}],
        }

    kept, dropped = collapse_duplicates(
        {"faq": [row("1", "Do I need a permit?")], "tickets": [row("t1", "do i need a PERMIT")]}
    )
    assert [r["id"] for r in kept["faq"]] == ["1"] and kept["tickets"] == [] and dropped == {"faq": 0, "tickets": 1}
    with pytest.raises(RagloraError, match=r"sources faq and tickets: id '1' is used by two different rows"):
        collapse_duplicates({"faq": [row("1", "Do I need a permit?")], "tickets": [row("1", "Opening hours?")]})


def test_json_object_holding_one_list_is_read(tmp_path):
    path = _write(tmp_path, "x.json", json.dumps({"items": [{"question": "Q?", "answer": "A."}]}))
    assert read_records(path) == [{"question": "Q?", "answer": "A."}]


def test_csv_with_delimiters_inside_quoted_prose_keeps_its_columns(tmp_path):
    text = 'question;answer;category\n"Is it open, today?";"Yes, 9-5, Monday; to Friday.";hours\n'
    text += '"Price, per hour?";"450 kr, VAT; included.";prices\n"Why?";"Because, see below; ok.";misc\n'
    rows, report = load_source(name="x", path=_write(tmp_path, "t.csv", text))
    assert report.fields["category"] == "category" and [r["category"] for r in rows] == ["hours", "prices", "misc"]
    assert rows[0]["answer"] == "Yes, 9-5, Monday; to Friday."


def test_a_one_column_csv_of_questions_is_an_out_of_kb_list(tmp_path):
    from pipeline.datasets import user_out_of_kb

    path = _write(tmp_path, "unanswerable.csv", 'question\nWhat are your opening hours?\n"Do you sell, say, saunas?"\n')
    assert sorted(r["question"] for r in user_out_of_kb(path)) == [
        "Do you sell, say, saunas?",
        "What are your opening hours?",
    ]
