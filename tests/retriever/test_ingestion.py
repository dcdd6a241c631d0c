import json

import pytest
from kb_helpers import make_pdf, write_jsonl

from raglora.errors import RagloraError
from retriever.documents import load_documents


def test_markdown_is_split_into_sections_titled_by_heading(tmp_path):
    (tmp_path / "guide.md").write_text(
        "Intro text before any heading.\n\n# Roofs\nTiles and flashing.\n\n## Gutters\nClean twice a year.\n"
        "```\n# not a heading inside a fence\n```\n\n# Empty\n",
        encoding="utf-8",
    )
    docs, warnings = load_documents([tmp_path])
    assert warnings == []
    assert [d.title for d in docs] == ["guide", "Roofs", "Gutters"]
    assert docs[1].text == "# Roofs\nTiles and flashing."
    assert "# not a heading inside a fence" in docs[2].text
    assert all(d.source == (tmp_path / "guide.md").as_posix() for d in docs)


def test_txt_is_read_like_markdown(tmp_path):
    (tmp_path / "notes.txt").write_text("Plain notes without headings.", encoding="utf-8")
    docs, _ = load_documents([tmp_path / "notes.txt"])
    assert [(d.title, d.text) for d in docs] == [("notes", "Plain notes without headings.")]


def test_html_headings_become_section_titles(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>Guide</title><style>p {color: red}</style></head><body>"
        "<p>Welcome text.</p><h1>Heat <em>pumps</em></h1><p>Service yearly.</p>"
        "<script>var x = 1;</script><h2>Noise</h2><ul><li>Keep away</li><li>from windows</li></ul></body></html>",
        encoding="utf-8",
    )
    docs, _ = load_documents([tmp_path])
    assert [d.title for d in docs] == ["Guide", "Heat pumps", "Noise"]
    assert "Service yearly." in docs[1].text
    assert "Keep away" in docs[2].text and "from windows" in docs[2].text
    assert not any("var x" in d.text or "color" in d.text for d in docs)


def test_pdf_gives_one_document_per_page(tmp_path):
    make_pdf(tmp_path / "manual.pdf", ["First page about roofs.", "Second page about drains."])
    docs, warnings = load_documents([tmp_path])
    assert warnings == []
    assert [d.title for d in docs] == ["manual p.1", "manual p.2"]
    assert "roofs" in docs[0].text and "drains" in docs[1].text
    assert docs[1].metadata["page"] == 2


def test_jsonl_faq_rows_index_the_answer_only_by_default(tmp_path):
    write_jsonl(
        tmp_path / "faq.jsonl",
        [
            {"id": "r-1", "category": "roofing", "question": "Why do tiles crack?", "answer": "Frost.", "n": 3},
            {"q": "Short form?", "a": "Yes."},
            {"instruction": "Say hi", "output": "Hi!", "title": "Greeting"},
            {"text": "A plain text row.", "nested": {"dropped": True}},
        ],
    )
    docs, _ = load_documents([tmp_path])
    assert [d.text for d in docs] == ["Frost.", "Yes.", "Hi!", "A plain text row."]
    path = (tmp_path / "faq.jsonl").as_posix()
    assert [d.source for d in docs] == ["r-1", f"{path}#2", f"{path}#3", f"{path}#4"]
    assert [d.title for d in docs] == ["roofing", "Short form?", "Greeting", f"{path}#4"]
    assert docs[0].metadata == {
        "id": "r-1",
        "category": "roofing",
        "n": 3,
        "question": "Why do tiles crack?",
        "kind": "faq",
    }
    assert "nested" not in docs[3].metadata


def test_faq_include_question_puts_the_question_in_the_text(tmp_path):
    write_jsonl(tmp_path / "faq.jsonl", [{"id": "x", "question": "Why?", "answer": "Because."}])
    docs, _ = load_documents([tmp_path], faq_include_question=True)
    assert docs[0].text == "Why?\n\nBecause."


def test_json_file_with_a_list_of_rows(tmp_path):
    rows = [{"id": "a", "question": "Q1", "answer": "A1"}, {"id": "b", "question": "Q2", "answer": "A2"}]
    (tmp_path / "faq.json").write_text(json.dumps({"rows": rows}), encoding="utf-8")
    docs, _ = load_documents([tmp_path / "faq.json"])
    assert [(d.source, d.text) for d in docs] == [("a", "A1"), ("b", "A2")]


def test_bad_json_line_is_skipped_with_a_warning_naming_the_line(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text('{"id": "a", "q": "Q", "a": "A"}\n{broken\n{"id": "c", "wrong": 1}\n', encoding="utf-8")
    docs, warnings = load_documents([path])
    assert [d.source for d in docs] == ["a"]
    assert len(warnings) == 2
    assert f"{path}:2" in warnings[0] and "bad JSON" in warnings[0]
    assert f"{path}:3" in warnings[1]


def test_non_utf8_file_is_skipped_with_a_warning_naming_it(tmp_path):
    (tmp_path / "good.md").write_text("Fine text.", encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    docs, warnings = load_documents([tmp_path])
    assert [d.text for d in docs] == ["Fine text."]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "UTF-8" in warnings[0]


def test_folders_are_walked_recursively_in_sorted_order_skipping_hidden_and_unsupported(tmp_path):
    for rel in ["b/two.md", "a/one.md", "a/z/three.txt", ".hidden/secret.md", "a/image.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"text of {rel}", encoding="utf-8")
    docs, _ = load_documents([tmp_path])
    assert [d.title for d in docs] == ["one", "three", "two"]


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(RagloraError, match="does-not-exist"):
        load_documents([tmp_path / "does-not-exist"])


def test_folder_without_supported_documents_is_an_error(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(RagloraError, match="no supported documents"):
        load_documents([tmp_path])


def test_only_empty_documents_is_an_error(tmp_path):
    (tmp_path / "empty.md").write_text("   \n", encoding="utf-8")
    with pytest.raises(RagloraError, match="empty or unreadable"):
        load_documents([tmp_path])
