"""Ranking: dense (faiss / exact), BM25 (bm25s) and their reciprocal rank fusion, with metadata filters.

Filters are applied before the top-k cut, so a filtered query returns matching chunks even when they
rank far below k in the unfiltered search.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from raglora.errors import RagloraError
from retriever.chunking import Chunk
from retriever.config import RetrievalConfig

log = logging.getLogger("raglora.search")

MODES = ("dense", "bm25", "hybrid")
#: The one source of the retrieval defaults (the `retrieval` config section); library calls use these too.
DEFAULTS = RetrievalConfig()
DEFAULT_LANGUAGE = "en"
#: ISO 639-1 code -> Snowball stemmer name (PyStemmer). A code not here gets no stemming, with a warning.
SNOWBALL = {
    "ar": "arabic",
    "ca": "catalan",
    "cs": "czech",
    "da": "danish",
    "de": "german",
    "el": "greek",
    "en": "english",
    "eo": "esperanto",
    "es": "spanish",
    "et": "estonian",
    "eu": "basque",
    "fa": "persian",
    "fi": "finnish",
    "fr": "french",
    "ga": "irish",
    "hi": "hindi",
    "hu": "hungarian",
    "hy": "armenian",
    "id": "indonesian",
    "it": "italian",
    "lt": "lithuanian",
    "nb": "norwegian",
    "ne": "nepali",
    "nl": "dutch",
    "nn": "norwegian",
    "no": "norwegian",
    "pl": "polish",
    "pt": "portuguese",
    "ro": "romanian",
    "ru": "russian",
    "sr": "serbian",
    "st": "sesotho",
    "sv": "swedish",
    "ta": "tamil",
    "tr": "turkish",
    "yi": "yiddish",
}
#: ISO 639-1 codes with a bm25s stop-word list (the bm25s name); other languages keep every word.
STOPWORDS = {
    "da": "danish",
    "de": "german",
    "en": "english",
    "es": "spanish",
    "fr": "french",
    "it": "italian",
    "nb": "norwegian",
    "nl": "dutch",
    "nn": "norwegian",
    "no": "norwegian",
    "pt": "portuguese",
    "ru": "russian",
    "sv": "swedish",
    "tr": "turkish",
}
CHUNK_FIELDS = ("source", "title", "chunk_id")  # filterable besides metadata keys


@dataclass
class Hit:
    """One search result. `score` is the fused RRF score in hybrid mode, else the retriever's own score."""

    chunk: Chunk
    score: float
    rank: int  # 1-based
    dense_score: float | None = None  # cosine similarity
    bm25_score: float | None = None
    rerank_score: float | None = None  # the cross-encoder's, when a reranker re-scored the hits

    def to_dict(self) -> dict:
        c = self.chunk
        return {
            "rank": self.rank,
            "score": self.score,
            "dense_score": self.dense_score,
            "bm25_score": self.bm25_score,
            "rerank_score": self.rerank_score,
            "chunk_id": c.chunk_id,
            "source": c.source,
            "title": c.title,
            "text": c.text,
            "start": c.start,
            "end": c.end,
            "metadata": dict(c.metadata),
        }


def reciprocal_rank_fusion(rankings: list[list[int]], weights: list[float], k: int = 60) -> list[tuple[int, float]]:
    """Fuse rankings (ids, best first): score(id) = sum_i weights[i] / (k + rank_i(id)), rank 1-based.

    Returns (id, score) best first; ties keep the order in which ids were first seen.
    """
    if len(rankings) != len(weights):
        raise RagloraError(f"reciprocal_rank_fusion: {len(rankings)} rankings but {len(weights)} weights")
    if k <= 0:
        raise RagloraError(f"rrf_k must be positive, got {k}")
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def field_values(chunk: Chunk, key: str) -> list[str]:
    """A chunk's values of a filter field, as strings (a list-valued metadata key gives each item)."""
    value = getattr(chunk, key) if key in CHUNK_FIELDS else chunk.metadata.get(key)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def parse_filters(filters: dict | None, known: Collection[str]) -> dict[str, set[str]]:
    """{field: allowed values as strings} (a list value means any of); unknown fields and empty lists refused."""
    if not filters:
        return {}
    if not isinstance(filters, dict):
        raise RagloraError(f"filters must be an object of field -> value(s), got {type(filters).__name__}")
    parsed = {}
    for key, wanted in filters.items():
        allowed = {str(v) for v in (wanted if isinstance(wanted, (list, tuple, set)) else [wanted])}
        if not allowed:
            raise RagloraError(f"filter {key!r} has no values")
        if key not in CHUNK_FIELDS and key not in known:
            names = sorted(set(known) | set(CHUNK_FIELDS))
            raise RagloraError(f"unknown filter field {key!r}; this index has: {', '.join(names)}")
        parsed[key] = allowed
    return parsed


