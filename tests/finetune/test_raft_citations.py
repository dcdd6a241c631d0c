"""RAFT targets cite the gold passage as [n] (its number in the prompt as shown), [n]-like text in answers is
rewritten, and distractor-only rows train the hand-over reply on retrieval's top non-gold hits."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
from ft_helpers import StubIndex, faq_rows, write_jsonl

from finetune.config import StageConfig
from finetune.data import load_examples
from finetune.prompt import REFUSAL_ANSWER, defuse_citations
from finetune.raft import answer_sentences, build_raft_examples, cite_answer
from pipeline.metrics import Judge, citation_markers, cited_sentences

MARKER = re.compile(r"\[(\d+)\]")


def _examples(tmp_path, rows):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", rows), stage="domain")


def _row(i: int, question: str, answer: str, prefix: str = "kb") -> dict:
    return {"id": f"{prefix}-{i}", "faq_id": f"{prefix}-{i}", "category": prefix, "question": question,
            "answer": answer, "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}  # fmt: skip


class KeywordJudge:
    """A passage supports a sentence when the passage contains the sentence's first word (lower-cased)."""

    embed = None
    ngram, overlap = 3, 0.5

    def support(self, sentences, passages):
        return np.array([[s.split()[0].lower() in p.lower() for p in passages] for s in sentences], dtype=bool)


def _target(e) -> str:
    return e["messages"][-1]["content"]


def test_every_marker_is_the_gold_number_after_the_shuffle(tmp_path):
    rows = faq_rows("bygglov") * 4  # 32 rows, gold at every position of the 3 passages
    out, stats = build_raft_examples(
        _examples(tmp_path, rows), index=StubIndex(faq_rows("bygglov")), fraction=1.0, n_distractors=2,
        p_no_gold=0.25, system_prompt="S", seed=5,
    )  # fmt: skip
    gold_rows = [e for e in out if e["raft"]["gold"]]
    numbers = set()
    for e in gold_rows:
        n = e["raft"]["sources"].index(e["faq_id"]) + 1
        numbers.add(n)
        assert e["raft"]["gold_number"] == n
        assert [int(m) for m in MARKER.findall(_target(e))] == [n]
        # the evaluation's own parser attaches the marker to the answer sentence (style "... bygglov [2].")
        assert cited_sentences(_target(e)) == [(e["answer"], [n])]
        assert f"[{n}]" in e["messages"][1]["content"]  # the prompt numbers the gold passage n
    assert numbers == {1, 2, 3}
    assert stats["cited_targets"] == len(gold_rows) == 24 and stats["citation_markers"] == 24
    assert stats["markers_per_cited_target"] == 1.0 and stats["judge"].startswith("n-gram rule")


def test_the_marker_follows_the_gold_when_distractors_are_dropped_for_length(tmp_path):
    examples = _examples(tmp_path, faq_rows("bygglov") * 3)
    kw = dict(index=StubIndex(faq_rows("bygglov")), fraction=1.0, n_distractors=3, p_no_gold=0.0, system_prompt="S",
              seed=2)  # fmt: skip
    full, _ = build_raft_examples(examples, **kw)
    short, stats = build_raft_examples(examples, fits=lambda m: m[1]["content"].count("\n[") <= 2, **kw)
    assert stats["dropped_distractors_for_length"] == 2 * len(short)
    moved = 0
    for before, after in zip(full, short, strict=True):
        n = after["raft"]["sources"].index(after["faq_id"]) + 1
        assert citation_markers(_target(after)) == [n] and len(after["raft"]["sources"]) == 2
        moved += n != before["raft"]["gold_number"]
    assert moved > 0  # some gold passages changed number: the marker was recomputed, not kept from the shuffle


def test_markers_go_after_the_sentences_the_gold_supports_only(tmp_path):
    answer = "Permits take ten weeks. Fees depend on size! Contact us if unsure"
    index = StubIndex([_row(0, "How long does a permit take?", answer)])
    index.chunks[0].text = "Permits are decided within ten weeks. Contact the municipality."  # not about fees
    out, stats = build_raft_examples(
        _examples(tmp_path, [_row(0, "How long does a permit take?", answer)]), index=index, fraction=1.0,
        n_distractors=0, p_no_gold=0.0, system_prompt="S", seed=0, judge=KeywordJudge(),
    )  # fmt: skip
    assert _target(out[0]) == "Permits take ten weeks [1]. Fees depend on size! Contact us if unsure [1]"
    assert cited_sentences(_target(out[0])) == [
        ("Permits take ten weeks.", [1]), ("Fees depend on size!", []), ("Contact us if unsure", [1])
    ]  # fmt: skip
    assert (stats["cited_sentences"], stats["answer_sentences"], stats["citation_markers"]) == (2, 3, 2)


