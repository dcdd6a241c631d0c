"""Build, update and load the on-disk index folder.

Layout: manifest.json (settings, versions, per-document hashes, file checksums), chunks.jsonl,
vectors.npy (float32, unit rows; kept so incremental builds reuse them) and faiss.index. BM25 is rebuilt
from chunks.jsonl at load time (fast, and one less file to keep consistent).

Writes are atomic: the new index is written and fsynced in a hidden temp sibling, then swapped in with
two renames. If a crash lands between them, `load_index` reads the kept previous index from the hidden
`.<name>.old` sibling and the next build puts it back, so some complete index is always loadable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from raglora.errors import RagloraError
from raglora.files import file_sha256
from retriever.chunking import Chunk, chunk_documents
from retriever.documents import load_documents
from retriever.embedder import Embedder, normalise
from retriever.search import DEFAULT_LANGUAGE, DEFAULTS, Hit, build_bm25, language_warning, normalise_language
from retriever.search import search as run_search

FORMAT = "raglora-index"
FORMAT_VERSION = 1
MANIFEST, CHUNKS, VECTORS, FAISS = "manifest.json", "chunks.jsonl", "vectors.npy", "faiss.index"
INDEX_FILES = (MANIFEST, CHUNKS, VECTORS, FAISS)
INDEX_TYPES = ("flat", "ivf", "hnsw")
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16


class IndexWriteError(RagloraError, OSError):
    """The index could not be written (disk full, read-only, a file in the way); the previous index is intact.

    Also an OSError, so callers that already handle file-system errors keep working.
    """


@dataclass
class BuildReport:
    """What a build did. Counts are chunks: embedded + reused == n_chunks; removed = old vectors dropped."""

    n_documents: int
    n_chunks: int
    embedded: int
    reused: int
    removed: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    index_type: str = "flat"


class Index:
    """A loaded index: chunks, their vectors, the faiss index, BM25, and (optionally) the query embedder."""

    def __init__(
        self, path: Path, manifest: dict, chunks: list[Chunk], vectors: np.ndarray, faiss_index, bm25, embedder
    ):
        self.path = path
        self.manifest = manifest
        self.chunks = chunks
        self.vectors = vectors
        self.faiss_index = faiss_index
        self.bm25 = bm25
        self.embedder = embedder

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def language(self) -> str:
        """ISO 639-1 code of the documents (BM25 stemming and stop words); "en" for indexes built before it."""
        return normalise_language(self.manifest.get("language"))

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {len(self.chunks)} chunks, {self.manifest.get('index_type')})"

    def search(
        self,
        query: str,
        *,
        k: int = DEFAULTS.k,
        mode: str = DEFAULTS.mode,
        filters: dict | None = None,
        rrf_k: int = DEFAULTS.rrf_k,
        dense_weight: float = DEFAULTS.dense_weight,
        bm25_weight: float = DEFAULTS.bm25_weight,
        candidates: int = DEFAULTS.candidates,
        exclude: Collection[str] = (),
    ) -> list[Hit]:
        """Top-k chunks for `query`; see retriever.search.search."""
        return run_search(
            self,
            query,
            k=k,
            mode=mode,
            filters=filters,
            rrf_k=rrf_k,
            dense_weight=dense_weight,
            bm25_weight=bm25_weight,
            candidates=candidates,
            exclude=exclude,
        )


# ----------------------------------------------------------------------------------------------- build


def build_index(
    doc_paths: list[str | Path],
    out_dir: str | Path,
    embedder: Embedder,
    *,
    chunk_size: int,
    chunk_overlap: int,
    faq_include_question: bool = False,
    index_type: str = "flat",
    batch_size: int = 64,
    ivf_nlist: int = 256,
    hnsw_m: int = 32,
    show_progress: bool = True,
    language: str = DEFAULT_LANGUAGE,
) -> BuildReport:
    """Index `doc_paths` into `out_dir`, reusing vectors of unchanged chunks from a compatible existing index.

    `language` (ISO 639-1, the `index.language` config) is recorded in the manifest; the loaded index analyses
    documents and queries for BM25 in it. A language without a stemmer is indexed unstemmed, with a warning.
    """
    started = time.perf_counter()
    language = normalise_language(language)
    if index_type not in INDEX_TYPES:
        raise RagloraError(f"unknown index_type {index_type!r} (use one of: {', '.join(INDEX_TYPES)})")
    for name, value in (("batch_size", batch_size), ("ivf_nlist", ivf_nlist), ("hnsw_m", hnsw_m)):
        if value <= 0:
            raise RagloraError(f"{name} must be positive, got {value}")
    out_dir = Path(os.path.abspath(out_dir))  # normalise "ix/", "a/../ix" without following symlinks
    if not out_dir.name:
        raise RagloraError(f"index output folder must be a named folder, got {out_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise RagloraError(f"index output path is a file, not a folder: {out_dir}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only or full file system
        raise IndexWriteError(f"cannot create the index folder {out_dir.parent}: {exc.strerror or exc}") from exc

    with _build_lock(out_dir):
        _recover(out_dir)
        _check_replaceable(out_dir)
        docs, warnings = load_documents(doc_paths, faq_include_question=faq_include_question)
        if language_warning(language):
            warnings.append(language_warning(language))
        chunks = chunk_documents(docs, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
        settings = {
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
            "faq_include_question": faq_include_question,
        }
        old = _compatible_index(out_dir, embedder, settings, warnings)
        previous = {} if old is None else {c.content_hash: old.vectors[i] for i, c in enumerate(old.chunks)}

        # Embed each distinct new text once; everything already in the previous index is reused.
        to_embed = list(dict.fromkeys(c.content_hash for c in chunks if c.content_hash not in previous))
        texts = {c.content_hash: c.text for c in chunks}
        if to_embed:
            fresh = embedder.encode([texts[h] for h in to_embed], batch_size=batch_size, show_progress=show_progress)
            fresh = np.asarray(fresh, dtype=np.float32)
            if fresh.shape != (len(to_embed), embedder.dimension):
                raise RagloraError(
                    f"embedder {embedder.name!r} returned shape {fresh.shape}, "
                    f"expected ({len(to_embed)}, {embedder.dimension})"
                )
            previous_or_new = {**previous, **dict(zip(to_embed, normalise(fresh), strict=True))}
        else:
            previous_or_new = previous
        dim = embedder.dimension
        vectors = np.stack([previous_or_new[c.content_hash] for c in chunks]).astype(np.float32)
        vectors = vectors.reshape(len(chunks), dim)
        used = {c.content_hash for c in chunks}
        removed = sum(1 for h in previous if h not in used)
        embedded = sum(1 for c in chunks if c.content_hash not in previous)

        built_type, note = effective_index_type(len(chunks), index_type, ivf_nlist)
        if note:
            warnings.append(note)
        same_index = {"index_type_requested": index_type, "ivf_nlist": ivf_nlist, "hnsw_m": hnsw_m}
        same_language = old is not None and normalise_language(old.manifest.get("language")) == language
        unchanged = (
            same_language
            and all(old.manifest.get(key) == value for key, value in same_index.items())
            and [c.to_dict() for c in old.chunks] == [c.to_dict() for c in chunks]
        )
        if not unchanged:  # an unchanged corpus leaves the folder untouched (stable manifest digest)
            faiss_index = make_faiss_index(vectors, built_type, ivf_nlist=ivf_nlist, hnsw_m=hnsw_m)
            manifest = _manifest(docs, chunks, embedder, settings, index_type, built_type, ivf_nlist, hnsw_m)
            manifest["language"] = language
            _write_atomically(out_dir, manifest, chunks, vectors, faiss_index)

    return BuildReport(
        n_documents=len(docs),
        n_chunks=len(chunks),
        embedded=embedded,
        reused=len(chunks) - embedded,
        removed=removed,
        warnings=warnings,
        seconds=time.perf_counter() - started,
        index_type=built_type,
    )


def effective_index_type(n_vectors: int, index_type: str, ivf_nlist: int) -> tuple[str, str]:
    """IVF cannot train fewer vectors than lists: fall back to flat, with a warning. Returns (type, warning or "")."""
    if index_type == "ivf" and n_vectors < ivf_nlist:
        return "flat", (
            f"index_type ivf needs at least ivf_nlist={ivf_nlist} vectors to train, got {n_vectors}: built a flat index"
        )
    return index_type, ""


def make_faiss_index(vectors: np.ndarray, index_type: str, *, ivf_nlist: int = 256, hnsw_m: int = 32):
    """Inner-product faiss index over unit vectors (= cosine); `index_type` from effective_index_type."""
    import faiss

    n, dim = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, ivf_nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(IVF_NPROBE, ivf_nlist)
    if n:
        index.add(vectors)
    return index


def _manifest(docs, chunks, embedder, settings, requested_type, built_type, ivf_nlist, hnsw_m) -> dict:
    per_doc: list[dict] = []
    by_doc: dict[tuple[str, str], list[str]] = {}
    for c in chunks:
        by_doc.setdefault((c.source, c.doc_hash), []).append(c.chunk_id)
    seen: set[tuple[str, str]] = set()
    for c in chunks:
        key = (c.source, c.doc_hash)
        if key not in seen:
            seen.add(key)
            per_doc.append({"source": c.source, "title": c.title, "doc_hash": c.doc_hash, "chunk_ids": by_doc[key]})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedder": {"name": embedder.name, "dimension": int(embedder.dimension), "normalised": True},
        "chunking": settings,
        "index_type": built_type,
        "index_type_requested": requested_type,
        "ivf_nlist": ivf_nlist,
        "hnsw_m": hnsw_m,
        "metric": "inner_product",
        "counts": {"documents": len(docs), "chunks": len(chunks)},
        "versions": {pkg: _version(pkg) for pkg in ("faiss-cpu", "sentence-transformers", "bm25s", "numpy")},
        "documents": per_doc,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _compatible_index(out_dir: Path, embedder: Embedder, settings: dict, warnings: list[str]) -> Index | None:
    """The existing index if its vectors can be reused (same embedder and chunking); None means a full rebuild."""
    if not (out_dir / MANIFEST).exists():
        return None
    try:
        old = _load_index(out_dir, None, with_bm25=False)
    except RagloraError as exc:
        warnings.append(f"existing index not reusable, rebuilding from scratch: {exc}")
        return None
    emb, chunking = old.manifest["embedder"], old.manifest.get("chunking")
    if emb.get("name") != embedder.name or emb.get("dimension") != embedder.dimension:
        warnings.append(
            f"existing index was built with embedder {emb.get('name')!r} (dimension {emb.get('dimension')}), "
            f"now {embedder.name!r} (dimension {embedder.dimension}): rebuilding from scratch"
        )
        return None
    if chunking != settings:
        warnings.append(f"chunking settings changed from {chunking} to {settings}: rebuilding from scratch")
        return None
    return old


# ------------------------------------------------------------------------------------- atomic writing


def _temp_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"


def _backup_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.old"


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """Serialise builds into the same folder (POSIX advisory lock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    try:
        handle = open(lock_path, "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise IndexWriteError(f"cannot write the index lock file {lock_path}: {exc.strerror or exc}") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recover(out_dir: Path) -> None:
    """Undo what a crashed build left: restore the kept previous index, delete dead builds' temp folders."""
    backup = _backup_dir(out_dir)
    if backup.exists():
        if out_dir.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            _rename(backup, out_dir)
            _fsync_dir(out_dir.parent)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an index (e.g. --out data), which the swap would delete."""
    if not out_dir.is_dir():
        return
    entries = {p.name for p in out_dir.iterdir()}
    if not entries or entries <= set(INDEX_FILES):
        return
    try:
        if json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT:
            return
    except (OSError, ValueError, AttributeError):
        pass
    raise RagloraError(f"refusing to overwrite {out_dir}: it exists and is not a raglora index (no valid {MANIFEST})")


def _write_atomically(out_dir: Path, manifest: dict, chunks: list[Chunk], vectors: np.ndarray, faiss_index) -> None:
    tmp = _temp_dir(out_dir)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, manifest, chunks, vectors, faiss_index)
        _swap_into_place(tmp, out_dir)
    except OSError as exc:  # disk full, read-only file system, ...: one clear line; the previous index is intact
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RagloraError):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise IndexWriteError(
            f"cannot write the index {out_dir}: {exc.strerror or exc}{where}; the previous index is unchanged"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(folder: Path, manifest: dict, chunks: list[Chunk], vectors: np.ndarray, faiss_index) -> None:
    import faiss

    with open(folder / CHUNKS, "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    with open(folder / VECTORS, "wb") as f:
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    try:
        faiss.write_index(faiss_index, str(folder / FAISS))
    except RuntimeError as exc:  # faiss reports a failed write (e.g. no space left) as a RuntimeError
        detail = (str(exc).strip().splitlines() or ["write failed"])[-1]
        raise OSError(errno.EIO, f"faiss could not write the file: {detail}", str(folder / FAISS)) from exc
    _fsync_file(folder / FAISS)
    manifest = {**manifest, "files": {name: _file_digest(folder / name) for name in (CHUNKS, VECTORS, FAISS)}}
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """out_dir → .old, tmp → out_dir, drop .old. Between the renames, load_index falls back to .old."""
    backup = _backup_dir(out_dir)
    if backup.exists():
        shutil.rmtree(backup)
    if out_dir.exists():
        _rename(out_dir, backup)
    _rename(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load


def load_index(index_dir: str | Path, embedder: Embedder | None = None) -> Index:
    """Load and verify an index folder. With `embedder`, it must be the one the index was built with."""
    return _load_index(index_dir, embedder, with_bm25=True)


def _load_index(index_dir: str | Path, embedder: Embedder | None, *, with_bm25: bool) -> Index:
    import faiss

    path = Path(index_dir)
    if not path.exists() and (_backup_dir(path) / MANIFEST).exists():
        path = _backup_dir(path)  # a build crashed between its two renames; this is the previous index
    if not path.is_dir():
        raise RagloraError(f"no index at {index_dir}: build it with `raglora index`")
    manifest = _read_manifest(path / MANIFEST)
    emb = manifest["embedder"]
    if embedder is not None and (emb["name"] != embedder.name or emb["dimension"] != embedder.dimension):
        raise RagloraError(
            f"index {index_dir} was built with embedder {emb['name']!r} (dimension {emb['dimension']}) "
            f"but the loaded embedder is {embedder.name!r} (dimension {embedder.dimension}): "
            "rebuild the index or configure the embedder it was built with"
        )
    for name in (CHUNKS, VECTORS, FAISS):
        _verify_file(path / name, manifest.get("files", {}).get(name))
    chunks = _read_chunks(path / CHUNKS)
    n, dim = len(chunks), int(emb["dimension"])
    if manifest["counts"]["chunks"] != n:
        raise RagloraError(f"{path / CHUNKS} has {n} chunks but {path / MANIFEST} says {manifest['counts']['chunks']}")
    try:
        vectors = np.load(path / VECTORS, allow_pickle=False)
    except Exception as exc:
        raise RagloraError(f"corrupt index file {path / VECTORS}: {type(exc).__name__}: {exc}") from exc
    if vectors.dtype != np.float32 or vectors.shape != (n, dim):
        raise RagloraError(
            f"corrupt index file {path / VECTORS}: {vectors.dtype} {vectors.shape}, "
            f"expected float32 ({n}, {dim}) to match {CHUNKS}"
        )
    try:
        faiss_index = faiss.read_index(str(path / FAISS))
    except Exception as exc:
        raise RagloraError(
            f"corrupt index file {path / FAISS}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    if faiss_index.ntotal != n or faiss_index.d != dim:
        raise RagloraError(
            f"corrupt index file {path / FAISS}: {faiss_index.ntotal} vectors of dimension {faiss_index.d}, "
            f"expected {n} of dimension {dim}"
        )
    _tune_search(faiss_index)
    language = normalise_language(manifest.get("language"))
    bm25 = build_bm25([c.text for c in chunks], language) if chunks and with_bm25 else None
    return Index(path, manifest, chunks, vectors, faiss_index, bm25, embedder)


def _tune_search(faiss_index) -> None:
    import faiss

    if isinstance(faiss_index, faiss.IndexHNSW):
        faiss_index.hnsw.efSearch = max(faiss_index.hnsw.efSearch, HNSW_EF_SEARCH)
    elif isinstance(faiss_index, faiss.IndexIVF):
        faiss_index.nprobe = max(faiss_index.nprobe, min(IVF_NPROBE, faiss_index.nlist))


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise RagloraError(f"missing index file {path}: rebuild the index with `raglora index`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 and bad JSON
        raise RagloraError(f"corrupt index file {path}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RagloraError(f"corrupt index file {path}: not a raglora index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RagloraError(
            f"{path}: index format version {manifest.get('format_version')} is not supported "
            f"(this raglora reads version {FORMAT_VERSION}): rebuild the index"
        )
    try:
        emb = manifest["embedder"]
        if not isinstance(emb["name"], str) or not isinstance(emb["dimension"], int) or emb["dimension"] <= 0:
            raise TypeError("embedder name/dimension")
        if not isinstance(manifest["counts"]["chunks"], int):
            raise TypeError("counts.chunks")
        files = manifest.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("files")
    except (KeyError, TypeError) as exc:
        raise RagloraError(f"corrupt index file {path}: missing or invalid field {exc}") from exc
    return manifest


def _verify_file(path: Path, expected: dict | None) -> None:
    if not path.is_file():
        raise RagloraError(f"missing index file {path}: rebuild the index with `raglora index`")
    if not expected:
        return
    if path.stat().st_size != expected.get("bytes"):
        raise RagloraError(
            f"corrupt index file {path}: {path.stat().st_size} bytes, manifest says {expected.get('bytes')}"
        )
    if _file_digest(path)["sha256"] != expected.get("sha256"):
        raise RagloraError(f"corrupt index file {path}: checksum does not match the manifest")


def _read_chunks(path: Path) -> list[Chunk]:
    chunks: list[Chunk] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                chunk = Chunk.from_dict(json.loads(line))
                if not all(isinstance(getattr(chunk, k), str) for k in ("chunk_id", "text", "source", "title")):
                    raise TypeError("chunk_id, text, source and title must be strings")
                if not isinstance(chunk.metadata, dict):
                    raise TypeError("metadata must be an object")
                chunks.append(chunk)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise RagloraError(f"corrupt index file {path}: line {len(chunks) + 1}: {str(exc)[:200]}") from exc
    return chunks