def normalise_language(language: str | None) -> str:
    """ "sv", "SV", "sv-SE" -> "sv"; None, "" or a non-string (an index built before languages) -> "en"."""
    if not isinstance(language, str):
        return DEFAULT_LANGUAGE
    code = language.strip().lower().replace("_", "-").split("-")[0]
    return code or DEFAULT_LANGUAGE


@functools.cache
def _stemmer(language: str):
    """Snowball stemmer for the language (questions say "insulate", answers "insulation"; exact words rarely
    meet), or None, with one warning, when PyStemmer has none for it: BM25 then matches exact words only."""
    import Stemmer

    name = SNOWBALL.get(language)
    if name is None or name not in Stemmer.algorithms():
        log.warning(language_warning(language))
        return None
    return Stemmer.Stemmer(name)


def language_warning(language: str) -> str:
    """The warning for a language without a stemmer ("" when it has one)."""
    if SNOWBALL.get(normalise_language(language)):
        return ""
    return (
        f"index language {language!r} has no BM25 stemmer: keyword search matches exact words only "
        f"(stemmed languages: {', '.join(sorted(SNOWBALL))})"
    )


def tokenize(texts: list[str], language: str = DEFAULT_LANGUAGE) -> list[list[str]]:
    """bm25s's regex tokenizer, lower-cased, the language's stop words removed, Snowball-stemmed in it."""
    import bm25s

    code = normalise_language(language)
    return bm25s.tokenize(
        texts,
        lower=True,
        stopwords=STOPWORDS.get(code),
        stemmer=_stemmer(code),
        return_ids=False,
        show_progress=False,
    )


def build_bm25(texts: list[str], language: str = DEFAULT_LANGUAGE):
    import bm25s

    bm25 = bm25s.BM25()
    tokens = tokenize(texts, language)
    if not any(tokens):  # bm25s cannot index a vocabulary-free corpus
        return None
    bm25.index(tokens, show_progress=False)
    return bm25


def bm25_scores(bm25, query: str, n: int, language: str = DEFAULT_LANGUAGE) -> np.ndarray:
    """BM25 score of every chunk for `query` (zeros when no query term is in the vocabulary)."""
    tokens = tokenize([query], language)[0]
    if bm25 is None or not tokens:
        return np.zeros(n, dtype=np.float32)
    return np.asarray(bm25.get_scores(tokens), dtype=np.float32)


def top_ids(scores: np.ndarray, depth: int, mask: np.ndarray | None = None, positive_only: bool = False) -> list[int]:
    """Indices of the `depth` best scores (stable: ties by index), restricted to `mask` and optionally to > 0."""
    keep = np.ones(len(scores), dtype=bool) if mask is None else mask.copy()
    if positive_only:
        keep &= scores > 0
    ids = np.flatnonzero(keep)
    if len(ids) == 0:
        return []
    order = np.argsort(-scores[ids], kind="stable")[:depth]
    return ids[order].tolist()


