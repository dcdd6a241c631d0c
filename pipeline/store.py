"""Persistence for conversations, messages and hand-off tickets, on SQLAlchemy Core.

`ConversationStore(path)` is one SQLite file in WAL mode (the default, under artifacts/); an SQLAlchemy URL
(`postgresql+psycopg://user@host/db`) puts the store in a server database, so several API replicas share one
set of conversations. Every write commits before it returns, so a restart after an acknowledged answer loses
nothing. Content is redacted (`pipeline.redact`) before it is written. Conversations belong to the hash of the API
key that made them; other keys cannot see them (the API answers 404, not 403, so ids cannot be probed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.pool import StaticPool

from pipeline.redact import redact, redact_obj
from raglora.errors import RagloraError

# The tables as the SQLite files written before SQLAlchemy have them (same names, columns, declared types), so
# old files open unchanged. On other databases ids are 64-bit and times double precision (PostgreSQL's REAL is
# 4 bytes: an epoch time in it is only accurate to minutes).
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's AUTOINCREMENT needs INTEGER PRIMARY KEY
_TIME = sa.Double().with_variant(sqlite.REAL(), "sqlite")  # seconds since the epoch

metadata = sa.MetaData()
conversation_table = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("updated_at", _TIME, nullable=False),
)
message_table = sa.Table(
    "messages",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("conversation_id", sa.Text, sa.ForeignKey("conversations.id"), nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("meta", sa.Text),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Index("messages_by_conversation", "conversation_id", "id"),
    sqlite_autoincrement=True,
)
handoff_table = sa.Table(
    "handoffs",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("conversation_id", sa.Text, sa.ForeignKey("conversations.id"), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("transcript", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="open"),
    sa.Column("created_at", _TIME, nullable=False),
    sqlite_autoincrement=True,
)

ANONYMOUS = "anonymous"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def owner_of(api_key: str | None) -> str:
    """The stored owner id of an API key: a SHA-256 hash, never the key itself."""
    if not api_key:
        return ANONYMOUS
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


class ConversationNotFound(RagloraError):
    """Unknown conversation id, or one owned by another key (indistinguishable on purpose)."""


class StoreError(RagloraError):
    """The database failed (damaged file, disk full, read-only, unreachable); nothing of the failed write was kept."""


def _reason(exc: BaseException) -> str:
    """The driver's own message on one line (SQLAlchemy's wrapper adds the SQL and a help link over lines)."""
    orig = getattr(exc, "orig", None) or exc
    return " ".join(str(orig).split())[:300] or type(orig).__name__


def _sqlite_setup(dbapi_connection, _record) -> None:
    # SQLAlchemy emits BEGIN itself (`_sqlite_begin`): the sqlite3 module's own transaction handling skips BEGIN
    # before SELECT and cannot take the write lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # A write takes the lock at BEGIN, so it waits for another process's writer (busy timeout) instead of failing
    # half-way with "database is locked".
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


class ConversationStore:
    """Thread-safe store; `url_or_path` is an SQLite file path or an SQLAlchemy database URL.

    SQLite: one connection guarded by a lock (writes are tiny, SQLite serialises them anyway). Other databases:
    SQLAlchemy's connection pool, no lock; concurrent replicas are safe because every write is one transaction.
    """

    def __init__(self, url_or_path: str | Path | sa.URL):
        is_url = isinstance(url_or_path, sa.URL) or bool(_URL.match(str(url_or_path)))
        self.path: Path | None = None  # the SQLite file, None for a server database
        try:
            url = sa.make_url(url_or_path if is_url else f"sqlite:///{url_or_path}")
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"cannot open the conversation database {url_or_path}: {_reason(exc)}") from None
        self.name = str(url_or_path) if not is_url else url.render_as_string(hide_password=True)
        self.is_sqlite = url.get_backend_name() == "sqlite"
        memory = self.is_sqlite and url.database in (None, "", ":memory:")
        if self.is_sqlite:
            self.path = Path(url.database or ":memory:")
            if not is_url:
                self.name = str(self.path)
        if self.is_sqlite and not memory:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder for the conversation database {self.name}: {exc}") from None
        self._lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        try:
            if self.is_sqlite:
                self.engine = sa.create_engine(
                    url, poolclass=StaticPool, connect_args={"check_same_thread": False, "timeout": 10}
                )
                event.listen(self.engine, "connect", _sqlite_setup)
                event.listen(self.engine, "begin", _sqlite_begin)
            else:
                self.engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"cannot open the conversation database {self.name}: {_reason(exc)}") from None
        self._writer = self.engine.execution_options(write=True)
        self._dbapi_error = getattr(self.engine.dialect.loaded_dbapi, "Error", sa.exc.DBAPIError)
        try:
            self._create_schema()
            if self.is_sqlite:
                # A damaged file must stop the server at start with a clear error, not fail requests one by one.
                with self.engine.connect() as conn:
                    problems = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise StoreError(
                        f"cannot open the conversation database {self.name}: damaged: "
                        + " ".join(" ".join(map(str, problems)).split())[:300]
                    )
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open the conversation database {self.name}: {_reason(exc)}") from None
        except StoreError:
            self.engine.dispose()
            raise

    def _create_schema(self) -> None:
        try:
            metadata.create_all(self._writer)
        except sa.exc.DBAPIError:
            if self.is_sqlite:
                raise
            # Replicas starting together race to create the tables; the loser finds them made on a second look.
            time.sleep(0.5)
            metadata.create_all(self._writer)

    def close(self) -> None:
        with self._lock:
            self.engine.dispose()

    @contextlib.contextmanager
    def _guard(self):
        """Database errors (damaged file, disk full, read-only, connection lost) → StoreError naming the store."""
        try:
            yield
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise StoreError(f"conversation database {self.name}: {_reason(exc)}") from None

    def _tx(self, fn, *, retry_conflict: bool = False):
        """Run fn(connection) in one write transaction, committed on return and rolled back on any error.

        `retry_conflict`: run it once more after a unique-key conflict (two replicas inserting the same new row).
        """
        with self._lock, self._guard():
            try:
                with self._writer.begin() as conn:
                    return fn(conn)
            except sa.exc.IntegrityError:
                if not retry_conflict:
                    raise
            with self._writer.begin() as conn:
                return fn(conn)

    def _read(self, statement) -> list[sa.Row]:
        with self._lock, self._guard(), self.engine.connect() as conn:
            return list(conn.execute(statement).all())

    # -- conversations -------------------------------------------------------------------------------------

    def open_conversation(self, conversation_id: str | None, owner: str) -> tuple[str, bool]:
        """Return (id, created). A new id is made when None; an existing id must belong to `owner`."""
        now = time.time()
        cid = conversation_id or uuid.uuid4().hex

        def op(conn: sa.Connection) -> tuple[str, bool]:
            row = conn.execute(sa.select(conversation_table.c.owner).where(conversation_table.c.id == cid)).first()
            if row is None:
                conn.execute(conversation_table.insert().values(id=cid, owner=owner, created_at=now, updated_at=now))
                return cid, True
            if row.owner != owner:
                raise ConversationNotFound(f"conversation {cid} not found")
            return cid, False

        return self._tx(op, retry_conflict=True)

    def add_messages(self, conversation_id: str, messages: list[dict]) -> None:
        """Append messages ({role, content, meta?}) redacted, and commit."""
        now = time.time()

        def op(conn: sa.Connection) -> None:
            for m in messages:  # one INSERT each: ids then follow the list's order on every database
                meta = m.get("meta")
                conn.execute(
                    message_table.insert().values(
                        conversation_id=conversation_id,
                        role=m["role"],
                        content=redact(m["content"]),
                        meta=json.dumps(redact_obj(meta), ensure_ascii=False) if meta else None,
                        created_at=now,
                    )
                )
            conn.execute(
                conversation_table.update().where(conversation_table.c.id == conversation_id).values(updated_at=now)
            )

        self._tx(op)

    def messages(self, conversation_id: str) -> list[dict]:
        m = message_table.c
        rows = self._read(
            sa.select(m.role, m.content, m.meta, m.created_at)
            .where(m.conversation_id == conversation_id)
            .order_by(m.id)
        )
        out = []
        for role, content, meta, created in rows:
            msg = {"role": role, "content": content, "created_at": created}
            if meta:
                msg["meta"] = json.loads(meta)
            out.append(msg)
        return out

    def transcript(self, conversation_id: str, owner: str) -> dict:
        """The conversation with its messages and hand-off tickets; ConversationNotFound for others' ids."""
        c = conversation_table.c
        rows = self._read(sa.select(c.owner, c.created_at, c.updated_at).where(c.id == conversation_id))
        if not rows or rows[0].owner != owner:
            raise ConversationNotFound(f"conversation {conversation_id} not found")
        return {
            "id": conversation_id,
            "created_at": rows[0].created_at,
            "updated_at": rows[0].updated_at,
            "messages": self.messages(conversation_id),
            "handoffs": self.handoffs(conversation_id),
        }

    # -- hand-off tickets ----------------------------------------------------------------------------------

    def create_handoff(self, conversation_id: str, reason: str, transcript: list[dict]) -> int:
        now = time.time()
        body = json.dumps(redact_obj([{"role": m["role"], "content": m["content"]} for m in transcript]))

        def op(conn: sa.Connection) -> int:
            result = conn.execute(
                handoff_table.insert().values(
                    conversation_id=conversation_id, reason=reason, transcript=body, created_at=now
                )
            )
            return int(result.inserted_primary_key[0])

        return self._tx(op)

    def handoffs(self, conversation_id: str | None = None) -> list[dict]:
        h = handoff_table.c
        query = sa.select(h.id, h.conversation_id, h.reason, h.transcript, h.status, h.created_at).order_by(h.id)
        if conversation_id is not None:
            query = query.where(h.conversation_id == conversation_id)
        return [
            {
                "id": r.id,
                "conversation_id": r.conversation_id,
                "reason": r.reason,
                "transcript": json.loads(r.transcript),
                "status": r.status,
                "created_at": r.created_at,
            }
            for r in self._read(query)
        ]
