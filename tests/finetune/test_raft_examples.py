"""RAFT example construction: gold/no-gold fractions, distractors never the gold, serving prompt format."""

from __future__ import annotations

from ft_helpers import StubIndex, faq_rows

from finetune.data import load_examples
from finetune.prompt import CONTEXT_BEGIN, REFUSAL_ANSWER
from finetune.raft import build_raft_examples
from pipeline.metrics import citation_markers


def _examples(tmp_path, n=8):
    from ft_helpers import write_jsonl

    return load_examples(write_jsonl(tmp_path / "d.jsonl", faq_rows("bygglov", n)), stage="domain")


def test_fractions_gold_and_distractors(tmp_path):
    examples = _examples(tmp_path) * 5  # 40 rows
    index = StubIndex(faq_rows("bygglov"))
    out, stats = build_raft_examples(
        examples, index=index, fraction=0.5, n_distractors=2, p_no_gold=0.25, system_prompt="RAG", seed=1
    )
    raft = [e for e in out if "raft" in e]
    assert stats["raft_examples"] == len(raft) == 20
    assert stats["without_gold"] == 5 and stats["with_gold"] == 15
    for e in raft:
        gold = e["faq_id"]
        sources = e["raft"]["sources"]
        target = e["messages"][-1]
        if e["raft"]["gold"]:
            assert sources.count(gold) == 1 and len(sources) == 3
            n = sources.index(gold) + 1  # the answer, citing the gold passage by its number
            assert target == {"role": "assistant", "content": e["answer"][:-1] + f" [{n}]."}
        else:  # as many passages as a gold row: retrieval's top hits with the gold removed; the hand-over reply
            assert gold not in sources and len(sources) == 3
            assert target == {"role": "assistant", "content": REFUSAL_ANSWER}
        assert e["messages"][0] == {"role": "system", "content": "RAG"}
        assert CONTEXT_BEGIN in e["messages"][1]["content"]
        assert e["messages"][1]["content"].endswith(e["question"])
    assert all(
        "raft" not in e and e["messages"] == examples[i]["messages"] for i, e in enumerate(out) if "raft" not in e
    )
    # gold position is shuffled
    assert len({e["raft"]["sources"].index(e["faq_id"]) for e in raft if e["raft"]["gold"]}) > 1


def test_seeded_and_refusal_target(tmp_path):
    examples = _examples(tmp_path)
    index = StubIndex(faq_rows("bygglov"))
    kw = dict(index=index, fraction=1.0, n_distractors=1, p_no_gold=0.5, system_prompt="S", seed=3)
    a, stats = build_raft_examples(examples, **kw)
    b, _ = build_raft_examples(examples, **kw)
    assert a == b
    refusals = [e for e in a if not e["raft"]["gold"]]  # the hand-over reply is the default target
    assert len(refusals) == stats["without_gold"] == stats["refusal_targets"] == 4
    assert all(e["messages"][-1]["content"] == REFUSAL_ANSWER and e["raft"]["target"] == "refusal" for e in refusals)
    c, stats = build_raft_examples(examples, no_gold_target="answer", **kw)  # the RAFT paper's variant
    answers = [e for e in c if not e["raft"]["gold"]]
    assert len(answers) == stats["answer_targets_without_gold"] == 4 and stats["refusal_targets"] == 0
    assert all(e["messages"][-1]["content"] == e["answer"] and e["raft"]["target"] == "answer" for e in answers)


def test_distractors_are_dropped_before_the_prompt_would_be_truncated(tmp_path):
    examples = _examples(tmp_path, 2)
    index = StubIndex(faq_rows("bygglov"))
    out, stats = build_raft_examples(
        examples, index=index, fraction=1.0, n_distractors=3, p_no_gold=0.0, system_prompt="S", seed=0,
        fits=lambda msgs: msgs[1]["content"].count("\n[") <= 2,  # room for 2 passages only
    )  # fmt: skip
    assert all(len(e["raft"]["sources"]) == 2 and e["faq_id"] in e["raft"]["sources"] for e in out)
    assert stats["dropped_distractors_for_length"] == 4
    for e in out:  # the marker is the gold passage's number in the prompt as shown, after the drops
        assert citation_markers(e["messages"][-1]["content"]) == [e["raft"]["sources"].index(e["faq_id"]) + 1]


def test_works_with_the_real_retriever_index(tmp_path):
    import json

    from fake_embedder import FakeEmbedder

    from retriever.index import build_index, load_index

    rows = [
        {"id": r["id"], "category": r["category"], "question": r["question"], "answer": r["answer"]} for r in faq_rows()
    ]
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "faq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    build_index([str(kb)], tmp_path / "index", FakeEmbedder(), chunk_size=800, chunk_overlap=100)
    index = load_index(tmp_path / "index", FakeEmbedder())
    out, stats = build_raft_examples(
        _examples(tmp_path), index=index, fraction=1.0, n_distractors=2, p_no_gold=0.0, system_prompt="S", seed=0
    )
    assert stats["gold_from_index"] == 8 and stats["distractors"] == 16
    for e in out:
        assert e["raft"]["sources"].count(e["faq_id"]) == 1
        assert "(bygglov)" in e["messages"][1]["content"]  # index titles FAQ chunks by category
