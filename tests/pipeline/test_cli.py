"""The CLI contract: exit codes, one-line errors, and `search --json` output (fake embedder, tiny docs)."""

import json

import pytest
from fake_embedder import FakeEmbedder

from pipeline.cli import main


@pytest.fixture(autouse=True)
def fake_embedder(monkeypatch):
    embedder = FakeEmbedder()
    monkeypatch.setattr("retriever.embedder.load_embedder", lambda name, **kw: embedder)
    return embedder


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "faq.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "id": "bygglov-001",
                    "category": "bygglov",
                    "question": "Permit?",
                    "answer": "A building permit is needed for extensions.",
                },
                {
                    "id": "rot-001",
                    "category": "rot-avdrag",
                    "question": "ROT?",
                    "answer": "The ROT deduction covers labour costs.",
                },
                {
                    "id": "vvs-001",
                    "category": "vvs",
                    "question": "Pipes?",
                    "answer": "Plumbing work must be done by a certified installer.",
                },
            ]
        )
        + "\n"
    )
    (d / "guide.md").write_text("# Roofs\n\nRoof tiles last about fifty years.\n")
    return d


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "index", "search", "finetune", "merge"):
        assert command in out


def test_index_then_search_json_returns_best_first_with_required_fields(tmp_path, docs, capsys):
    index = tmp_path / "index"
    code, out, _ = run(capsys, "index", "--docs", str(docs / "faq.jsonl"), str(docs / "guide.md"), "--out", str(index))
    assert code == 0 and "4 chunks" in out
    code, out, _ = run(
        capsys, "search", "--index", str(index), "--k", "2", "--mode", "bm25", "--json", "ROT deduction labour"
    )
    assert code == 0
    hits = json.loads(out)
    assert len(hits) == 1 or hits[0]["score"] >= hits[1]["score"]
    assert {"text", "source", "title", "score", "chunk_id"} <= hits[0].keys()
    assert hits[0]["source"] == "rot-001"


def test_search_filter_restricts_results(tmp_path, docs, capsys):
    index = tmp_path / "index"
    assert run(capsys, "index", "--docs", str(docs), "--out", str(index))[0] == 0
    code, out, _ = run(
        capsys,
        "search",
        "--index",
        str(index),
        "--k",
        "3",
        "--filter",
        "category=vvs",
        "--json",
        "permit for extensions",
    )
    assert code == 0
    assert [h["source"] for h in json.loads(out)] == ["vvs-001"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "--docs", "no/such/folder", "--out", "{tmp}/i"], "documents not found: no/such/folder"),
        (["index", "--docs", "{tmp}/empty", "--out", "{tmp}/i"], "no supported documents"),
        (["search", "--index", "{tmp}/missing", "hello"], "no index at"),
        (["search", "--index", "{tmp}/index", "   "], "empty query"),
        (["search", "--index", "{tmp}/index", "--k", "0", "hello"], "--k must be a positive"),
        (["search", "--index", "{tmp}/corrupt", "hello"], "corrupt"),
        (["search", "--set", "retrieval.k=zero", "hello"], "retrieval.k"),
        (["search", "--index", "{tmp}/index", "--filter", "nokey", "hello"], "--filter expects KEY=VALUE"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, docs, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    assert run(capsys, "index", "--docs", str(docs), "--out", str(tmp_path / "index"))[0] == 0
    assert run(capsys, "index", "--docs", str(docs), "--out", str(tmp_path / "corrupt"))[0] == 0
    (tmp_path / "corrupt" / "chunks.jsonl").write_text("{not json\n")
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("error: ") and message.lower() in err.lower()
    assert "Traceback" not in err
