"""The retrieval-quality report: its rows, its hit@k arithmetic, and a winner chosen on validation only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fake_embedder import FakeEmbedder

from bench.retrieval_quality import QuestionSet, cached_questions, choose_winner, hand_sets, markdown, run, score_index
from raglora.errors import RagloraError

FAQ = [
    ("heat-001", "How often should the heat pump be serviced?", "A heat pump needs a service every second year."),
    ("roof-001", "Does a roof need a permit?", "Replacing roof tiles with the same kind needs no permit."),
    ("deck-001", "Can I build a deck?", "A deck lower than 1.8 metres is exempt from the permit."),
    ("rot-001", "What is ROT?", "ROT is a tax deduction of 30 percent on the labour cost of renovation."),
]


def _hit(chunk_id: str):
    return SimpleNamespace(chunk=SimpleNamespace(chunk_id=chunk_id))


class RankedIndex:
    """An index stand-in whose search returns a fixed ranking per query, to check the metric by hand."""

    def __init__(self, rankings: dict[str, list[str]]):
        self.rankings = rankings
        self.chunks = []

    def search(self, query, **kw):
        return [_hit(c) for c in self.rankings[query]][: kw["k"]]


def test_hit_at_5_and_mrr_on_a_hand_made_case():
    others = [f"x{i}" for i in range(10)]
    index = RankedIndex(
        {
            "q1": ["gold1", *others],  # rank 1
            "q2": [*others[:2], "gold2", *others[2:]],  # rank 3
            "q3": [*others[:5], "gold3", *others[5:]],  # rank 6: a hit@10, not a hit@5
            "q4": others,  # never
        }
    )
    rows = [{"question": f"q{i}", "gold_ids": [f"gold{i}"]} for i in range(1, 5)]
    out = score_index(
        index, [QuestionSet("customer", "test", rows)], rerankers={"none": None}, search_kw={}, language="en"
    )
    dense = next(r for r in out if r["mode"] == "dense")
    assert dense["n"] == 4
    assert dense["hit@1"] == pytest.approx(1 / 4)
    assert dense["hit@5"] == pytest.approx(2 / 4)
    assert dense["hit@10"] == pytest.approx(3 / 4)
    assert dense["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 0) / 4)


def test_report_has_a_row_per_variant_set_split_query_and_mode(tmp_path):
    kb = tmp_path / "faq.jsonl"
    kb.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in FAQ))
    sets = [
        QuestionSet(
            "faq", "validation", [{"id": "heat-001", "question": FAQ[0][1], "answer": FAQ[0][2], "source": None}]
        ),
        QuestionSet("faq", "test", [{"id": "rot-001", "question": FAQ[3][1], "answer": FAQ[3][2], "source": None}]),
        QuestionSet(
            "customer", "test", [{"question": "our roof tiles are cracked, paperwork?", "gold_ids": ["roof-001"]}]
        ),
        QuestionSet(
            "followups",
            "validation",
            [
                {
                    "question": "how often?",
                    "history": [
                        {"role": "user", "content": "we have a heat pump"},
                        {"role": "assistant", "content": "ok"},
                    ],
                    "gold_ids": ["heat-001"],
                }
            ],
        ),
    ]
    report = run(
        [kb],
        {"fake": FakeEmbedder()},
        sets,
        chunk_size=500,
        chunk_overlap=0,
        log=lambda _: None,
    )
    keys = {(r["index"], r["set"], r["split"], r["query"], r["mode"]) for r in report["results"]}
    modes = ("dense", "bm25", "hybrid")
    expected = {
        *(("answers", "faq", s, "raw", m) for s in ("validation", "test") for m in modes),
        *(("answers", "customer", "test", "raw", m) for m in modes),
        *(("answers", "followups", "validation", q, m) for q in ("raw", "condensed", "history") for m in modes),
        *(("question+answer", "faq", s, "raw", m) for s in ("validation", "test") for m in modes),  # the reference
    }
    assert keys == expected and len(report["results"]) == len(expected)
    # The reference index holds the question itself, so the held-out question finds its row first.
    ref = [r for r in report["results"] if r["index"] == "question+answer" and r["mode"] == "dense"]
    assert all(r["hit@1"] == 1.0 for r in ref)
    assert report["winner"]["embedder"] == "fake" and report["winner"]["reranker"] == "none"
    table = markdown(report)
    assert table.count("\n| answers | fake | off |") == 18 and "Winner on validation" in table


def test_winner_is_chosen_on_validation_not_test():
    def row(mode, split, hit5):
        return {
            "index": "answers",
            "embedder": "e",
            "doc_questions": "off",
            "reranker": "none",
            "set": "faq",
            "query": "raw",
            "mode": mode,
            "split": split,
            "n": 10,
            "hit@1": 0.1,
            "hit@5": hit5,
            "hit@10": 1.0,
            "mrr": 0.5,
        }

    results = [
        row("dense", "validation", 0.9),
        row("dense", "test", 0.5),
        row("bm25", "validation", 0.6),
        row("bm25", "test", 0.99),
    ]
    report = choose_winner(results)
    assert report["winner"]["mode"] == "dense"
    assert report["winner_figures"]["test"]["hit@5"] == pytest.approx(0.5)


def test_hand_written_rows_need_gold_and_a_split(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "hi?", "gold_ids": ["x"], "split": "train"}) + "\n")
    with pytest.raises(RagloraError, match="split"):
        hand_sets(path, "customer")
    with pytest.raises(RagloraError, match="missing"):
        hand_sets(tmp_path / "nope.jsonl", "customer")


def test_shipped_hand_written_sets_name_held_out_rows_of_the_knowledge_base():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    faq = {json.loads(line)["id"] for line in (root / "data/kb/faq.jsonl").read_text().splitlines()}
    held_out = {
        json.loads(line)["id"]: split
        for split in ("validation", "test")
        for stage in ("domain", "subdomain")
        for line in (root / f"data/{stage}/{split}.jsonl").read_text().splitlines()
    }
    customer = [r for s in hand_sets(root / "data/eval/customer_questions.jsonl", "customer") for r in s.rows]
    followups = [r for s in hand_sets(root / "data/eval/followups.jsonl", "followups") for r in s.rows]
    assert len(customer) == 30 and len(followups) >= 20
    for r in customer + followups:
        assert set(r["gold_ids"]) <= faq
        assert held_out.get(r["gold_ids"][0]) == r["split"]
    assert all(len(r["history"]) == 2 for r in followups)


def test_generated_questions_are_cached_and_reused_by_the_next_run(tmp_path):
    from retriever.chunking import Chunk, sha256
    from retriever.questions import add_questions_fn

    def chunks():
        return [Chunk(f"c{i}", f"text {i}", "s", "t", 0, 6, sha256(f"text {i}"), "d", {}) for i in range(3)]

    written = []

    def factory():
        def write(prompts):
            written.extend(prompts)
            return ["What is it?"] * len(prompts)

        return write

    cache = tmp_path / "q.json"
    key = {"model": "m", "per_chunk": 2}
    first = chunks()
    cached_questions(add_questions_fn("generate", 2, generator_factory=factory), cache, key)(first, {})
    assert len(written) == 3 and all(c.questions == ["What is it?"] for c in first)
    again = chunks()
    cached_questions(add_questions_fn("generate", 2, generator_factory=factory), cache, key)(again, {})
    assert len(written) == 3 and all(c.questions == ["What is it?"] for c in again)  # nothing generated again
    other_model = chunks()
    cached_questions(add_questions_fn("generate", 2, generator_factory=factory), cache, {"model": "n"})(other_model, {})
    assert len(written) == 6  # another model or prompt: the cache does not apply


def test_a_reranker_adds_its_own_rows_and_changes_the_order(tmp_path):
    import numpy as np

    class LongestFirst:
        name = "longest"

        def score(self, query, texts):
            return np.array([len(t) for t in texts], dtype=np.float32)

    kb = tmp_path / "faq.jsonl"
    kb.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in FAQ))
    rows = [{"question": "heat pump service every second year", "gold_ids": ["heat-001"]}]
    report = run(
        [kb],
        {"fake": FakeEmbedder()},
        [QuestionSet("customer", "validation", rows)],
        chunk_size=500,
        chunk_overlap=0,
        rerankers={"none": None, "longest": LongestFirst()},
        reference=False,
        log=lambda _: None,
    )
    dense = {r["reranker"]: r for r in report["results"] if r["mode"] == "dense"}
    assert set(dense) == {"none", "longest"}
    assert dense["none"]["hit@1"] == 1.0
    assert dense["longest"]["hit@1"] == 0.0  # the longest answer (the ROT row) is put first
