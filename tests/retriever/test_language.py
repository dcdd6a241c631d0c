"""BM25 follows the index language: stemming and stop words per ISO 639-1 code, recorded in the manifest."""

from __future__ import annotations

import json
import logging

import pytest
from kb_helpers import write_jsonl

from retriever.index import build_index, load_index
from retriever.search import tokenize

SV_ROWS = [
    {
        "id": "tak-001",
        "category": "tak",
        "question": "Hur byter man takpannorna?",
        "answer": "Takpannorna byts rad för rad.",
    },
    {"id": "lov-001", "category": "lov", "question": "Behövs bygglovet?", "answer": "Bygglovet söks hos kommunen."},
    {"id": "pump-001", "category": "värme", "question": "Vad kostar det?", "answer": "Värmepumparna kostar mycket."},
]


def _build(tmp_path, embedder, language=None):
    kb = tmp_path / "kb"
    write_jsonl(kb / "faq.jsonl", SV_ROWS)
    out = tmp_path / f"ix-{language}"
    extra = {} if language is None else {"language": language}
    report = build_index([kb], out, embedder, chunk_size=300, chunk_overlap=30, show_progress=False, **extra)
    return report, load_index(out, embedder)


def test_swedish_stemming_matches_an_inflected_word_english_does_not(tmp_path, embedder):
    _, sv = _build(tmp_path, embedder, "sv")
    _, en = _build(tmp_path, embedder, "en")
    assert sv.language == "sv" and en.language == "en"
    assert json.loads((sv.path / "manifest.json").read_text())["language"] == "sv"
    # "värmepump" (singular) vs "Värmepumparna" (plural, definite) in the document: one Swedish stem.
    hits = sv.search("värmepump", k=1, mode="bm25")
    assert hits and hits[0].chunk.source == "pump-001"
    assert en.search("värmepump", k=1, mode="bm25") == []
    assert sv.search("takpanna", k=1, mode="bm25")[0].chunk.source == "tak-001"


def test_stop_words_follow_the_language():
    assert tokenize(["och det är"], "sv") == [[]]
    assert tokenize(["och det är"], "en") != [[]]


def test_unsupported_language_warns_and_still_searches(tmp_path, embedder, caplog):
    with caplog.at_level(logging.WARNING, logger="raglora.search"):
        report, index = _build(tmp_path, embedder, "zu")
    assert any("'zu'" in w and "no BM25 stemmer" in w for w in report.warnings)
    assert index.language == "zu"
    hits = index.search("Värmepumparna", k=1, mode="bm25")  # exact words still match
    assert hits and hits[0].chunk.source == "pump-001"
    assert index.search("Värmepumparna", k=2, mode="hybrid")


def test_index_without_language_in_its_manifest_loads_as_english(tmp_path, embedder):
    _, index = _build(tmp_path, embedder)
    manifest_path = index.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["language"] == "en"
    del manifest["language"]  # an index built before languages
    manifest_path.write_text(json.dumps(manifest))
    old = load_index(index.path, embedder)
    assert old.language == "en" and old.search("kostar", k=1, mode="bm25")


def test_changing_only_the_language_rewrites_the_manifest(tmp_path, embedder):
    kb = tmp_path / "kb"
    write_jsonl(kb / "faq.jsonl", SV_ROWS)
    out = tmp_path / "ix"
    build_index([kb], out, embedder, chunk_size=300, chunk_overlap=30, show_progress=False)
    report = build_index([kb], out, embedder, chunk_size=300, chunk_overlap=30, show_progress=False, language="sv")
    assert report.reused == report.n_chunks  # vectors do not depend on the language
    assert load_index(out, embedder).language == "sv"


@pytest.mark.parametrize(("given", "code"), [("SV", "sv"), ("sv-SE", "sv"), ("", "en"), (None, "en"), (3, "en")])
def test_language_codes_are_normalised(given, code):
    from retriever.search import normalise_language

    assert normalise_language(given) == code
