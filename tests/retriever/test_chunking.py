from retriever.chunking import chunk_documents, document_hash, sha256
from retriever.documents import Document

LONG = " ".join(f"Sentence number {i} talks about roof tiles and gutters." for i in range(60))


def test_offsets_point_into_the_document_text():
    doc = Document(text=LONG, source="guide.md", title="Roofs", metadata={"kind": "text"})
    chunks = chunk_documents([doc], chunk_size=200, chunk_overlap=50)
    assert len(chunks) > 5
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        assert len(c.text) <= 200


def test_consecutive_chunks_overlap():
    doc = Document(text=LONG, source="guide.md", title="Roofs", metadata={"kind": "text"})
    chunks = chunk_documents([doc], chunk_size=200, chunk_overlap=50)
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False))
    no_overlap = chunk_documents([doc], chunk_size=200, chunk_overlap=0)
    assert all(b.start >= a.end for a, b in zip(no_overlap, no_overlap[1:], strict=False))


def test_faq_rows_stay_one_chunk_with_their_id():
    row = Document(text=LONG, source="roofing-001", title="roofing", metadata={"kind": "faq", "category": "roofing"})
    [chunk] = chunk_documents([row], chunk_size=100, chunk_overlap=10)
    assert chunk.chunk_id == "roofing-001" and chunk.text == LONG
    assert chunk.metadata["category"] == "roofing"


def test_ids_are_stable_unique_and_hashes_track_content():
    docs = [
        Document(text="First section.", source="g.md", title="A", metadata={"kind": "text"}),
        Document(text="Second section.", source="g.md", title="B", metadata={"kind": "text"}),
        Document(text="Dup one.", source="dup", title="t", metadata={"kind": "faq"}),
        Document(text="Dup two.", source="dup", title="t", metadata={"kind": "faq"}),
    ]
    first = chunk_documents(docs, chunk_size=100, chunk_overlap=0)
    again = chunk_documents(docs, chunk_size=100, chunk_overlap=0)
    assert [c.chunk_id for c in first] == ["g.md#0", "g.md#1", "dup", "dup~2"]
    assert first == again
    assert first[0].content_hash == sha256("First section.")
    assert first[0].doc_hash == document_hash(docs[0]) != first[1].doc_hash
    retitled = Document(text="First section.", source="g.md", title="Renamed", metadata={})
    assert document_hash(retitled) != document_hash(docs[0])
