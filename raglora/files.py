"""File primitives every reader and artifact writer shares: JSONL in and out, atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from raglora.errors import RagloraError


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line raises naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise RagloraError(f"file not found: {p}")
    rows = []
    with open(p, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RagloraError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                except (RecursionError, ValueError) as exc:  # nesting too deep, integers too long
                    raise RagloraError(f"{p}:{lineno}: unreadable JSON ({type(exc).__name__})") from None
                if not isinstance(obj, dict):
                    raise RagloraError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                rows.append((lineno, obj))
        except UnicodeDecodeError:
            raise RagloraError(f"{p}: not UTF-8 text") from None
    return rows


def jsonl_text(rows: list[dict]) -> str:
    """Rows as JSONL with sorted keys, so the same rows always give the same bytes."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished folder in place of `final` by renames only: the old one is moved aside first and removed
    last, so a crash leaves either the old or the new folder, never a half-written one."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
