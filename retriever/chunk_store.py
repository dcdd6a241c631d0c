"""The index's chunks.jsonl as a sequence: parsed into memory when small, read line by line on demand when large.

A million chunks parsed into Python objects take gigabytes; the ANN index over them takes tens of megabytes.
So above `EAGER_BYTES` only the line offsets stay in memory (8 bytes a chunk) and a chunk is parsed when a
search returns it. Below it everything is parsed, and validated, at load, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from raglora.errors import RagloraError
from retriever.chunking import Chunk

EAGER_BYTES = 64 * 1024 * 1024


def parse_chunk(line: str | bytes, path: Path, lineno: int) -> Chunk:
    """One chunks.jsonl line → Chunk; a bad line is a RagloraError naming the file and line."""
    try:
        chunk = Chunk.from_dict(json.loads(line))
        if not all(isinstance(getattr(chunk, k), str) for k in ("chunk_id", "text", "source", "title")):
            raise TypeError("chunk_id, text, source and title must be strings")
        if not isinstance(chunk.metadata, dict):
            raise TypeError("metadata must be an object")
        if not isinstance(chunk.questions, list) or not all(isinstance(q, str) for q in chunk.questions):
            raise TypeError("questions must be a list of strings")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise RagloraError(f"corrupt index file {path}: line {lineno}: {str(exc)[:200]}") from exc
    return chunk


def open_chunks(path: Path, expected: int) -> Sequence[Chunk]:
    """The chunks of an index file, eagerly (a list) or lazily (ChunkStore) by size; the count must match."""
    size = path.stat().st_size
    chunks = ChunkStore(path) if size > EAGER_BYTES else read_chunks(path)
    if len(chunks) != expected:
        raise RagloraError(f"{path} has {len(chunks)} chunks but the index manifest says {expected}")
    return chunks


def read_chunks(path: Path) -> list[Chunk]:
    try:
        with open(path, encoding="utf-8") as f:
            return [parse_chunk(line, path, n) for n, line in enumerate(f, 1)]
    except (OSError, UnicodeDecodeError) as exc:
        raise RagloraError(f"corrupt index file {path}: {exc}") from exc


class ChunkStore(Sequence[Chunk]):
    """Chunks read on demand by line offset. The file stays open, so an index swapped in underneath by a
    rebuild does not change what this one reads (the old inode lives until it is closed)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - lives as long as the store
        data = np.fromfile(self._file, dtype=np.uint8)
        ends = np.flatnonzero(data == 10)
        if len(data) and data[-1] != 10:  # a last line without its newline
            ends = np.append(ends, len(data))
        del data
        self._offsets = np.concatenate([[0], ends + 1]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} out of range (0..{len(self) - 1})")
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return parse_chunk(os.pread(self._file.fileno(), end - start, start), self.path, i + 1)

    def __iter__(self) -> Iterator[Chunk]:
        """Reads in blocks with pread (no shared file position, so concurrent readers are safe)."""
        block = 4096
        for first in range(0, len(self), block):
            last = min(first + block, len(self))
            start = int(self._offsets[first])
            data = os.pread(self._file.fileno(), int(self._offsets[last]) - start, start)
            for n, line in enumerate(data.splitlines(), first + 1):
                yield parse_chunk(line, self.path, n)

    def close(self) -> None:
        self._file.close()

    def __del__(self):
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
