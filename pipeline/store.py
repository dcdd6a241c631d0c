"""SQLite persistence for conversations, messages and hand-off tickets (one WAL-mode file under artifacts/).

Every write commits before it returns, so a restart after an acknowledged answer loses nothing. Content is
redacted (`pipeline.redact`) before it is written. Conversations belong to the hash of the API key that made
them; other keys cannot see them (the API answers 404, not 403, so ids cannot be probed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from pipeline.redact import redact, redact_obj
from raglora.errors import RagloraError

SCHEMA = """
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

ANONYMOUS = "anonymous"


def owner_of(api_key: str | None) -> str:
    """The stored owner id of an API key: a SHA-256 hash, never the key itself."""
    if not api_key:
        return ANONYMOUS
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


class ConversationNotFound(RagloraError):
    """Unknown conversation id, or one owned by another key (indistinguishable on purpose)."""


class StoreError(RagloraError):
    """The database failed (damaged file, disk full, read-only); nothing of the failed write was kept."""


class ConversationStore:
    """Thread-safe store; one connection guarded by a lock (writes are tiny, SQLite serialises them anyway)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder for the conversation database {self.path}: {exc}") from None
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            # A damaged file must stop the server at start with a clear error, not fail requests one by one.
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("damaged: " + " ".join(" ".join(map(str, problems)).split())[:300])
        except sqlite3.Error as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise StoreError(f"cannot open the conversation database {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _guard(self):
        """sqlite3 errors (damaged file, disk full, read-only) → StoreError naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"conversation database {self.path}: {exc}") from None

    def _tx(self, fn):
        with self._lock, self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (e.g. SQLITE_FULL); never mask the cause.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            return result

    # -- conversations -------------------------------------------------------------------------------------

    def open_conversation(self, conversation_id: str | None, owner: str) -> tuple[str, bool]:
        """Return (id, created). A new id is made when None; an existing id must belong to `owner`."""
        now = time.time()

        def op(db: sqlite3.Connection) -> tuple[str, bool]:
            cid = conversation_id or uuid.uuid4().hex
            row = db.execute("SELECT owner FROM conversations WHERE id = ?", (cid,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO conversations (id, owner, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (cid, owner, now, now),
                )
                return cid, True
            if row[0] != owner:
                raise ConversationNotFound(f"conversation {cid} not found")
            return cid, False

        return self._tx(op)

    def add_messages(self, conversation_id: str, messages: list[dict]) -> None:
        """Append messages ({role, content, meta?}) redacted, and commit."""
        now = time.time()

        def op(db: sqlite3.Connection) -> None:
            for m in messages:
                meta = m.get("meta")
                db.execute(
                    "INSERT INTO messages (conversation_id, role, content, meta, created_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        m["role"],
                        redact(m["content"]),
                        json.dumps(redact_obj(meta), ensure_ascii=False) if meta else None,
                        now,
                    ),
                )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))

        self._tx(op)

    def messages(self, conversation_id: str) -> list[dict]:
        with self._lock, self._guard():
            rows = self._db.execute(
                "SELECT role, content, meta, created_at FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        out = []
        for role, content, meta, created in rows:
            m = {"role": role, "content": content, "created_at": created}
            if meta:
                m["meta"] = json.loads(meta)
            out.append(m)
        return out

    def transcript(self, conversation_id: str, owner: str) -> dict:
        """The conversation with its messages and hand-off tickets; ConversationNotFound for others' ids."""
        with self._lock, self._guard():
            row = self._db.execute(
                "SELECT owner, created_at, updated_at FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        if row is None or row[0] != owner:
            raise ConversationNotFound(f"conversation {conversation_id} not found")
        return {
            "id": conversation_id,
            "created_at": row[1],
            "updated_at": row[2],
            "messages": self.messages(conversation_id),
            "handoffs": self.handoffs(conversation_id),
        }

    # -- hand-off tickets ----------------------------------------------------------------------------------

    def create_handoff(self, conversation_id: str, reason: str, transcript: list[dict]) -> int:
        now = time.time()
        body = json.dumps(redact_obj([{"role": m["role"], "content": m["content"]} for m in transcript]))

        def op(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO handoffs (conversation_id, reason, transcript, created_at) VALUES (?, ?, ?, ?)",
                (conversation_id, reason, body, now),
            )
            return int(cur.lastrowid)

        return self._tx(op)

    def handoffs(self, conversation_id: str | None = None) -> list[dict]:
        sql = "SELECT id, conversation_id, reason, transcript, status, created_at FROM handoffs"
        args: tuple = ()
        if conversation_id is not None:
            sql += " WHERE conversation_id = ?"
            args = (conversation_id,)
        with self._lock, self._guard():
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [
            {
                "id": r[0],
                "conversation_id": r[1],
                "reason": r[2],
                "transcript": json.loads(r[3]),
                "status": r[4],
                "created_at": r[5],
            }
            for r in rows
        ]
