"""Split Documents into Chunks with exact character offsets, stable ids and content hashes.

Offsets let a citation point into the source text; ids are deterministic so re-indexing and citations
agree; content hashes let an incremental build reuse the vectors of unchanged chunks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from langchain_text_splitters import RecursiveCharacterTextSplitter

from raglora.errors import RagloraError
from retriever.documents import Document


@dataclass
class Chunk:
    """A piece of a Document that is embedded and searched; `doc_text[start:end] == text`."""

    chunk_id: str
    text: str
    source: str
    title: str
    start: int
    end: int
    content_hash: str
    doc_hash: str
    metadata: dict = field(default_factory=dict)
    # Hypothetical questions this chunk answers (index.doc_questions): embedded and keyword-indexed with the
    # text so a customer's question meets a question, never shown or cited.
    questions: list[str] = field(default_factory=list)

    @property
    def index_text(self) -> str:
        """What the embedder and BM25 see: the text, then its questions."""
        return "\n".join([self.text, *self.questions]) if self.questions else self.text

    @property
    def vector_key(self) -> str:
        """Identity of the embedded text, for reusing vectors across builds."""
        return sha256("\x00".join([self.content_hash, *self.questions])) if self.questions else self.content_hash

    def to_dict(self) -> dict:
        return {
            "chunk_id": self.chunk_id,
            "text": self.text,
            "source": self.source,
            "title": self.title,
            "start": self.start,
            "end": self.end,
            "content_hash": self.content_hash,
            "doc_hash": self.doc_hash,
            "metadata": self.metadata,
            **({"questions": self.questions} if self.questions else {}),
        }

    @classmethod
    def from_dict(cls, row: dict) -> Chunk:
        optional = {"questions"}
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k not in optional or k in row})


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def document_hash(doc: Document) -> str:
    """Identity of a document's content: text + title (a renamed section is a changed document)."""
    return sha256(f"{doc.title}\x00{doc.text}")


def split_with_offsets(text: str, splitter: RecursiveCharacterTextSplitter) -> list[tuple[str, int]]:
    """Split `text` and locate each piece in it; pieces are searched forward so repeated text maps correctly."""
    out: list[tuple[str, int]] = []
    cursor = 0
    for piece in splitter.split_text(text):
        start = text.find(piece, cursor)
        if start < 0:  # cannot happen for the recursive splitter; be safe rather than wrong
            start = text.find(piece)
        if start < 0:
            raise RuntimeError(f"splitter produced text not found in its document: {piece[:60]!r}")
        out.append((piece, start))
        cursor = start + 1
    return out


def chunk_documents(docs: list[Document], *, chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """Documents → Chunks. FAQ rows (metadata kind == "faq") stay one chunk; everything else is split by characters.

    chunk_id: an FAQ row's own id; otherwise `f"{source}#{n}"` with n counting chunks per source in document order.
    Ids are made unique by a `~2`, `~3` suffix if two rows share an id.
    """
    if chunk_size <= 0:
        raise RagloraError(f"chunk_size must be positive, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise RagloraError(f"chunk_overlap must be >= 0 and < chunk_size ({chunk_size}), got {chunk_overlap}")
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    chunks: list[Chunk] = []
    per_source: dict[str, int] = {}
    used_ids: set[str] = set()
    for doc in docs:
        doc_hash = document_hash(doc)
        if doc.metadata.get("kind") == "faq":
            stripped = doc.text.strip()
            pieces = [(stripped, doc.text.find(stripped))] if stripped else []
        else:
            pieces = split_with_offsets(doc.text, splitter)
        for piece, start in pieces:
            if doc.metadata.get("kind") == "faq":
                base_id = doc.source
            else:
                n = per_source.get(doc.source, 0)
                per_source[doc.source] = n + 1
                base_id = f"{doc.source}#{n}"
            chunk_id, dup = base_id, 1
            while chunk_id in used_ids:
                dup += 1
                chunk_id = f"{base_id}~{dup}"
            used_ids.add(chunk_id)
            chunks.append(
                Chunk(
                    chunk_id=chunk_id,
                    text=piece,
                    source=doc.source,
                    title=doc.title,
                    start=start,
                    end=start + len(piece),
                    content_hash=sha256(piece),
                    doc_hash=doc_hash,
                    metadata=dict(doc.metadata),
                )
            )
    return chunks
