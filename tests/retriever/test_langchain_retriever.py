from langchain_core.documents import Document as LCDocument

from retriever.index import build_index, load_index
from retriever.langchain import RagloraRetriever


def test_retriever_returns_langchain_documents_with_citation_metadata(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, chunk_size=300, chunk_overlap=30, show_progress=False)
    retriever = RagloraRetriever(
        index=load_index(tmp_path / "ix", embedder), k=2, mode="hybrid", filters={"category": "kitchen"}
    )
    docs = retriever.invoke("stone worktop heat")
    assert len(docs) == 2 and all(isinstance(d, LCDocument) for d in docs)
    top = docs[0]
    assert top.page_content.startswith("Choose a worktop")
    assert {"source", "title", "chunk_id", "score", "category"} <= set(top.metadata)
    assert top.metadata["source"] == top.metadata["chunk_id"] == "kitchen-002"
    assert top.metadata["score"] >= docs[1].metadata["score"]


def test_defaults_are_the_retrieval_config_defaults():
    """One source of the retrieval defaults: the config model; the library functions take theirs from it."""
    import inspect

    from retriever.config import RetrievalConfig
    from retriever.index import Index
    from retriever.search import search

    want = RetrievalConfig().model_dump()
    fields = RagloraRetriever.model_fields
    assert {key: fields[key].default for key in want} == want
    for fn in (search, Index.search):
        params = inspect.signature(fn).parameters
        assert {key: params[key].default for key in want} == want, fn