def test_unsupported_answer_cites_at_the_end_and_a_fallback_gold_supports_every_sentence():
    answer = "Yes. A permit is needed. "
    spans = answer_sentences(answer)
    assert [answer[a:b] for a, b in spans] == ["Yes.", "A permit is needed."]
    assert cite_answer(answer, spans, [False, False], 2) == "Yes. A permit is needed [2]. "
    assert cite_answer('He said "no." Then left', answer_sentences('He said "no." Then left'), [True, False], 1) == (
        'He said "no." [1] Then left'
    )
    rows = [_row(0, "Do I need a permit?", "Yes. A permit is needed.", "own")]  # no chunk of its own in the index
    index = StubIndex([_row(0, "Unrelated?", "Paint dries in a day.", "other")])
    out, stats = build_raft_examples(
        rows, index=index, fraction=1.0, n_distractors=1, p_no_gold=0.0, system_prompt="S", seed=0
    )
    n = out[0]["raft"]["gold_number"]
    assert stats["gold_fallback"] == 1 and _target(out[0]) == f"Yes [{n}]. A permit is needed [{n}]."


def test_bracketed_numbers_in_answers_are_rewritten_so_every_marker_is_the_gold(tmp_path):
    answer = "See [3] and the 2019 rules [2019]; fees [1, 2] apply. Section [ 4 ] has details."
    assert (
        defuse_citations(answer) == "See (3) and the 2019 rules (2019); fees (1, 2) apply. Section ( 4 ) has details."
    )
    rows = [_row(i, f"Question {i} about rules?", answer) for i in range(6)]
    index = StubIndex(rows + [_row(9, "Other?", "Paint dries in a day.", "x")])
    out, stats = build_raft_examples(
        _examples(tmp_path, rows), index=index, fraction=1.0, n_distractors=2, p_no_gold=0.0, system_prompt="S",
        seed=1, judge=Judge(embed=None),
    )  # fmt: skip
    assert stats["citation_like_rewritten"] == 6
    for e in out:
        n = e["raft"]["gold_number"]
        assert set(citation_markers(_target(e))) == {n} and set(MARKER.findall(_target(e))) == {str(n)}
        assert "(2019)" in _target(e) and "(1, 2)" in _target(e)
        assert all(ns == [n] for _, ns in cited_sentences(_target(e)))


def test_distractor_only_rows_show_the_top_non_gold_hits_and_hand_over(tmp_path):
    rows = faq_rows("bygglov")
    index = StubIndex(rows)
    # a near-duplicate entry of row 0's answer: its gold by content, removed like evaluation's gold_removed set does
    dup = SimpleNamespace(chunk_id="dup", source="dup", title="bygglov", text=rows[0]["answer"])
    index.chunks.insert(0, dup)
    out, stats = build_raft_examples(
        _examples(tmp_path, rows), index=index, fraction=1.0, n_distractors=2, p_no_gold=1.0, system_prompt="S",
        seed=0,
    )  # fmt: skip
    assert stats["refusal_targets"] == stats["without_gold"] == 8 and stats["no_gold_target"] == "refusal"
    assert stats["removed_content_gold"] == 1 and stats["distractors"] == 8 * 3
    for e in out:
        assert _target(e) == REFUSAL_ANSWER and e["faq_id"] not in e["raft"]["sources"]
        hits = [h.chunk.source for h in index.search(e["question"], k=20)]
        gold = {e["faq_id"], "dup"} if e["faq_id"] == "bygglov-000" else {e["faq_id"]}
        expected = [s for s in hits if s not in gold]
        assert sorted(e["raft"]["sources"]) == sorted(expected[:3])  # the 3 best-ranked non-gold passages
    assert "dup" not in out[0]["raft"]["sources"] and any("dup" in e["raft"]["sources"] for e in out[1:])


def test_stages_hand_over_by_default_and_keep_the_raft_paper_variant():
    assert StageConfig(name="s", raft=True).raft_no_gold_target == "refusal"
    assert StageConfig(name="s", raft=True, raft_no_gold_target="answer").raft_no_gold_target == "answer"


def test_closed_book_targets_never_teach_a_bracketed_number():
    from tiny_model import make_tiny_tokenizer

    from finetune.data import IGNORE_INDEX
    from finetune.stages import stage_examples

    tok = make_tiny_tokenizer()
    rows = [_row(0, "Which rules apply?", "See [3] and the rules of [2019]."), _row(1, "Hi?", "Hello.")]
    rows = [{**r, "stage": "s"} for r in rows]
    prompts = {"plain": "You help.", "rag": "Cite."}
    out, _, stats = stage_examples(
        StageConfig(name="s"), rows, [], seed=0, tok=tok, prompts=prompts, max_length=256, index=None
    )
    trained = tok.decode([t for t in out[0]["labels"] if t != IGNORE_INDEX])
    assert "See (3) and the rules of (2019)." in trained and "[" not in trained
    assert stats["citation_like_rewritten"] == 1


def test_a_distractor_only_prompt_keeps_one_passage_however_short_the_budget(tmp_path):
    out, stats = build_raft_examples(
        _examples(tmp_path, faq_rows("bygglov", 4)), index=StubIndex(faq_rows("bygglov")), fraction=1.0,
        n_distractors=2, p_no_gold=1.0, system_prompt="S", seed=0, fits=lambda m: False,
    )  # fmt: skip
    assert all(len(e["raft"]["sources"]) == 1 for e in out) and stats["dropped_distractors_for_length"] == 4 * 2
