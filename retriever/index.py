"""Build, update and load the on-disk index folder.

Layout: manifest.json (settings, versions, per-document hashes, file sizes, checksums and mtimes),
chunks.jsonl, vectors.npy (float32, unit rows) and faiss.index. A loaded index memory-maps vectors.npy: the
ANN index finds candidates, their exact cosines come from these rows, and incremental builds reuse them;
nothing holds a second copy of every vector in RAM. BM25 is built from chunks.jsonl on the first keyword
query. Loading checks sizes and mtimes; a full SHA-256 check runs on demand (`raglora index --verify`), when
an mtime differs, and after a crash recovery.

`index.backend: qdrant` keeps only the manifest here and the data in Qdrant (retriever.vectordb); load_index
and build_index dispatch on it, so every caller works the same with either backend.

Writes are atomic: the new index is written and fsynced in a hidden temp sibling, then swapped in with
two renames. If a crash lands between them, `load_index` reads the kept previous index from the hidden
`.<name>.old` sibling and the next build puts it back, so some complete index is always loadable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from raglora.errors import RagloraError
from raglora.files import file_sha256
from retriever.chunk_store import open_chunks
from retriever.chunking import Chunk, chunk_documents
from retriever.documents import load_documents
from retriever.embedder import Embedder, normalise
from retriever.search import (
    DEFAULT_LANGUAGE,
    DEFAULTS,
    Hit,
    bm25_scores,
    build_bm25,
    field_values,
    language_warning,
    normalise_language,
    parse_filters,
    top_ids,
)
from retriever.search import search as run_search

FORMAT = "raglora-index"
FORMAT_VERSION = 1
MANIFEST, CHUNKS, VECTORS, FAISS = "manifest.json", "chunks.jsonl", "vectors.npy", "faiss.index"
INDEX_FILES = (MANIFEST, CHUNKS, VECTORS, FAISS)
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16
#: index_type auto: exact below this many chunks, IVF up to AUTO_PQ_FROM, IVF-PQ from there.
AUTO_ANN_FROM = 50_000
AUTO_PQ_FROM = 5_000_000
#: k-means wants about 39 training points per centroid (faiss warns below); PQ has 256 centroids per code.
TRAIN_PER_CENTROID = 39
PQ_CENTROIDS = 256
#: a filter allowing at most this many chunks is answered exactly over their vectors, not through the ANN index
#: (IVF visits only `nprobe` lists, which can hold fewer than k allowed chunks).
EXACT_FILTERED_MAX = 20_000
#: IVF-PQ proposes this many times the candidates for exact re-ranking (faiss IndexRefine's k_factor)
PQ_REFINE = 8
#: candidate rows up to this many are read with pread, more through the memory map (see Index.rows)
PREAD_ROWS_MAX = 4096


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
    """A loaded FAISS index: chunks, their memory-mapped vectors, the faiss index, lazy BM25 and the embedder.

    It is the FAISS store of the search protocol (retriever.search.search): rankings by position, filters and
    exclusions applied before each top-k cut, and exact cosines for every candidate.
    """

    def __init__(self, path: Path, manifest: dict, chunks: Sequence[Chunk], vectors: np.ndarray, faiss_index, embedder):
        self.path = path
        self.manifest = manifest
        self.chunks = chunks
        self.vectors = vectors
        self.faiss_index = faiss_index
        self.embedder = embedder
        self._bm25 = None
        self._lock = threading.Lock()
        self._field_index: dict[str, dict[str, np.ndarray]] = {}
        self._positions: dict[str, int] | None = None
        self._last_keyword: tuple[str, np.ndarray] | None = None
        self._vector_file = open(vectors.filename, "rb") if isinstance(vectors, np.memmap) else None  # noqa: SIM115

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def language(self) -> str:
        """ISO 639-1 code of the documents (BM25 stemming and stop words); "en" for indexes built before it."""
        return normalise_language(self.manifest.get("language"))

    @property
    def index_type(self) -> str:
        return self.manifest.get("index_type", "flat")

    @property
    def bm25(self):
        """BM25 over the chunks' index text, built on first use (dense-only serving never pays for it)."""
        if self._bm25 is None and len(self.chunks):
            with self._lock:
                if self._bm25 is None:
                    self._bm25 = build_bm25([c.index_text for c in self.chunks], self.language)
        return self._bm25

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {len(self.chunks)} chunks, {self.index_type})"

    def chunk(self, key: int) -> Chunk:
        return self.chunks[key]

    # -- filters

    def _known_fields(self) -> Collection[str]:
        known = self.manifest.get("metadata_keys")
        if known is None:  # an index built before the manifest listed them
            known = self.manifest["metadata_keys"] = sorted({k for c in self.chunks for k in c.metadata})
        return known

    def _values_index(self, key: str) -> dict[str, np.ndarray]:
        """value -> positions of the chunks having it, built once per field (one pass over the chunks)."""
        if key not in self._field_index:
            found: dict[str, list[int]] = {}
            for i, c in enumerate(self.chunks):
                for value in field_values(c, key):
                    found.setdefault(value, []).append(i)
            self._field_index[key] = {v: np.asarray(ids, dtype=np.int64) for v, ids in found.items()}
        return self._field_index[key]

    def allowed(self, filters: dict | None, exclude: Collection[str] = ()) -> np.ndarray | None:
        """Sorted positions a query may return; None when nothing is filtered or excluded."""
        parsed = parse_filters(filters, self._known_fields())
        if not parsed and not exclude:
            return None
        mask = np.ones(len(self), dtype=bool)
        for key, values in parsed.items():
            index = self._values_index(key)
            matching = np.zeros(len(self), dtype=bool)
            for value in values:
                matching[index.get(value, np.empty(0, dtype=np.int64))] = True
            mask &= matching
        if exclude:
            if self._positions is None:
                self._positions = {c.chunk_id: i for i, c in enumerate(self.chunks)}
            drop = [self._positions[c] for c in exclude if c in self._positions]
            mask[drop] = False
        return np.flatnonzero(mask)

    # -- dense

    def check_search_settings(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """nprobe must lie in 1..nlist of an IVF index; ef_search must be positive. Other index types ignore them."""
        import faiss

        if nprobe is not None and isinstance(self.faiss_index, faiss.IndexIVF):
            nlist = self.faiss_index.nlist
            if not 1 <= nprobe <= nlist:
                raise RagloraError(
                    f"retrieval.nprobe {nprobe} is out of range for this index: 1..{nlist} (its ivf_nlist)"
                )
        if ef_search is not None and ef_search < 1:
            raise RagloraError(f"retrieval.ef_search must be at least 1, got {ef_search}")

    def _search_params(self, nprobe: int | None, ef_search: int | None, allowed: np.ndarray | None):
        import faiss

        self.check_search_settings(nprobe, ef_search)
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed.astype(np.int64))
        if isinstance(self.faiss_index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.faiss_index.nprobe)
        elif isinstance(self.faiss_index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=ef_search or self.faiss_index.hnsw.efSearch)
        elif selector is None:
            return None, None
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params, selector  # the selector must outlive the search call

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of `ids` (sorted). A few rows are read with pread: through the memory map each random
        row pulls ~1.5 MB of readahead into this process's resident pages, which over many queries maps the whole
        file; read this way they stay in the (reclaimable) page cache."""
        if len(ids) > PREAD_ROWS_MAX or not isinstance(self.vectors, np.memmap):
            return np.asarray(self.vectors[ids], dtype=np.float32)
        dim = self.vectors.shape[1]
        size, fd, base = 4 * dim, self._vector_file.fileno(), self.vectors.offset
        data = b"".join(os.pread(fd, size, base + int(i) * size) for i in ids)
        return np.frombuffer(data, dtype=np.float32).reshape(len(ids), dim)

    def _exact(self, qvec: np.ndarray, ids: np.ndarray, depth: int) -> list[tuple[int, float]]:
        """Exact cosines of `ids` from the stored rows, best first (ties by position)."""
        if len(ids) == 0:
            return []
        ids = np.unique(np.asarray(ids, dtype=np.int64))  # sorted: sequential reads
        scores = self.rows(ids) @ qvec
        order = np.argsort(-scores, kind="stable")[:depth]
        return [(int(ids[i]), float(scores[i])) for i in order]

    def _check_query(self, qvec: np.ndarray) -> None:
        if qvec.shape != (self.faiss_index.d,):
            raise RagloraError(
                f"query vector has shape {qvec.shape}, this index holds vectors of dimension {self.faiss_index.d}"
            )

    def dense_ranking(
        self,
        qvec: np.ndarray,
        depth: int,
        *,
        filters: dict | None = None,
        exclude: Collection[str] = (),
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> list[tuple[int, float]]:
        """The ANN index proposes candidates (restricted by an ID selector when filtered); stored rows rank them
        exactly. A filter allowing few chunks is answered exactly over just those."""
        self._check_query(qvec)
        allowed = self.allowed(filters, exclude)
        if allowed is not None and (len(allowed) <= EXACT_FILTERED_MAX or self.index_type == "flat"):
            self.check_search_settings(nprobe, ef_search)
            return self._exact(qvec, allowed, depth)
        params, _selector = self._search_params(nprobe, ef_search, allowed)
        # PQ codes rank only roughly: take PQ_REFINE times the candidates and let the stored rows re-rank them.
        refine = PQ_REFINE if self.index_type == "ivfpq" else 1
        want = min(depth * refine, len(self) if allowed is None else len(allowed))
        _, ids = self.faiss_index.search(qvec[None, :], want, params=params)
        return self._exact(qvec, ids[0][ids[0] >= 0], depth)

    def dense_scores(self, qvec: np.ndarray, keys: list[int]) -> list[float]:
        return (self.rows(np.asarray(keys, dtype=np.int64)) @ qvec).tolist()

    # -- keyword

    def _keyword_scores_all(self, query: str) -> np.ndarray:
        last = self._last_keyword  # one query's scores serve its ranking and its fused hits' scores
        if last is not None and last[0] == query:
            return last[1]
        scores = bm25_scores(self.bm25, query, len(self), self.language)
        self._last_keyword = (query, scores)
        return scores

    def keyword_ranking(
        self, query: str, depth: int, *, filters: dict | None = None, exclude: Collection[str] = ()
    ) -> list[tuple[int, float]]:
        allowed = self.allowed(filters, exclude)
        mask = None
        if allowed is not None:
            mask = np.zeros(len(self), dtype=bool)
            mask[allowed] = True
        scores = self._keyword_scores_all(query)
        return [(i, float(scores[i])) for i in top_ids(scores, depth, mask, positive_only=True)]

    def keyword_scores(self, query: str, keys: list[int]) -> list[float]:
        scores = self._keyword_scores_all(query)
        return [float(scores[i]) for i in keys]

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
        nprobe: int | None = DEFAULTS.nprobe,
        ef_search: int | None = DEFAULTS.ef_search,
        query_vector: np.ndarray | None = None,
        reranker=None,
        rerank_depth: int = DEFAULTS.rerank_depth,
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
            nprobe=nprobe,
            ef_search=ef_search,
            query_vector=query_vector,
            reranker=reranker,
            rerank_depth=rerank_depth,
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
    index_type: str = "auto",
    batch_size: int = 64,
    ivf_nlist: int | None = None,
    pq_m: int | None = None,
    hnsw_m: int = 32,
    show_progress: bool = True,
    language: str = DEFAULT_LANGUAGE,
    backend: str = "faiss",
    qdrant=None,
    add_questions: Callable[[list[Chunk], dict[str, list[str]]], None] | None = None,
) -> BuildReport:
    """Index `doc_paths` into `out_dir`, reusing vectors of unchanged chunks from a compatible existing index.

    `language` (ISO 639-1, the `index.language` config) is recorded in the manifest; the loaded index analyses
    documents and queries for BM25 in it. A language without a stemmer is indexed unstemmed, with a warning.
    `add_questions(chunks, previous)` fills each chunk's hypothetical questions (retriever.questions); `previous`
    maps content hashes to the existing index's questions so they are not generated again.
    `backend="qdrant"` writes the chunks to Qdrant (`qdrant`: a QdrantConfig) instead of a FAISS folder.
    """
    started = time.perf_counter()
    language = normalise_language(language)
    if index_type not in INDEX_TYPES:
        raise RagloraError(f"unknown index_type {index_type!r} (use one of: {', '.join(INDEX_TYPES)})")
    if backend not in ("faiss", "qdrant"):
        raise RagloraError(f"unknown index backend {backend!r} (use faiss or qdrant)")
    for name, value in (("batch_size", batch_size), ("ivf_nlist", ivf_nlist), ("pq_m", pq_m), ("hnsw_m", hnsw_m)):
        if value is not None and value <= 0:
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
        recovered = _recover(out_dir)
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
        if backend == "qdrant":
            from retriever import vectordb

            if add_questions is not None:
                add_questions(chunks, vectordb.previous_questions(out_dir, qdrant))
            embedded, removed = vectordb.build_collection(
                out_dir,
                docs,
                chunks,
                embedder,
                qdrant,
                settings=settings,
                language=language,
                batch_size=batch_size,
                show_progress=show_progress,
                warnings=warnings,
            )
        else:
            layout = choose_layout(len(chunks), embedder.dimension, index_type, ivf_nlist, pq_m)  # refuse before work
            warnings.extend(layout.warnings)
            embedded, removed = _build_faiss(
                out_dir,
                docs,
                chunks,
                embedder,
                layout,
                settings=settings,
                index_settings={
                    "index_type_requested": index_type,
                    "ivf_nlist": ivf_nlist,
                    "pq_m": pq_m,
                    "hnsw_m": hnsw_m,
                },
                language=language,
                warnings=warnings,
                verify=recovered,
                add_questions=add_questions,
                batch_size=batch_size,
                show_progress=show_progress,
            )
    return BuildReport(
        n_documents=len(docs),
        n_chunks=len(chunks),
        embedded=embedded,
        reused=len(chunks) - embedded,
        removed=removed,
        warnings=warnings,
        seconds=time.perf_counter() - started,
        index_type="qdrant" if backend == "qdrant" else layout.index_type,
    )


def _build_faiss(
    out_dir: Path,
    docs,
    chunks: list[Chunk],
    embedder: Embedder,
    layout: Layout,
    *,
    settings: dict,
    index_settings: dict,
    language: str,
    warnings: list[str],
    verify: bool,
    add_questions,
    batch_size: int,
    show_progress: bool,
) -> tuple[int, int]:
    """The FAISS half of build_index: reuse vectors, embed the rest, write atomically. Returns (embedded, removed)."""
    old = _compatible_index(out_dir, embedder, settings, warnings, verify=verify)
    wanted = getattr(add_questions, "settings", None)
    if add_questions is not None:  # questions written another way (mode, count, prompt, model) are not reused
        same = old is not None and old.manifest.get("doc_questions") == wanted
        add_questions(chunks, {c.content_hash: c.questions for c in old.chunks} if same else {})
    previous = {} if old is None else {c.vector_key: i for i, c in enumerate(old.chunks)}

    # Embed each distinct new text once; everything already in the previous index is reused.
    to_embed = list(dict.fromkeys(c.vector_key for c in chunks if c.vector_key not in previous))
    texts = {c.vector_key: c.index_text for c in chunks}
    fresh: dict[str, np.ndarray] = {}
    if to_embed:
        encoded = embedder.encode([texts[h] for h in to_embed], batch_size=batch_size, show_progress=show_progress)
        encoded = np.asarray(encoded, dtype=np.float32)
        if encoded.shape != (len(to_embed), embedder.dimension):
            raise RagloraError(
                f"embedder {embedder.name!r} returned shape {encoded.shape}, "
                f"expected ({len(to_embed)}, {embedder.dimension})"
            )
        fresh = dict(zip(to_embed, normalise(encoded), strict=True))
    dim = embedder.dimension
    vectors = np.empty((len(chunks), dim), dtype=np.float32)
    for i, c in enumerate(chunks):
        vectors[i] = fresh[c.vector_key] if c.vector_key in fresh else old.vectors[previous[c.vector_key]]
    used = {c.vector_key for c in chunks}
    removed = sum(1 for h in previous if h not in used)
    embedded = sum(1 for c in chunks if c.vector_key not in previous)

    same_language = old is not None and normalise_language(old.manifest.get("language")) == language
    unchanged = (
        same_language
        and all(old.manifest.get(key) == value for key, value in index_settings.items())
        and old.manifest.get("doc_questions") == wanted
        and [c.to_dict() for c in old.chunks] == [c.to_dict() for c in chunks]
    )
    if not unchanged:  # an unchanged corpus leaves the folder untouched (stable manifest digest)
        manifest = {**index_manifest(docs, chunks, embedder.name, dim, settings, language), "doc_questions": wanted}
        _write_index(out_dir, manifest, chunks, vectors, layout, **index_settings)

    return embedded, removed


def build_from_vectors(
    out_dir: str | Path,
    chunks: list[Chunk],
    vectors: np.ndarray,
    embedder_name: str,
    *,
    index_type: str = "auto",
    ivf_nlist: int | None = None,
    pq_m: int | None = None,
    hnsw_m: int = 32,
    language: str = DEFAULT_LANGUAGE,
) -> BuildReport:
    """Write a complete index folder from chunks and their precomputed unit vectors (benchmarks, imports)."""
    started = time.perf_counter()
    if index_type not in INDEX_TYPES:
        raise RagloraError(f"unknown index_type {index_type!r} (use one of: {', '.join(INDEX_TYPES)})")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(chunks):
        raise RagloraError(f"vectors have shape {vectors.shape}, expected ({len(chunks)}, dimension)")
    out_dir = Path(os.path.abspath(out_dir))
    layout = choose_layout(len(chunks), vectors.shape[1], index_type, ivf_nlist, pq_m)
    manifest = index_manifest([], chunks, embedder_name, vectors.shape[1], {}, normalise_language(language))
    with _build_lock(out_dir):
        _recover(out_dir)
        _check_replaceable(out_dir)
        _write_index(out_dir, manifest, chunks, vectors, layout, index_type_requested=index_type,
                     ivf_nlist=ivf_nlist, pq_m=pq_m, hnsw_m=hnsw_m)  # fmt: skip
    return BuildReport(
        n_documents=0,
        n_chunks=len(chunks),
        embedded=0,
        reused=len(chunks),
        removed=0,
        warnings=layout.warnings,
        seconds=time.perf_counter() - started,
        index_type=layout.index_type,
    )


def _write_index(out_dir, manifest, chunks, vectors, layout, *, index_type_requested, ivf_nlist, pq_m, hnsw_m) -> None:
    faiss_index = make_faiss_index(vectors, layout, hnsw_m=hnsw_m)
    manifest = {
        **manifest,
        "backend": "faiss",
        "index_type": layout.index_type,
        "index_type_requested": index_type_requested,
        "ivf_nlist": ivf_nlist,
        "pq_m": pq_m,
        "hnsw_m": hnsw_m,
        "layout": {"nlist": layout.nlist, "pq_m": layout.pq_m},
        "metric": "inner_product",
    }
    _write_atomically(out_dir, manifest, chunks, vectors, faiss_index)


@dataclass
class Layout:
    """The faiss index to build: its type, IVF list count and PQ bytes per vector (0 where unused)."""

    index_type: str
    nlist: int = 0
    pq_m: int = 0
    warnings: list[str] = field(default_factory=list)


def auto_nlist(n: int) -> int:
    """About 4 * sqrt(n) lists (faiss's guideline is 4-16 sqrt(n)), each with enough points to train."""
    return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_CENTROID))


