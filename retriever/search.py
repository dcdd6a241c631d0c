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

    def to_dict(self) -> dict:
        c = self.chunk
        return {
            "rank": self.rank,
            "score": self.score,
            "dense_score": self.dense_score,
            "bm25_score": self.bm25_score,
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


def _field_values(chunk: Chunk, key: str) -> list[str]:
    value = getattr(chunk, key) if key in CHUNK_FIELDS else chunk.metadata.get(key)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def filter_mask(chunks: list[Chunk], filters: dict | None) -> np.ndarray | None:
    """Boolean mask of chunks matching every filter key (a list value means any of). None when no filter."""
    if not filters:
        return None
    mask = np.ones(len(chunks), dtype=bool)
    for key, wanted in filters.items():
        allowed = {str(v) for v in (wanted if isinstance(wanted, (list, tuple, set)) else [wanted])}
        if not allowed:
            raise RagloraError(f"filter {key!r} has no values")
        if key not in CHUNK_FIELDS and not any(key in c.metadata for c in chunks):
            known = sorted({k for c in chunks for k in c.metadata} | set(CHUNK_FIELDS))
            raise RagloraError(f"unknown filter field {key!r}; this index has: {', '.join(known)}")
        mask &= np.array([not allowed.isdisjoint(_field_values(c, key)) for c in chunks], dtype=bool)
    return mask


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


def dense_ranking(index, query_vector: np.ndarray, depth: int, mask: np.ndarray | None) -> list[int]:
    """Best chunk ids by cosine. Unfiltered: the faiss index. Filtered: exact search over the allowed vectors."""
    if mask is not None:
        return top_ids(index.vectors @ query_vector, depth, mask)
    depth = min(depth, len(index.chunks))
    if depth == 0:
        return []
    _, ids = index.faiss_index.search(query_vector[None, :].astype(np.float32), depth)
    return [int(i) for i in ids[0] if i >= 0]


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
) -> list[Hit]:
    """Search an Index (see retriever.index). Each retriever contributes max(candidates, k) ids to the fusion.

    Defaults are the `retrieval` config section's (retriever.config.RetrievalConfig); BM25 analyses the query in
    the index's language (`index.language`, from its manifest). `exclude`: chunk ids never returned, removed
    before the top-k cut like a filter (evaluation's "gold removed" questions: retrieval without the answer).
    """
    if not isinstance(query, str) or not query.strip():
        raise RagloraError("empty query: pass a question to search for")
    if k <= 0:
        raise RagloraError(f"k must be a positive number of results, got {k}")
    if mode not in MODES:
        raise RagloraError(f"unknown retrieval mode {mode!r} (use one of: {', '.join(MODES)})")
    if candidates <= 0:
        raise RagloraError(f"candidates must be positive, got {candidates}")
    if mode != "bm25" and index.embedder is None:
        raise RagloraError(f"{mode} retrieval needs an embedder: load the index with one, or use mode 'bm25'")
    n = len(index.chunks)
    mask = filter_mask(index.chunks, filters)
    if exclude:
        excluded = set(exclude)
        keep = np.array([c.chunk_id not in excluded for c in index.chunks], dtype=bool)
        mask = keep if mask is None else mask & keep
    if n == 0 or (mask is not None and not mask.any()):
        return []
    depth = max(candidates, k)

    dense = bm25 = None
    if mode != "bm25":
        qvec = index.embedder.encode([query], batch_size=1)[0].astype(np.float32)
        dense_rank = dense_ranking(index, qvec, depth, mask)
    if mode != "dense":
        bm25 = bm25_scores(index.bm25, query, n, getattr(index, "language", DEFAULT_LANGUAGE))
        bm25_rank = top_ids(bm25, depth, mask, positive_only=True)

    if mode == "dense":
        dense = index.vectors @ qvec
        fused = [(i, float(dense[i])) for i in dense_rank]
    elif mode == "bm25":
        fused = [(i, float(bm25[i])) for i in bm25_rank]
    else:
        dense = index.vectors @ qvec
        fused = reciprocal_rank_fusion([dense_rank, bm25_rank], [dense_weight, bm25_weight], k=rrf_k)
    return [
        Hit(
            chunk=index.chunks[i],
            score=score,
            rank=rank,
            dense_score=None if dense is None else float(dense[i]),
            bm25_score=None if bm25 is None else float(bm25[i]),
        )
        for rank, (i, score) in enumerate(fused[:k], start=1)
    ]
