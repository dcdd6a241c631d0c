"""LangChain adapter: use a raglora Index anywhere a `BaseRetriever` is expected (chains, agents)."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document as LCDocument
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from retriever.rerank import load_reranker
from retriever.search import DEFAULTS


class RagloraRetriever(BaseRetriever):
    """Wraps `Index.search`; each hit becomes a LangChain Document whose metadata carries the citation."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any
    # Defaults: the `retrieval` config section's (retriever.config.RetrievalConfig), the one source of them.
    k: int = DEFAULTS.k
    mode: str = DEFAULTS.mode
    filters: dict | None = None
    rrf_k: int = DEFAULTS.rrf_k
    dense_weight: float = DEFAULTS.dense_weight
    bm25_weight: float = DEFAULTS.bm25_weight
    candidates: int = DEFAULTS.candidates
    nprobe: int | None = DEFAULTS.nprobe
    ef_search: int | None = DEFAULTS.ef_search
    # A reranker object (retriever.rerank) or a cross-encoder folder / cached HF id, loaded once by load_reranker.
    reranker: Any = DEFAULTS.reranker
    rerank_depth: int = DEFAULTS.rerank_depth

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[LCDocument]:
        hits = self.index.search(
            query,
            k=self.k,
            mode=self.mode,
            filters=self.filters,
            rrf_k=self.rrf_k,
            dense_weight=self.dense_weight,
            bm25_weight=self.bm25_weight,
            candidates=self.candidates,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            reranker=load_reranker(self.reranker) if isinstance(self.reranker, str) else self.reranker,
            rerank_depth=self.rerank_depth,
        )
        docs = []
        for hit in hits:
            d = hit.to_dict()
            metadata = {
                **d.pop("metadata"),
                "source": d["source"],
                "title": d["title"],
                "chunk_id": d["chunk_id"],
                "score": d["score"],
                "rank": d["rank"],
                "dense_score": d["dense_score"],
                "bm25_score": d["bm25_score"],
                "rerank_score": d.get("rerank_score"),
                "start": d["start"],
                "end": d["end"],
            }
            docs.append(LCDocument(page_content=d["text"], metadata=metadata, id=d["chunk_id"]))
        return docs
