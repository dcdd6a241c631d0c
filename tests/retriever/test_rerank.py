"""The cross-encoder reranker: loading a (tiny, random, in-process) CrossEncoder, its scores, and search() and
the LangChain retriever reordering hits by a reranker's score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from raglora.errors import RagloraError
from retriever.index import build_index, load_index
from retriever.langchain import RagloraRetriever
from retriever.rerank import load_reranker

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "how",
    "do",
    "i",
    "need",
    "a",
    "permit",
    "for",
    "an",
    "extension",
    "roof",
    "leaks",
    "heat",
    "pump",
    "kitchen",
]


def save_tiny_cross_encoder(out: Path, num_labels: int = 1) -> Path:
    """A 1-layer BERT sequence classifier with a word-level WordPiece vocabulary: a random cross-encoder folder."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok = BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        initializer_range=0.5,  # the default 0.02 gives near-equal scores, which would prove nothing
    )
    BertForSequenceClassification(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    return save_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "tiny-ce")


def test_tiny_cross_encoder_scores_each_passage_deterministically(tiny_cross_encoder):
    reranker = load_reranker(str(tiny_cross_encoder))
    texts = ["do i need a permit for an extension", "the roof leaks", "heat pump kitchen"]
    scores = reranker.score("permit for an extension", texts)
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert len(set(np.round(scores, 6).tolist())) == 3  # it reads the passages, not a constant
    np.testing.assert_array_equal(scores, reranker.score("permit for an extension", texts))
    assert reranker.score("permit", []).shape == (0,)
    assert reranker.name == str(tiny_cross_encoder)


def test_reranker_loads_once_per_process(tiny_cross_encoder):
    assert load_reranker(str(tiny_cross_encoder)) is load_reranker(str(tiny_cross_encoder))


def test_missing_reranker_path_is_a_clear_error(tmp_path):
    with pytest.raises(RagloraError, match="reranker path is not a model folder"):
        load_reranker(str(tmp_path / "no-such-model"))
    with pytest.raises(RagloraError, match="reranker name is empty"):
        load_reranker("  ")


def test_unloadable_reranker_folder_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(RagloraError, match="could not load reranker"):
        load_reranker(str(bad))


def test_hub_id_not_in_the_local_cache_is_a_clear_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RagloraError, match="offline"):
        load_reranker("nobody/not-a-cached-cross-encoder")


def test_classifier_with_several_labels_is_refused(tmp_path):
    path = save_tiny_cross_encoder(tmp_path / "three-labels", num_labels=3)
    with pytest.raises(RagloraError, match="3 output labels"):
        load_reranker(str(path))


class PrefersWord:
    """A deterministic reranker: passages containing `word` score 1, others 0; records what it was shown."""

    def __init__(self, word: str):
        self.name = f"prefers-{word}"
        self.word = word
        self.seen: list[list[str]] = []

    def score(self, query: str, texts: list[str]) -> np.ndarray:
        self.seen.append(list(texts))
        return np.array([float(self.word in t.lower()) for t in texts], dtype=np.float32)


@pytest.fixture
def index(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, chunk_size=300, chunk_overlap=30, show_progress=False)
    return load_index(tmp_path / "ix", embedder)


def promoted_case(index) -> tuple[str, str, list]:
    """A query, a word only in a chunk that ranks below 1st (but within the top 10), and the plain hits."""
    query = "stone worktop heat"
    plain = index.search(query, k=10, mode="dense")
    for hit in plain[1:]:
        words = set(hit.chunk.text.lower().split()) - {
            w for h in plain if h is not hit for w in h.chunk.text.lower().split()
        }
        words = {w for w in words if w.isalpha() and len(w) > 3}
        if words:
            return query, sorted(words)[0], plain
    pytest.skip("no chunk with a word of its own in the top 10")


def test_search_with_a_reranker_orders_hits_by_its_score(index):
    query, word, plain = promoted_case(index)
    favourite = next(h.chunk.chunk_id for h in plain if word in h.chunk.text.lower())
    assert plain[0].chunk.chunk_id != favourite
    reranker = PrefersWord(word)
    hits = index.search(query, k=3, mode="dense", reranker=reranker, rerank_depth=10)
    assert hits[0].chunk.chunk_id == favourite
    assert hits[0].rerank_score == hits[0].score == 1.0 and hits[1].rerank_score == 0.0
    assert [h.rank for h in hits] == [1, 2, 3]
    assert len(reranker.seen[0]) == 10  # the top rerank_depth fused hits were re-scored, cut to k afterwards


def test_langchain_retriever_passes_the_reranker(index):
    query, word, plain = promoted_case(index)
    favourite = next(h.chunk.chunk_id for h in plain if word in h.chunk.text.lower())
    retriever = RagloraRetriever(index=index, k=2, mode="dense", reranker=PrefersWord(word), rerank_depth=10)
    docs = retriever.invoke(query)
    assert docs[0].metadata["chunk_id"] == favourite and docs[0].metadata["rerank_score"] == 1.0


def test_langchain_retriever_loads_a_reranker_named_by_path(index, tiny_cross_encoder):
    retriever = RagloraRetriever(index=index, k=2, mode="dense", reranker=str(tiny_cross_encoder), rerank_depth=5)
    docs = retriever.invoke("permit for an extension")
    assert len(docs) == 2 and all(isinstance(d.metadata["rerank_score"], float) for d in docs)


def test_answer_service_retrieves_through_its_reranker(index):
    from types import SimpleNamespace

    from tiny_model import make_tiny_tokenizer

    from pipeline.answer import AnswerService

    query, word, plain = promoted_case(index)
    favourite = next(h.chunk.chunk_id for h in plain if word in h.chunk.text.lower())
    generator = SimpleNamespace(
        models=SimpleNamespace(stage_names=[], deepest_stage=None), tokenizer=make_tiny_tokenizer()
    )
    reranker = PrefersWord(word)
    service = AnswerService(
        generator, index, retrieval={"k": 2, "mode": "dense", "rerank_depth": 10}, reranker=reranker
    )
    contexts, _ = service._retrieve(query)
    assert contexts[0]["chunk_id"] == favourite and contexts[0]["rerank_score"] == 1.0
    assert len(reranker.seen[0]) == 10  # retrieval.rerank_depth reached search()
