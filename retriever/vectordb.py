"""The Qdrant backend (`index.backend: qdrant`): one collection per index, embedded or on a server, one code path.

Embedded (no `index.qdrant.url`): Qdrant's local mode stores the collection under `<index>/qdrant`. With a URL the
same calls go to a Qdrant server or cluster. Either way the index folder keeps only `manifest.json`.

Each chunk is one point: id = uuid5(chunk_id), payload = the chunk plus its `vector_key` (what its vector embeds)
and `filter_terms`, vectors "dense" (cosine) and "bm25" (sparse). Qdrant computes BM25's IDF itself
(`Modifier.IDF`); the term-frequency part is computed here with the project's tokenizer (stemming and stop words
of the index language), so keyword search matches the FAISS backend's BM25 without a second index.

Updates are in place and by content: unchanged points are not rewritten, a vector is reused from any point with
the same `vector_key`, only new texts are embedded, gone chunk ids are deleted last. A killed update leaves a
collection that mixes old and new points, every one complete and searchable; the next build finishes the job.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import sqlite3
import uuid
import zlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np

from raglora.errors import RagloraError
from raglora.files import atomic_write_text
from retriever.chunking import Chunk
from retriever.config import QdrantConfig
from retriever.embedder import Embedder, normalise
from retriever.search import CHUNK_FIELDS, field_values, normalise_language, tokenize

DENSE, SPARSE = "dense", "bm25"
STORAGE = "qdrant"  # embedded storage folder inside the index folder
MANIFEST = "manifest.json"
K1, B = 1.5, 0.75  # BM25 saturation and length normalisation: bm25s's defaults, so both backends score alike
AVGDL_DRIFT = 0.10  # re-weight every keyword vector when the mean chunk length moves by more than this
UPSERT_BATCH = 256
SCROLL_BATCH = 1024
EMBED_BATCH = 1024  # texts embedded per upsert round: a killed build keeps what it finished
POINT_NAMESPACE = uuid.UUID("9b0f7c1e-4d0a-5e7b-9a57-2f6c1d3e8a41")
TERM_SEP = "\x1f"  # between field and value in `filter_terms` (any field name or value may contain "=")


def point_id(chunk_id: str) -> str:
    """A chunk's point id: Qdrant ids are integers or UUIDs, chunk ids are free text."""
    return str(uuid.uuid5(POINT_NAMESPACE, chunk_id))


def term_id(token: str) -> int:
    """Stable 32-bit id of a token (Qdrant sparse indices are u32); the same in every process and version."""
    return zlib.crc32(token.encode("utf-8"))


def filter_terms(chunk: Chunk) -> list[str]:
    """Every filterable (field, value) as one keyword: filters compare strings, as the FAISS backend does."""
    fields = [*CHUNK_FIELDS, *(k for k in chunk.metadata if k not in CHUNK_FIELDS)]
    return [f"{f}{TERM_SEP}{v}" for f in fields for v in field_values(chunk, f)]


def term_counts(tokens: list[str]) -> dict[int, int]:
    """term id -> occurrences (two tokens whose ids collide count as one term)."""
    counts: dict[int, int] = {}
    for token in tokens:
        counts[term_id(token)] = counts.get(term_id(token), 0) + 1
    return counts


def keyword_vector(tokens: list[str], avgdl: float):
    """BM25's term-frequency part of a document, tf / (tf + k1·(1 − b + b·dl/avgdl)) (Lucene's, as bm25s); None if empty."""
    from qdrant_client import models

    counts = term_counts(tokens)
    if not counts:
        return None
    norm = K1 * (1 - B + B * len(tokens) / max(avgdl, 1e-9))
    ids = sorted(counts)
    return models.SparseVector(indices=ids, values=[counts[i] / (counts[i] + norm) for i in ids])


def query_keyword_vector(query: str, language: str):
    """Each query term weighted by its count: the score is Σ IDF·tf-part over the query's terms, as bm25s sums."""
    from qdrant_client import models

    counts = term_counts(tokenize([query], language)[0])
    ids = sorted(counts)
    return models.SparseVector(indices=ids, values=[float(counts[i]) for i in ids]) if ids else None


