"""The conversation store on SQLAlchemy Core: old SQLite files open unchanged, paths and URLs both work, concurrent
writers lose nothing, and a bad URL is one clear line that never shows the password. SQLite only (no server
database here); the PostgreSQL path differs only in the engine the URL selects."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from pipeline.store import ConversationNotFound, ConversationStore, StoreError, owner_of

# The schema exactly as the sqlite3-based store created it before SQLAlchemy.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    meta TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS handoffs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    reason TEXT NOT NULL,
    transcript TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    created_at REAL NOT NULL
);
"""


def _columns(path) -> dict:
    """(name, declared type, pk) per column of each table, and the index columns: what a reader of the file sees."""
    db = sqlite3.connect(path)
    try:
        out = {
            table: [(r[1], r[2], r[5]) for r in db.execute(f"PRAGMA table_info({table})")]
            for table in ("conversations", "messages", "handoffs")
        }
        out["index"] = [r[2] for r in db.execute("PRAGMA index_info(messages_by_conversation)")]
        out["foreign_keys"] = [r[2:5] for r in db.execute("PRAGMA foreign_key_list(messages)")]
        return out
    finally:
        db.close()


def test_a_new_file_has_the_same_tables_and_columns_as_the_old_sqlite3_store(tmp_path):
    old = sqlite3.connect(tmp_path / "old.db")
    old.executescript(OLD_SCHEMA)
    old.close()
    ConversationStore(tmp_path / "new.db").close()
    assert _columns(tmp_path / "new.db") == _columns(tmp_path / "old.db")
    db = sqlite3.connect(tmp_path / "new.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_file_written_by_the_old_store_reads_and_grows(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO conversations VALUES ('c1', ?, 1.5, 2.5)", (owner_of("k"),))
    old.execute(
        "INSERT INTO messages (conversation_id, role, content, meta, created_at) VALUES ('c1', 'user', 'q', NULL, 2)"
    )
    old.execute(
        "INSERT INTO messages (conversation_id, role, content, meta, created_at) "
        """VALUES ('c1', 'assistant', 'a', '{"model": "m"}', 2.5)"""
    )
    old.execute("INSERT INTO handoffs (conversation_id, reason, transcript, created_at) VALUES ('c1', 'r', '[]', 3)")
    old.commit()
    old.close()

    store = ConversationStore(path)
    got = store.transcript("c1", owner_of("k"))
    assert (got["created_at"], got["updated_at"]) == (1.5, 2.5)
    assert got["messages"] == [
        {"role": "user", "content": "q", "created_at": 2.0},
        {"role": "assistant", "content": "a", "created_at": 2.5, "meta": {"model": "m"}},
    ]
    assert got["handoffs"] == [
        {"id": 1, "conversation_id": "c1", "reason": "r", "transcript": [], "status": "open", "created_at": 3.0}
    ]
    assert store.open_conversation("c1", owner_of("k")) == ("c1", False)
    store.add_messages("c1", [{"role": "user", "content": "q2"}])
    assert store.create_handoff("c1", "again", []) == 2  # AUTOINCREMENT continues the old sequence
    assert [m["content"] for m in store.messages("c1")] == ["q", "a", "q2"]
    store.close()


@pytest.mark.parametrize("form", ["path", "str", "url"])
def test_a_path_or_an_sqlite_url_is_the_same_store(tmp_path, form):
    path = tmp_path / "sub" / "c.db"  # the folder is made
    target = {"path": path, "str": str(path), "url": f"sqlite:///{path}"}[form]
    store = ConversationStore(target)
    assert store.path == path and store.is_sqlite
    cid, created = store.open_conversation(None, "o")
    store.add_messages(cid, [{"role": "user", "content": "mail me at a@b.se"}])
    store.close()
    again = ConversationStore(path)
    assert created and again.messages(cid)[0]["content"] == "mail me at [EMAIL]"  # redacted before writing
    with pytest.raises(ConversationNotFound):
        again.transcript(cid, "someone else")
    again.close()


def test_an_in_memory_store_is_one_database_for_every_thread():
    store = ConversationStore("sqlite://")
    cid, _ = store.open_conversation(None, "o")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(store.open_conversation(cid, "o")))
    thread.start()
    thread.join()
    assert seen == [(cid, False)]  # a per-thread database would have made it again
    store.close()


def test_concurrent_writers_lose_nothing_and_keep_each_conversations_order(tmp_path):
    store = ConversationStore(tmp_path / "c.db")
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            cid, _ = store.open_conversation(f"conv-{n}", "o")
            for i in range(15):
                store.add_messages(
                    cid, [{"role": "user", "content": f"{n}-{i}"}, {"role": "assistant", "content": "a"}]
                )
            store.create_handoff(cid, "r", [{"role": "user", "content": "x"}])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for n in range(6):
        msgs = store.messages(f"conv-{n}")
        assert [m["content"] for m in msgs[::2]] == [f"{n}-{i}" for i in range(15)]
    assert len(store.handoffs()) == 6 and len({h["id"] for h in store.handoffs()}) == 6
    store.close()


def test_a_write_that_fails_midway_keeps_nothing_of_it(tmp_path):
    store = ConversationStore(tmp_path / "c.db")
    cid, _ = store.open_conversation(None, "o")
    with pytest.raises(StoreError, match="c.db"):  # the second message breaks NOT NULL after the first went in
        store.add_messages(cid, [{"role": "user", "content": "kept?"}, {"role": None, "content": "x"}])
    assert store.messages(cid) == []
    store.close()


def test_an_unusable_url_is_one_line_without_the_password(tmp_path):
    # psycopg is not installed here, so the engine cannot even be made: the same path as an unreachable server.
    with pytest.raises(StoreError) as info:
        ConversationStore("postgresql+psycopg://raglora:s3cret@127.0.0.1:1/conversations")
    message = str(info.value)
    assert message.startswith("cannot open the conversation database postgresql+psycopg://raglora:***@127.0.0.1:1")
    assert "s3cret" not in message and "\n" not in message
    with pytest.raises(StoreError, match="cannot open the conversation database nosuchdb://x"):
        ConversationStore("nosuchdb://x")