def auto_pq_m(dim: int) -> int:
    """The largest divisor of `dim` not above dim / 8: 48 bytes a vector for 384-d, 96 for 768-d."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def choose_layout(n: int, dim: int, requested: str, ivf_nlist: int | None, pq_m: int | None) -> Layout:
    """Resolve `auto`, list counts and PQ size for `n` vectors. IVF with fewer vectors than lists falls back to
    flat (with a warning); IVF-PQ without enough vectors to train its codebooks is refused."""
    kind = requested
    if kind == "auto":
        kind = "flat" if n < AUTO_ANN_FROM else "ivf" if n < AUTO_PQ_FROM else "ivfpq"
    if kind in ("flat", "hnsw"):
        return Layout(kind)
    nlist = ivf_nlist or auto_nlist(n)
    if kind == "ivf":
        if n < nlist:
            return Layout("flat", warnings=[
                f"index_type ivf needs at least ivf_nlist={nlist} vectors to train, got {n}: built a flat index"
            ])  # fmt: skip
        return Layout("ivf", nlist=nlist)
    m = pq_m or auto_pq_m(dim)
    if dim % m:
        raise RagloraError(f"index.pq_m {m} must divide the embedding dimension {dim}")
    needed = max(nlist, TRAIN_PER_CENTROID * PQ_CENTROIDS)
    if n < needed:
        raise RagloraError(
            f"index_type ivfpq needs at least {needed:,} vectors to train (its {nlist} lists and "
            f"{PQ_CENTROIDS}-centroid codebooks), got {n:,}: use index_type auto, flat or ivf"
        )
    return Layout("ivfpq", nlist=nlist, pq_m=m)


def make_faiss_index(vectors: np.ndarray, layout: Layout, *, hnsw_m: int = 32, seed: int = 0):
    """Inner-product faiss index over unit vectors (= cosine). IVF trains on a sample of at most 64 points a list."""
    import faiss

    n, dim = vectors.shape
    if layout.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif layout.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if layout.index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, layout.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, layout.nlist, layout.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        sample = min(n, max(64 * layout.nlist, TRAIN_PER_CENTROID * PQ_CENTROIDS * 4))
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        index.nprobe = min(IVF_NPROBE, layout.nlist)
    for start in range(0, n, 65536):  # bounded temporary copies of a memory-mapped source
        index.add(np.ascontiguousarray(vectors[start : start + 65536], dtype=np.float32))
    return index


def index_manifest(docs, chunks, embedder_name: str, dimension: int, settings: dict, language: str) -> dict:
    """The manifest fields every backend writes: format, embedder, chunking, language, counts, documents."""
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
        "embedder": {"name": embedder_name, "dimension": int(dimension), "normalised": True},
        "chunking": settings,
        "language": language,
        "counts": {"documents": len(docs), "chunks": len(chunks)},
        "metadata_keys": sorted({k for c in chunks for k in c.metadata}),
        "versions": {pkg: package_version(pkg) for pkg in ("faiss-cpu", "sentence-transformers", "bm25s", "numpy")},
        "documents": per_doc,
    }


def package_version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _compatible_index(
    out_dir: Path, embedder: Embedder, settings: dict, warnings: list[str], *, verify: bool = False
) -> Index | None:
    """The existing index if its vectors can be reused (same embedder and chunking); None means a full rebuild."""
    if not (out_dir / MANIFEST).exists():
        return None
    try:
        if _read_manifest(out_dir / MANIFEST).get("backend", "faiss") != "faiss":
            warnings.append("the existing index uses another backend: building a faiss index from scratch")
            return None
        old = load_index(out_dir, None, verify=verify)
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


def _recover(out_dir: Path) -> bool:
    """Undo what a crashed build left: restore the kept previous index, delete dead builds' temp folders.
    True when a previous index was restored (its files then get a full checksum check before reuse)."""
    backup = _backup_dir(out_dir)
    restored = False
    if backup.exists():
        if out_dir.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            _rename(backup, out_dir)
            _fsync_dir(out_dir.parent)
            restored = True
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    return restored


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
    stat = path.stat()
    return {"bytes": stat.st_size, "sha256": file_sha256(path), "mtime_ns": stat.st_mtime_ns}


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


def load_index(index_dir: str | Path, embedder: Embedder | None = None, *, verify: bool = False):
    """Load an index folder (either backend). With `embedder`, it must be the one the index was built with.

    Files are checked by size and mtime; `verify` (and a differing mtime, and an index read from a crashed
    build's backup) checks every file's SHA-256 against the manifest too.
    """
    path = Path(index_dir)
    if not path.exists() and (_backup_dir(path) / MANIFEST).exists():
        path, verify = _backup_dir(path), True  # a build crashed between its two renames: the previous index
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
    if manifest.get("backend", "faiss") == "qdrant":
        from retriever import vectordb

        return vectordb.open_collection(path, manifest, embedder)
    return _load_faiss(path, manifest, embedder, verify=verify)


def _load_faiss(path: Path, manifest: dict, embedder: Embedder | None, *, verify: bool) -> Index:
    import faiss

    for name in (CHUNKS, VECTORS, FAISS):
        _verify_file(path / name, manifest.get("files", {}).get(name), full=verify)
    n, dim = manifest["counts"]["chunks"], int(manifest["embedder"]["dimension"])
    chunks = open_chunks(path / CHUNKS, n)
    try:
        vectors = np.load(path / VECTORS, mmap_mode="r", allow_pickle=False)
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
    return Index(path, manifest, chunks, vectors, faiss_index, embedder)


def verify_index(index_dir: str | Path) -> dict:
    """Full check of an index folder: every file's size and SHA-256, and that it loads. Returns its manifest."""
    return load_index(index_dir, verify=True).manifest


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


def _verify_file(path: Path, expected: dict | None, *, full: bool) -> None:
    """Size always; the SHA-256 when `full`, or when the mtime is not the one recorded (a copied or edited file)."""
    if not path.is_file():
        raise RagloraError(f"missing index file {path}: rebuild the index with `raglora index`")
    if not expected:
        return
    stat = path.stat()
    if stat.st_size != expected.get("bytes"):
        raise RagloraError(f"corrupt index file {path}: {stat.st_size} bytes, manifest says {expected.get('bytes')}")
    if not full and stat.st_mtime_ns == expected.get("mtime_ns"):
        return
    if file_sha256(path) != expected.get("sha256"):
        raise RagloraError(f"corrupt index file {path}: checksum does not match the manifest")