# ------------------------------------------------------------------------------------------ connection


def _where(location: dict) -> str:
    return location.get("url") or f"embedded storage {location['path']}"


def _call(where: str, fn, *args, **kwargs):
    """Run one client call; a server that is down, slow or refusing becomes one clear RagloraError."""
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    try:
        return fn(*args, **kwargs)
    except UnexpectedResponse as exc:
        detail = exc.content.decode("utf-8", "replace")[:200] if exc.content else exc.reason_phrase
        raise RagloraError(f"Qdrant at {where} answered HTTP {exc.status_code}: {detail}") from None
    except (ResponseHandlingException, httpx.HTTPError, OSError) as exc:
        reason = getattr(exc, "source", None) or exc
        kind = "timed out" if "timed out" in str(reason).lower() else str(reason)[:200] or type(reason).__name__
        raise RagloraError(f"cannot reach Qdrant at {where}: {kind}") from None


_EMBEDDED: dict[str, object] = {}  # storage folder -> its local-mode client in this process


def _embedded_client(path: str):
    """One local-mode client per storage folder and process: it holds the folder's lock and all its points."""
    from qdrant_client import QdrantClient

    if path not in _EMBEDDED:
        try:
            _EMBEDDED[path] = QdrantClient(path=path)
        except RuntimeError as exc:
            if "already accessed" not in str(exc):
                raise
            raise RagloraError(
                f"embedded Qdrant storage {path} is in use by another process; "
                "run a Qdrant server (index.qdrant.url) to share it"
            ) from None
        if len(_EMBEDDED) == 1:
            atexit.register(release_all)
    return _EMBEDDED[path]


def release(path: str | Path) -> None:
    """Close this process's client of an embedded storage folder, so another process may open it."""
    client = _EMBEDDED.pop(str(Path(os.path.abspath(path))), None)
    if client is not None:
        client.close()


def release_all() -> None:
    """Close every embedded client (at exit, before the interpreter tears down what their close needs)."""
    for path in list(_EMBEDDED):
        release(path)


def connect(location: dict, collection: str):
    """A client for `location` ({"url", "timeout_s", "api_key_env"} or {"path"}), checked to answer."""
    from qdrant_client import QdrantClient

    if location.get("url"):
        api_key = os.environ.get(location.get("api_key_env") or "") or None
        client = QdrantClient(
            url=location["url"], api_key=api_key, timeout=location.get("timeout_s"), check_compatibility=False
        )
    else:
        path = Path(location["path"])
        if path.exists() and not (path / "meta.json").exists() and any(path.iterdir()):
            raise RagloraError(f"{path} is not an embedded Qdrant storage folder")
        if not (path / "meta.json").exists():  # a folder deleted and recreated must not reuse a stale client
            release(path)
        client = _embedded_client(str(path))
    _call(_where(location), client.collection_exists, collection)
    return client


def _batched_commits(client, name: str) -> None:
    """Local mode commits (and fsyncs) its SQLite file once per point: 12 ms each, 20 minutes per 100k chunks.
    WAL with synchronous=NORMAL skips that fsync; a killed process loses nothing, a power cut at most the last
    points, never consistency. A no-op where the client's internals differ (a server, another version)."""
    try:
        connection = client._client.collections[name].storage.storage
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    except (AttributeError, KeyError, TypeError, sqlite3.Error):
        pass


def _location(out_dir: Path, cfg: QdrantConfig) -> dict:
    if cfg.url:
        return {"url": cfg.url, "api_key_env": cfg.api_key_env, "timeout_s": cfg.timeout_s}
    return {"path": str(out_dir / STORAGE)}


# -------------------------------------------------------------------------------------------- building