def search(
    index,
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
    """Search a store: the FAISS `retriever.index.Index` or the Qdrant store (`retriever.vectordb`).

    The store ranks (dense: exact cosine of its ANN candidates; keyword: BM25), filters and `exclude` applied
    before its top-k cut; this function fuses, builds Hits and reranks. Each ranking is max(candidates, k) deep
    (and at least `rerank_depth` with a reranker). Defaults are the `retrieval` config section's. `exclude`: chunk
    ids never returned (evaluation's "gold removed" questions). `query_vector`: a unit query embedding, skipping
    the encoder (dense mode then needs no query text). `reranker`: an object with `score(query, texts)`
    (retriever.rerank), which re-scores the top `rerank_depth` fused hits; `score` is then its score.
    """
    text = query.strip() if isinstance(query, str) else ""
    if not text and (query_vector is None or mode != "dense"):
        raise RagloraError("empty query: pass a question to search for")
    if k <= 0:
        raise RagloraError(f"k must be a positive number of results, got {k}")
    if mode not in MODES:
        raise RagloraError(f"unknown retrieval mode {mode!r} (use one of: {', '.join(MODES)})")
    if candidates <= 0:
        raise RagloraError(f"candidates must be positive, got {candidates}")
    if rerank_depth <= 0:
        raise RagloraError(f"rerank_depth must be positive, got {rerank_depth}")
    if mode != "bm25" and query_vector is None and index.embedder is None:
        raise RagloraError(f"{mode} retrieval needs an embedder: load the index with one, or use mode 'bm25'")
    if len(index) == 0:
        return []
    depth = max(candidates, k, rerank_depth if reranker is not None else 0)

    qvec = dense = keyword = None
    if mode != "bm25":
        if query_vector is None:  # e5-style models embed queries and passages with different prefixes
            encode = getattr(index.embedder, "encode_queries", index.embedder.encode)
            query_vector = encode([text], batch_size=1)[0]
        qvec = query_vector
        qvec = np.asarray(qvec, dtype=np.float32).reshape(-1)
        dense = index.dense_ranking(qvec, depth, filters=filters, exclude=exclude, nprobe=nprobe, ef_search=ef_search)
    if mode != "dense":
        keyword = index.keyword_ranking(text, depth, filters=filters, exclude=exclude)

    if mode == "dense":
        fused = dense
    elif mode == "bm25":
        fused = keyword
    else:
        rankings = [[key for key, _ in dense], [key for key, _ in keyword]]
        fused = reciprocal_rank_fusion(rankings, [dense_weight, bm25_weight], k=rrf_k)
    top = fused[: max(k, rerank_depth) if reranker is not None else k]
    keys = [key for key, _ in top]
    dense_of = _scores_of(keys, dense, lambda missing: index.dense_scores(qvec, missing))
    keyword_of = _scores_of(keys, keyword, lambda missing: index.keyword_scores(text, missing))
    hits = [
        Hit(
            chunk=index.chunk(key),
            score=float(score),
            rank=rank,
            dense_score=None if dense_of is None else dense_of[key],
            bm25_score=None if keyword_of is None else keyword_of[key],
        )
        for rank, (key, score) in enumerate(top, start=1)
    ]
    return rerank(hits, text, reranker, k) if reranker is not None else hits


def _scores_of(keys: list, ranking: list[tuple] | None, fetch) -> dict | None:
    """Each key's score in `ranking`, fetching the ones it does not hold (fused hits from the other retriever)."""
    if ranking is None:
        return None
    known = {key: float(score) for key, score in ranking}
    missing = [key for key in keys if key not in known]
    if missing:
        known.update(zip(missing, (float(s) for s in fetch(missing)), strict=True))
    return known


def rerank(hits: list[Hit], query: str, reranker, k: int) -> list[Hit]:
    """Re-score hits with a cross-encoder on (query, chunk text), best first, cut to k; ties keep fused order."""
    if not hits:
        return hits
    scores = np.asarray(reranker.score(query, [h.chunk.text for h in hits]), dtype=np.float64).reshape(-1)
    if len(scores) != len(hits):
        raise RagloraError(
            f"reranker {getattr(reranker, 'name', reranker)!r} returned {len(scores)} scores for {len(hits)} passages"
        )
    order = np.argsort(-scores, kind="stable")[:k]
    out = []
    for rank, i in enumerate(order, start=1):
        hit = hits[int(i)]
        hit.rerank_score = hit.score = float(scores[i])
        hit.rank = rank
        out.append(hit)
    return out
