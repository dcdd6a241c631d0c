"""Config models for the `index` and `retrieval` sections; pipeline.config composes them into the root config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class IndexConfig(BaseModel):
    """How `raglora index` turns documents into an on-disk index."""

    model_config = ConfigDict(extra="forbid")

    docs: list[str] = Field(default_factory=lambda: ["data/kb"], min_length=1)
    # "packaged:all-MiniLM-L6-v2" is the PyPI-packaged model (works offline); any sentence-transformers name or path.
    embedder: str = Field("packaged:all-MiniLM-L6-v2", min_length=1)
    chunk_size: int = Field(800, gt=0)
    chunk_overlap: int = Field(100, ge=0)
    # Off by default: indexing the question makes a held-out question trivially match its own row.
    faq_include_question: bool = False
    index_type: Literal["flat", "ivf", "hnsw"] = "flat"
    batch_size: int = Field(64, gt=0)
    # ISO 639-1 code of the documents: picks BM25 stemming and stop words (e.g. sv: Swedish Snowball).
    # `raglora init` detects it; an unsupported language falls back to no stemming, with a warning.
    language: str = Field("en", pattern=r"^[a-z]{2}$")
    ivf_nlist: int = Field(256, gt=0)
    hnsw_m: int = Field(32, gt=0)

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

    @model_validator(mode="after")
    def _some_weight(self) -> RetrievalConfig:
        if self.mode == "hybrid" and self.dense_weight == 0 and self.bm25_weight == 0:
            raise ValueError("hybrid mode needs dense_weight or bm25_weight above 0")
        return self