def build_collection(
    out_dir: str | Path,
    docs: list,
    chunks: list[Chunk],
    embedder: Embedder,
    qdrant_cfg: QdrantConfig | None,
    *,
    settings: dict,
    language: str,
    batch_size: int = 64,
    show_progress: bool = True,
    warnings: list[str] | None = None,
) -> tuple[int, int]:
    """Bring the index's Qdrant collection in line with `chunks`, then write `<out_dir>/manifest.json`.

    Returns (embedded, removed): chunks whose text had no vector yet, and points of chunks that are gone.
    A collection built with another embedder is refused, untouched.
    """
    from qdrant_client import models

    cfg = qdrant_cfg or QdrantConfig()
    warnings = [] if warnings is None else warnings
    language = normalise_language(language)
    out_dir = Path(os.path.abspath(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    location = _location(out_dir, cfg)
    where, name = _where(location), cfg.collection
    client = connect(location, name)
    call = functools.partial(_call, where)

    existing = _existing_points(client, name, where, embedder) if call(client.collection_exists, name) else None
    token_lists = tokenize([c.index_text for c in chunks], language) if chunks else []
    avgdl = float(np.mean([len(t) for t in token_lists])) if chunks else 1.0
    info = {"embedder": embedder.name, "dimension": int(embedder.dimension), "language": language}
    if existing is None:
        call(
            client.create_collection,
            name,
            vectors_config={DENSE: models.VectorParams(size=int(embedder.dimension), distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
            metadata={"raglora": {**info, "avgdl": avgdl}},
        )
        if location.get("url"):  # local mode has no payload indexes (it scans)
            for field in (*CHUNK_FIELDS, "filter_terms", "vector_key"):
                call(client.create_payload_index, name, field, models.PayloadSchemaType.KEYWORD)
        existing, reweight = {}, False
    else:
        old = call(client.get_collection, name).config.metadata["raglora"]
        drift = abs(avgdl - old["avgdl"]) / max(old["avgdl"], 1e-9)
        reweight = old.get("language") != language or drift > AVGDL_DRIFT
        if reweight:
            warnings.append(f"keyword vectors re-weighted (language {language}, mean chunk length {avgdl:.1f})")
        else:
            avgdl = float(old["avgdl"])  # keep the weights already written consistent with new ones
    if not location.get("url"):
        _batched_commits(client, name)

    by_key = {key: pid for pid, (key, _) in existing.items()}  # vector_key -> a point that holds its vector
    payloads = [{**c.to_dict(), "vector_key": c.vector_key, "filter_terms": filter_terms(c)} for c in chunks]
    todo = [
        i
        for i, (c, p) in enumerate(zip(chunks, payloads, strict=True))
        if reweight or existing.get(point_id(c.chunk_id), (None, None))[1] != _digest(p)
    ]
    embedded = sum(1 for i in todo if chunks[i].vector_key not in by_key)
    for start in range(0, len(todo), EMBED_BATCH):
        part = todo[start : start + EMBED_BATCH]
        vectors = _vectors_for(
            [chunks[i] for i in part], by_key, client, name, where, embedder, batch_size, show_progress
        )
        points = [
            models.PointStruct(
                id=point_id(chunks[i].chunk_id),
                vector={DENSE: vectors[chunks[i].vector_key].tolist(), **_sparse(token_lists[i], avgdl)},
                payload=payloads[i],
            )
            for i in part
        ]
        for b in range(0, len(points), UPSERT_BATCH):
            call(client.upsert, name, points=points[b : b + UPSERT_BATCH], wait=True)
    if reweight:
        call(client.update_collection, name, metadata={"raglora": {**info, "avgdl": avgdl}})

    keep = {point_id(c.chunk_id) for c in chunks}
    gone = [pid for pid in existing if pid not in keep]
    for b in range(0, len(gone), UPSERT_BATCH):
        call(client.delete, name, points_selector=models.PointIdsList(points=gone[b : b + UPSERT_BATCH]), wait=True)

    manifest = _common_manifest(docs, chunks, embedder, settings, language)
    stored = (
        {"url": cfg.url, "api_key_env": cfg.api_key_env, "timeout_s": cfg.timeout_s} if cfg.url else {"path": STORAGE}
    )
    manifest.update(
        backend="qdrant",
        qdrant={**stored, "collection": name},
        bm25={"avgdl": avgdl, "k1": K1, "b": B, "term_ids": "crc32"},
    )
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return embedded, len(gone)


def previous_questions(out_dir: str | Path, qdrant_cfg: QdrantConfig | None) -> dict[str, list[str]]:
    """content_hash -> hypothetical questions already in the index's collection, so a rebuild reuses them."""
    cfg = qdrant_cfg or QdrantConfig()
    location = _location(Path(os.path.abspath(out_dir)), cfg)
    if not location.get("url") and not (Path(location["path"]) / "meta.json").exists():
        return {}
    client, where = connect(location, cfg.collection), _where(location)
    if not _call(where, client.collection_exists, cfg.collection):
        return {}
    points = _scroll(client, cfg.collection, where, with_payload=["content_hash", "questions"])
    return {p.payload["content_hash"]: p.payload["questions"] for p in points if p.payload.get("questions")}


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _sparse(tokens: list[str], avgdl: float) -> dict:
    vector = keyword_vector(tokens, avgdl)
    return {} if vector is None else {SPARSE: vector}


def _check_embedder(info: dict | None, size: int, embedder: Embedder, name: str, where: str) -> None:
    """Refuse to mix vectors of two embedders in one collection."""
    old_name = (info or {}).get("embedder")
    if size != embedder.dimension or old_name != embedder.name:
        raise RagloraError(
            f"Qdrant collection {name!r} at {where} holds vectors of embedder {old_name!r} (dimension {size}), "
            f"not {embedder.name!r} (dimension {embedder.dimension}): delete the collection to rebuild it, "
            "or set index.qdrant.collection to another name"
        )


def _existing_points(client, name: str, where: str, embedder: Embedder) -> dict[str, tuple[str, str]]:
    """point id -> (vector_key, payload digest) of a collection this embedder may update (payloads only)."""
    config = _call(where, client.get_collection, name).config
    vectors = config.params.vectors
    if not isinstance(vectors, dict) or DENSE not in vectors or "raglora" not in (config.metadata or {}):
        raise RagloraError(f"Qdrant collection {name!r} at {where} was not built by raglora: use another collection")
    _check_embedder(config.metadata["raglora"], vectors[DENSE].size, embedder, name, where)
    return {str(p.id): (p.payload.get("vector_key"), _digest(p.payload)) for p in _scroll(client, name, where)}


def _scroll(client, name: str, where: str, with_payload: bool | list[str] = True) -> Iterator:
    offset = None
    while True:
        points, offset = _call(
            where,
            client.scroll,
            name,
            limit=SCROLL_BATCH,
            offset=offset,
            with_payload=with_payload,
            with_vectors=False,
        )
        yield from points
        if offset is None:
            return


def _vectors_for(chunks, by_key, client, name, where, embedder, batch_size, show_progress) -> dict[str, np.ndarray]:
    """vector_key -> unit vector: copied from a point that has it, else embedded (each distinct text once)."""
    keys = list(dict.fromkeys(c.vector_key for c in chunks))
    reused = [k for k in keys if k in by_key]
    out: dict[str, np.ndarray] = {}
    for b in range(0, len(reused), UPSERT_BATCH):
        part = reused[b : b + UPSERT_BATCH]
        got = _call(where, client.retrieve, name, ids=[by_key[k] for k in part], with_vectors=[DENSE])
        vector_of = {str(p.id): p.vector[DENSE] for p in got}
        out.update((k, np.asarray(vector_of[by_key[k]], dtype=np.float32)) for k in part)
    new = [k for k in keys if k not in by_key]
    if new:
        text_of = {c.vector_key: c.index_text for c in chunks}
        fresh = np.asarray(
            embedder.encode([text_of[k] for k in new], batch_size=batch_size, show_progress=show_progress),
            dtype=np.float32,
        )
        if fresh.shape != (len(new), embedder.dimension):
            raise RagloraError(
                f"embedder {embedder.name!r} returned shape {fresh.shape}, expected ({len(new)}, {embedder.dimension})"
            )
        out.update(zip(new, normalise(fresh), strict=True))
    return out


def _common_manifest(docs, chunks, embedder, settings, language) -> dict:
    from retriever.index import index_manifest, package_version

    manifest = index_manifest(docs, chunks, embedder.name, embedder.dimension, settings, language)
    manifest["versions"].pop("faiss-cpu", None)
    manifest["versions"]["qdrant-client"] = package_version("qdrant-client")
    return manifest


# ------------------------------------------------------------------------------------------------ store


def open_collection(path: str | Path, manifest: dict, embedder: Embedder | None) -> QdrantStore:
    """The store of a Qdrant-backed index folder (what `load_index` returns for `"backend": "qdrant"`)."""
    path = Path(os.path.abspath(path))
    stored = manifest.get("qdrant") or {}
    name = stored.get("collection")
    if not isinstance(name, str) or not (stored.get("url") or stored.get("path")):
        raise RagloraError(f"corrupt index file {path / MANIFEST}: missing or invalid field 'qdrant'")
    emb = manifest["embedder"]  # load_index has checked it against `embedder`
    if stored.get("url"):
        try:
            cfg = QdrantConfig(**{k: stored[k] for k in ("url", "api_key_env", "timeout_s") if k in stored})
        except ValueError as exc:  # pydantic's ValidationError
            raise RagloraError(f"corrupt index file {path / MANIFEST}: invalid 'qdrant' settings: {exc}") from None
        location = _location(path, cfg)  # the key itself is read from the environment, never stored
    else:
        location = {"path": str(path / stored["path"])}
        if not (path / stored["path"] / "meta.json").exists():
            raise RagloraError(f"missing embedded Qdrant storage {path / stored['path']}: rebuild the index")
    where = _where(location)
    client = connect(location, name)
    if not _call(where, client.collection_exists, name):
        raise RagloraError(f"Qdrant collection {name!r} at {where} does not exist: rebuild the index")
    config = _call(where, client.get_collection, name).config
    info = (config.metadata or {}).get("raglora") or {}
    vectors = config.params.vectors
    size = vectors[DENSE].size if isinstance(vectors, dict) and DENSE in vectors else None
    if info.get("embedder") != emb["name"] or size != emb["dimension"]:
        raise RagloraError(
            f"Qdrant collection {name!r} at {where} holds vectors of embedder {info.get('embedder')!r} "
            f"(dimension {size}) but {path / MANIFEST} says {emb['name']!r}: rebuild the index"
        )
    return QdrantStore(path, manifest, embedder, client, name, location)


class QdrantStore:
    """A Qdrant collection behind the search protocol of retriever.search; ranking keys are chunk ids."""

    def __init__(self, path: Path, manifest: dict, embedder, client, collection: str, location: dict):
        self.path = path
        self.manifest = manifest
        self.embedder = embedder
        self.client = client
        self.collection = collection
        self.location = location
        self.where = _where(location)
        self.language = normalise_language(manifest.get("language"))
        self._size = int(self._call(client.count, collection, exact=True).count)
        self._chunks: list[Chunk] | None = None
        self._seen: dict[str, Chunk] = {}  # chunks of recent hits, from the rankings' payloads

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"QdrantStore({str(self.path)!r}, collection {self.collection!r} at {self.where}, {self._size} chunks)"

    def _call(self, fn, *args, **kwargs):
        return _call(self.where, fn, *args, **kwargs)

    def close(self) -> None:
        """Release the collection: embedded storage is unlocked for other processes (and this process's other
        stores of the same folder stop working); a server connection is closed."""
        if self.location.get("path"):
            release(self.location["path"])
        else:
            self.client.close()

    @property
    def chunks(self) -> Sequence[Chunk]:
        """Every chunk, in the manifest's document order (built on first use: it reads the whole collection)."""
        if self._chunks is None:
            order = {
                cid: i for i, cid in enumerate(c for d in self.manifest.get("documents", []) for c in d["chunk_ids"])
            }
            chunks = [_chunk(p.payload) for p in _scroll(self.client, self.collection, self.where)]
            self._chunks = sorted(chunks, key=lambda c: order.get(c.chunk_id, len(order)))
        return self._chunks

    def chunk(self, key: str) -> Chunk:
        if key in self._seen:
            return self._seen[key]
        got = self._call(self.client.retrieve, self.collection, ids=[point_id(key)], with_payload=True)
        if not got:
            raise RagloraError(f"chunk {key!r} is not in Qdrant collection {self.collection!r}")
        return self._remember(got[0].payload)

    def _remember(self, payload: dict) -> Chunk:
        if len(self._seen) > 10_000:
            self._seen.clear()
        chunk = self._seen[payload["chunk_id"]] = _chunk(payload)
        return chunk

    def query_filter(self, filters: dict | None, exclude: Collection[str] = (), only: Sequence[str] = ()):
        """A Qdrant Filter for `filters` (field -> value or any of a list), `exclude` and `only` (chunk ids)."""
        from qdrant_client import models

        must: list = []
        known = set(CHUNK_FIELDS) | set(self.manifest.get("metadata_keys", []))
        for field, wanted in (filters or {}).items():
            values = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
            if not values:
                raise RagloraError(f"filter {field!r} has no values")
            if field not in known:
                raise RagloraError(f"unknown filter field {field!r}; this index has: {', '.join(sorted(known))}")
            terms = [f"{field}{TERM_SEP}{v}" for v in values]
            must.append(models.FieldCondition(key="filter_terms", match=models.MatchAny(any=terms)))
        if only:
            must.append(models.HasIdCondition(has_id=[point_id(k) for k in only]))
        must_not = [models.HasIdCondition(has_id=[point_id(k) for k in exclude])] if exclude else []
        return models.Filter(must=must, must_not=must_not) if must or must_not else None

    def _query(self, query, using: str, depth: int, query_filter, params=None) -> list[tuple[str, float]]:
        result = self._call(
            self.client.query_points,
            self.collection,
            query=query,
            using=using,
            limit=depth,
            query_filter=query_filter,
            search_params=params,
            with_payload=True,
        )
        return [(self._remember(p.payload).chunk_id, float(p.score)) for p in result.points]

    def dense_ranking(self, qvec, depth, *, filters=None, exclude=(), nprobe=None, ef_search=None):
        """Best chunks by cosine, filtered inside Qdrant before its top-depth cut. `nprobe` is FAISS's: ignored."""
        from qdrant_client import models

        # HNSW's efSearch on a server; local mode searches exactly and warns about any search_params
        params = models.SearchParams(hnsw_ef=ef_search) if ef_search and self.location.get("url") else None
        query_filter = self.query_filter(filters, exclude)
        return self._query(_unit(qvec).tolist(), DENSE, depth, query_filter, params)

    def dense_scores(self, qvec, keys: Sequence[str]) -> list[float]:
        got = self._call(self.client.retrieve, self.collection, ids=[point_id(k) for k in keys], with_vectors=[DENSE])
        vector_of = {str(p.id): np.asarray(p.vector[DENSE], dtype=np.float32) for p in got}
        q = _unit(qvec)
        return [float(vector_of[point_id(k)] @ q) if point_id(k) in vector_of else 0.0 for k in keys]

    def keyword_ranking(self, query: str, depth: int, *, filters=None, exclude=()) -> list[tuple[str, float]]:
        query_filter = self.query_filter(filters, exclude)  # validated even when the query has no terms
        sparse = query_keyword_vector(query, self.language)
        if sparse is None:
            return []
        return [(k, s) for k, s in self._query(sparse, SPARSE, depth, query_filter) if s > 0]

    def keyword_scores(self, query: str, keys: Sequence[str]) -> list[float]:
        sparse = query_keyword_vector(query, self.language)
        if sparse is None or not keys:
            return [0.0] * len(keys)
        score = dict(self._query(sparse, SPARSE, len(keys), self.query_filter(None, only=keys)))
        return [score.get(k, 0.0) for k in keys]

    def search(self, query: str, **kwargs):
        """Top-k chunks for `query`; see retriever.search.search."""
        from retriever.search import search

        return search(self, query, **kwargs)


def _unit(qvec) -> np.ndarray:
    q = np.asarray(qvec, dtype=np.float32).reshape(-1)
    return q / (np.linalg.norm(q) or 1.0)


def _chunk(payload: dict) -> Chunk:
    return Chunk.from_dict({k: v for k, v in payload.items() if k not in ("vector_key", "filter_terms")})
