"""Damaged and unwritable artifacts: a clear RagloraError naming the file, and the previous artifacts untouched.

Covers index/manifest corruption beyond tests/retriever/test_index_corruption.py (random truncation, random
manifest mutations, JSON bombs), a damaged or full SQLite conversation database (in the store, at server start
and through the API), and disk-full / read-only writes. The machine runs tests as root, where chmod does not
stop writes, so read-only and ENOSPC are simulated: a path under a regular file, monkeypatched writes raising
OSError(EROFS/ENOSPC), and SQLite's own SQLITE_FULL via `PRAGMA max_page_count`.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from fake_embedder import FakeEmbedder
from fastapi.testclient import TestClient
from helpers import FAQ_ROWS, chat_body, make_index, make_service, serve_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from pipeline.api.app import create_app
from pipeline.cli import main as cli_main
from pipeline.store import ConversationStore, StoreError
from raglora.errors import RagloraError
from retriever.index import IndexWriteError, build_index, load_index

SETTINGS = {"chunk_size": 300, "chunk_overlap": 30, "show_progress": False}
FAST = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _write_kb(root: Path, rows=FAQ_ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "faq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _siblings(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    build_index([_write_kb(root / "kb")], root / "ix", FakeEmbedder(), **SETTINGS)
    return root / "ix"


@pytest.fixture
def built(pristine, tmp_path) -> Path:
    import shutil

    shutil.copytree(pristine, tmp_path / "ix")
    return tmp_path / "ix"


# ------------------------------------------------------------------------------------------ index corruption


def _set_path(obj, path: list, value):
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _paths(obj, prefix=()):
    yield list(prefix)
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@FAST
@given(data=st.data())
def test_any_mutated_manifest_field_is_a_clear_error_or_a_working_index(pristine, data):
    manifest = json.loads((pristine / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths), label="field")
    value = data.draw(JSON_VALUES, label="value")
    mutated = copy.deepcopy(manifest)
    _set_path(mutated, path, value)
    folder = Path(str(pristine) + "-mutated")
    if not folder.exists():
        import shutil

        shutil.copytree(pristine, folder)
    (folder / "manifest.json").write_text(json.dumps(mutated))
    try:
        index = load_index(folder, FakeEmbedder())
    except RagloraError as exc:
        assert str(folder) in str(exc) and "\n" not in str(exc)
        return
    assert index.search("building permit extension", k=2)  # loaded: it must still answer


@FAST
@given(fraction=st.floats(0.0, 0.999))
def test_a_manifest_truncated_anywhere_is_an_error_naming_it(pristine, tmp_path, fraction):
    import shutil

    folder = tmp_path / f"ix-{fraction}"
    shutil.copytree(pristine, folder)
    raw = (folder / "manifest.json").read_bytes()
    (folder / "manifest.json").write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(RagloraError, match=r"manifest\.json"):
        load_index(folder, FakeEmbedder())
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", ["chunks.jsonl", "vectors.npy", "faiss.index"])
@FAST
@given(data=st.data())
def test_a_flipped_byte_in_any_index_file_is_an_error_naming_it(pristine, tmp_path, name, data):
    import shutil

    folder = tmp_path / "ix-flip"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    raw = bytearray((folder / name).read_bytes())
    offset = data.draw(st.integers(0, len(raw) - 1), label="offset")
    raw[offset] ^= data.draw(st.integers(1, 255), label="xor")
    (folder / name).write_bytes(bytes(raw))
    with pytest.raises(RagloraError, match=name.replace(".", r"\.")):
        load_index(folder, FakeEmbedder())


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("manifest.json", b"[" * 100_000),
        ("manifest.json", b'{"format": ' + b"1" * 5000 + b"}"),
        ("manifest.json", b"\xff\xfe not utf-8"),
        ("chunks.jsonl", b"[" * 100_000 + b"\n"),
        (
            "chunks.jsonl",
            b'{"chunk_id": 1, "text": 2, "source": 3, "title": 4, "start": 0, "end": 1,'
            b' "content_hash": "", "doc_hash": "", "metadata": {}}\n',
        ),
    ],
    ids=["manifest-deep", "manifest-bigint", "manifest-binary", "chunks-deep", "chunks-wrong-types"],
)
def test_json_bombs_and_wrong_types_are_errors_naming_the_file(built, name, payload):
    if name != "manifest.json":  # get past the checksum to the parser
        manifest = json.loads((built / "manifest.json").read_text())
        del manifest["files"]
        manifest["counts"]["chunks"] = 1
        (built / "manifest.json").write_text(json.dumps(manifest))
    (built / name).write_bytes(payload)
    with pytest.raises(RagloraError, match=name.replace(".", r"\.")):
        load_index(built, FakeEmbedder())


def test_the_cli_reports_a_corrupt_index_in_one_line(built, capsys):
    (built / "faiss.index").write_bytes(b"garbage")
    assert cli_main(["search", "--index", str(built), "--mode", "bm25", "building permit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corrupt index file") and "faiss.index" in err and "\n" not in err


def test_the_server_refuses_to_start_on_a_corrupt_index_naming_the_file(built, tmp_path, monkeypatch):
    from tiny_model import make_tiny_model, make_tiny_tokenizer

    from pipeline.answer import build_service
    from pipeline.config import load_config

    monkeypatch.setattr("retriever.embedder.load_embedder", lambda name, device="cpu": FakeEmbedder())
    (built / "chunks.jsonl").write_bytes(b"{}\n")
    cfg = load_config(None, [f"paths.index_dir={built}", f"paths.adapters_dir={tmp_path / 'none'}"])
    tok = make_tiny_tokenizer()
    serve = serve_settings(tmp_path)
    app = create_app(
        serve=serve,
        service_factory=lambda: build_service(cfg, serve=serve, model_and_tokenizer=(make_tiny_model(tok), tok)),
    )
    with pytest.raises(RagloraError, match=r"chunks\.jsonl"), TestClient(app):
        pass


# ------------------------------------------------------------------------------------------ index writes


@pytest.mark.parametrize("target", ["chunks", "vectors", "faiss", "manifest"])
def test_disk_full_while_writing_the_index_is_a_clear_error_and_keeps_the_previous_index(
    built, tmp_path, monkeypatch, target
):
    import faiss
    import numpy as np

    kb = _write_kb(tmp_path / "kb2", [*FAQ_ROWS, {"id": "new-1", "question": "q", "answer": "A new answer."}])
    before = _digests(built)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "vectors":
        monkeypatch.setattr(np, "save", enospc)
    elif target == "faiss":  # faiss reports a failed write as RuntimeError
        monkeypatch.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(RuntimeError("write error: 28")))
    else:
        real_dump, real_open = json.dump, open
        if target == "manifest":
            monkeypatch.setattr(json, "dump", enospc)
        else:

            def open_fails_for_chunks(file, *args, **kwargs):
                if str(file).endswith("chunks.jsonl") and "w" in (args[0] if args else kwargs.get("mode", "r")):
                    enospc()
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr("builtins.open", open_fails_for_chunks)
        del real_dump
    with pytest.raises(RagloraError) as info:
        build_index([kb], built, FakeEmbedder(), **SETTINGS)
    assert isinstance(info.value, IndexWriteError) and str(built) in str(info.value)
    assert ("No space left" in str(info.value)) or ("faiss" in str(info.value))
    monkeypatch.undo()
    assert _digests(built) == before and _siblings(built) == set()
    assert len(load_index(built, FakeEmbedder())) == len(FAQ_ROWS)


def test_read_only_file_system_while_writing_the_index(built, tmp_path, monkeypatch):
    kb = _write_kb(tmp_path / "kb2", FAQ_ROWS[:3])
    before = _digests(built)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".ix.tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(IndexWriteError, match="Read-only file system"):
        build_index([kb], built, FakeEmbedder(), **SETTINGS)
    monkeypatch.undo()
    assert _digests(built) == before


def test_index_output_under_a_regular_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    kb = _write_kb(tmp_path / "kb")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(RagloraError, match="cannot create the index folder"):
        build_index([kb], blocker / "ix", FakeEmbedder(), **SETTINGS)
    monkeypatch.setattr("retriever.embedder.load_embedder", lambda name, device="cpu": FakeEmbedder())
    assert cli_main(["index", "--docs", str(kb), "--out", str(blocker / "ix")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot create the index folder") and "\n" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; simulated by the tests above")
def test_read_only_parent_folder_for_real(built, tmp_path):
    kb = _write_kb(tmp_path / "kb2", FAQ_ROWS[:3])
    before = _digests(built)
    os.chmod(built.parent, 0o555)
    try:
        with pytest.raises(RagloraError):
            build_index([kb], built, FakeEmbedder(), **SETTINGS)
    finally:
        os.chmod(built.parent, 0o755)
    assert _digests(built) == before


# ------------------------------------------------------------------------------------------ SQLite store


def _filled_store(path: Path, n: int = 150) -> list[str]:
    store = ConversationStore(path)
    ids = []
    for i in range(n):
        cid, _ = store.open_conversation(None, "owner")
        store.add_messages(
            cid, [{"role": "user", "content": f"q{i} " * 50}, {"role": "assistant", "content": "a " * 50}]
        )
        ids.append(cid)
    store.close()
    return ids


@pytest.mark.parametrize("damage", ["garbage", "truncated", "scrambled-pages", "directory", "under-a-file"])
def test_a_damaged_or_unusable_database_is_a_clear_error_naming_it(tmp_path, damage):
    db = tmp_path / "conversations.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    elif damage == "directory":
        db.mkdir()
    elif damage == "under-a-file":
        (tmp_path / "blocker").write_text("x")
        db = tmp_path / "blocker" / "conversations.db"
    else:
        _filled_store(db)
        raw = bytearray(db.read_bytes())
        if damage == "truncated":
            raw = raw[: len(raw) // 2]
        else:
            raw[8192 : len(raw) - 4096] = os.urandom(len(raw) - 8192 - 4096)
        db.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=str(db).replace(".", r"\.")) as info:
        ConversationStore(db)
    assert "\n" not in str(info.value)


def test_the_server_refuses_to_start_on_a_damaged_database(tmp_path):
    settings_ = serve_settings(tmp_path)
    Path(settings_.db_path).write_bytes(b"not sqlite" * 500)
    app = create_app(serve=settings_, service_factory=lambda: make_service(settings_, None))
    with pytest.raises(StoreError, match="conversations.db"), TestClient(app):
        pass


def _fill_up(store: ConversationStore) -> None:
    """Make the database full, exactly as a full disk does: SQLite then fails writes with SQLITE_FULL."""
    with store.engine.connect() as conn:  # SQLite stores use one connection, so the limit stays on it
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        conn.exec_driver_sql(f"PRAGMA max_page_count={pages}")


def test_disk_full_in_the_store_is_a_store_error_and_keeps_earlier_data(tmp_path):
    db = tmp_path / "c.db"
    ids = _filled_store(db, 3)
    store = ConversationStore(db)
    before = store.transcript(ids[0], "owner")
    _fill_up(store)
    with pytest.raises(StoreError, match="full"):
        for _ in range(50):
            store.add_messages(ids[0], [{"role": "user", "content": "x" * 4000}, {"role": "assistant", "content": "y"}])
    assert store.transcript(ids[0], "owner")["messages"] == before["messages"]  # nothing half-written
    store.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _fail_inserts(conn, cursor, statement, parameters, context, executemany):
    """A `before_cursor_execute` hook on the store's engine: reads pass, every INSERT fails as on a full disk."""
    if statement.lstrip().upper().startswith("INSERT"):
        raise sqlite3.OperationalError("database or disk is full")


def test_disk_full_through_the_api_is_a_503_and_earlier_conversations_stay_readable(tmp_path):
    settings_ = serve_settings(tmp_path)
    service = make_service(settings_, None, make_index(tmp_path))
    app = create_app(serve=settings_, service=service)
    auth = {"Authorization": "Bearer key-a"}
    with TestClient(app) as client:
        first = client.post("/v1/chat/completions", json=chat_body(conversation_id="before-full"), headers=auth)
        assert first.status_code == 200
        stored = client.get("/v1/conversations/before-full", headers=auth).json()
        event.listen(service.store.engine, "before_cursor_execute", _fail_inserts)
        for stream in (False, True):  # a new conversation cannot even be opened: 503 before any answer
            r = client.post("/v1/chat/completions", json=chat_body(stream=stream), headers=auth)
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert str(tmp_path) not in r.text  # the server's file path is logged, not shown
        # An existing conversation: the stream has started (200) when the turn cannot be stored.
        r = client.post(
            "/v1/chat/completions", json=chat_body(stream=True, conversation_id="before-full"), headers=auth
        )
        assert r.status_code == 200 and '"code": "store_unavailable"' in r.text
        assert r.text.rstrip().endswith("data: [DONE]") and str(tmp_path) not in r.text
        assert '"finish_reason": "stop"' not in r.text  # no acknowledgement of an unsaved turn
        again = client.get("/v1/conversations/before-full", headers=auth)
        assert again.status_code == 200 and again.json()["messages"] == stored["messages"]
        event.remove(service.store.engine, "before_cursor_execute", _fail_inserts)
        assert client.post("/v1/chat/completions", json=chat_body(), headers=auth).status_code == 200  # recovers
    service.close()
