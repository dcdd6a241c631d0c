"""Groundedness (both rules and their OR), its threshold calibration, citations, refusals, retrieval hits."""

import math

import numpy as np
import pytest

from pipeline.metrics import (
    calibrate_groundedness_threshold,
    citation_markers,
    citation_precision,
    groundedness,
    has_citation,
    is_refusal,
    ngram_support,
)
from retriever.evaluate import hit_ks, retrieval_hits, retrieval_metrics

CONTEXT = ["A deck under 1.8 metres above ground normally does not require a permit. Roofs change that."]


def topic_embed(texts):
    """Fake embedder: one axis per topic word, so similarities are easy to compute by hand."""
    topics = ["deck", "roof", "garage"]
    return np.array([[float(t in s.lower()) for t in topics] + [0.1] for s in texts])


def test_ngram_support_counts_content_word_trigrams_found_in_context():
    # content words: deck 18 metres above ground ("under" is a stopword) -> 3 trigrams, all in the context
    assert ngram_support("The deck under 1.8 metres above ground.", CONTEXT) == 1.0
    # "deck", "permit", "garage", "metres": trigrams (deck permit garage), (permit garage metres): none in context
    assert ngram_support("A deck permit garage metres.", CONTEXT) == 0.0
    # fewer content words than n: the whole content sequence is one shorter gram
    assert ngram_support("Roofs change.", CONTEXT) == 1.0
    assert math.isnan(ngram_support("It is.", CONTEXT))


def test_groundedness_ngram_rule_is_share_of_supported_sentences():
    answer = "A deck under 1.8 metres above ground needs no permit. Garages need a structural engineer always."
    assert groundedness(answer, CONTEXT, method="ngram") == 0.5


def test_groundedness_embedding_rule_uses_max_similarity_to_context_sentences():
    # sentence 1 mentions deck: vector (1,0,0,.1) vs context sentence 1 (1,0,0,.1) -> cos 1.0 >= 0.6
    # sentence 2 mentions garage only: (0,0,1,.1) vs (1,0,0,.1) -> .01/1.01 ~ .0099; vs roof sentence (0,1,0,.1) same
    answer = "Your deck is fine without paperwork. A garage is another matter entirely."
    assert groundedness(answer, CONTEXT, embed=topic_embed, method="embedding") == 0.5
    assert groundedness(answer, CONTEXT, embed=topic_embed, method="embedding", threshold=0.001) == 1.0


def test_groundedness_either_is_the_or_of_both_rules():
    # sentence 1: embedding-supported only; sentence 2: trigram-supported only (no topic word); sentence 3: neither
    answer = "Your deck is fine. Normally does not require permit. Garages are different."
    ctx = ["A deck under 1.8 metres above ground normally does not require a permit."]
    assert groundedness(answer, ctx, embed=topic_embed, method="embedding") == pytest.approx(1 / 3)
    assert groundedness(answer, ctx, method="ngram") == pytest.approx(1 / 3)
    assert groundedness(answer, ctx, embed=topic_embed) == pytest.approx(2 / 3)


def test_groundedness_is_nan_without_checkable_sentences_and_zero_without_context():
    assert math.isnan(groundedness("", CONTEXT))
    assert math.isnan(groundedness("[1] ... !!", CONTEXT))
    assert groundedness("A deck needs paperwork.", [], embed=topic_embed) == 0.0


def test_groundedness_rejects_unknown_method_and_embedding_without_embedder():
    with pytest.raises(ValueError):
        groundedness("x", CONTEXT, method="vibes")
    with pytest.raises(ValueError):
        groundedness("x", CONTEXT, method="embedding")


def test_groundedness_survives_odd_and_huge_input():
    for answer in ["\x00\x1f\x7f", "🙂🙂", "Deck. " * 20_000]:
        v = groundedness(answer, CONTEXT + ["\x00"], embed=topic_embed)
        assert math.isnan(v) or 0.0 <= v <= 1.0


def test_calibration_picks_threshold_with_best_balanced_accuracy():
    # similarities: supported pairs 1.0 and ~0.99 (deck/deck, roof/roof), unsupported ~0.0099 (garage vs deck)
    supported = [("deck talk", "deck text"), ("roof talk", "roof text")]
    unsupported = [("garage talk", "deck text"), ("garage chat", "roof text"), ("deck info", "garage text")]
    cal = calibrate_groundedness_threshold(supported, unsupported, topic_embed)
    assert 0.0099 < cal["threshold"] < 0.99
    assert cal["balanced_accuracy"] == 1.0 and cal["true_positive_rate"] == 1.0 and cal["true_negative_rate"] == 1.0
    assert cal["n_supported"] == 2 and cal["n_unsupported"] == 3
    assert cal["ngram_balanced_accuracy"] == 0.5  # no content trigram shared in any pair: all predicted unsupported
    with pytest.raises(ValueError):
        calibrate_groundedness_threshold(supported, [], topic_embed)


def test_calibration_with_overlapping_scores_trades_off_rates():
    # supported scores {1.0, ~0.0099}; unsupported {~0.0099}: best is to call only 1.0 supported -> TPR .5, TNR 1
    cal = calibrate_groundedness_threshold([("deck", "deck"), ("garage", "deck")], [("roof", "deck")], topic_embed)
    assert cal["balanced_accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("A permit is needed [1].", [1]),
        ("See [2, 3] and [1][2].", [2, 3, 1]),
        ("Odd spacing [ 4 ; 5 ] here.", [4, 5]),
        ("No citations, [a] or [] or [1234].", []),
        ("", []),
    ],
)
def test_citation_markers_parse_single_lists_and_adjacent_markers(answer, expected):
    assert citation_markers(answer) == expected
    assert has_citation(answer) == bool(expected)


def test_citation_precision_is_share_of_cited_chunks_from_gold_entry():
    sources = {1: "faq-001", 2: "faq-002", 3: "faq-001"}
    assert citation_precision("Yes [1][3].", sources, "faq-001") == 1.0
    assert citation_precision("Yes [1, 2].", sources, "faq-001") == 0.5
    assert citation_precision("Yes [1][9].", sources, "faq-001") == 0.5  # [9] was never in the prompt
    assert math.isnan(citation_precision("Yes.", sources, "faq-001"))


@pytest.mark.parametrize(
    "answer",
    [
        "I don't know.",
        "I’m unable to answer that from the information I have.",
        "I do not have enough information to answer that.",
        "The provided context does not mention garages.",
        "That is not covered in the provided documents.",
        "Let me connect you with a colleague who can help.",
        "I will forward your question to a colleague.",
        "Would you like to speak with a human agent?",
        "I can hand you over to our customer service.",
        "I'm sorry, but I cannot answer questions about car insurance.",
        "This is outside my knowledge.",
        "I'm sorry, but as a service assistant, I'm not equipped to provide information on your invoices.",
        "Jag vet inte, men jag kan koppla dig till en kollega.",
    ],
)
def test_is_refusal_detects_declines_and_handovers(answer):
    assert is_refusal(answer)


def test_is_refusal_detects_the_bots_own_canned_handover_and_refusal_replies():
    from finetune.prompt import REFUSAL_ANSWER
    from pipeline.answer import HANDOFF_REPLY, LOW_SCORE_REPLY

    for reply in (REFUSAL_ANSWER, HANDOFF_REPLY, LOW_SCORE_REPLY):
        assert is_refusal(reply), reply


@pytest.mark.parametrize(
    "answer",
    [
        "You cannot build a deck higher than 1.8 metres without a permit.",
        "I know a permit is required for that.",
        "Transfer the permit to the new owner when you sell.",
        "We recommend that you hire a structural engineer.",
        "The context of the rule is PBL 9 kap. 4 §.",
        "Contact the building committee; they can help.",
        "You do not have to apply for a permit.",
        "The scaffold is not equipped to carry that load.",
        "If the neighbour doesn't know about the plank, ask for written consent.",
        "Du kan prata med kommunen.",
        "",
    ],
)
def test_is_refusal_ignores_ordinary_answers(answer):
    assert not is_refusal(answer)


def test_retrieval_hits_hand_computed():
    ranked = ["b", "c", "gold", "d", "gold"]
    assert retrieval_hits(ranked, "gold") == {"hit@1": 0.0, "hit@5": 1.0, "hit@10": 1.0, "mrr": pytest.approx(1 / 3)}
    assert retrieval_hits(["gold"], "gold", ks=(1,)) == {"hit@1": 1.0, "mrr": 1.0}
    assert retrieval_hits(["a"] * 7, "gold", ks=(5,)) == {"hit@5": 0.0, "mrr": 0.0}
    assert retrieval_hits([], "gold") == {"hit@1": 0.0, "hit@5": 0.0, "hit@10": 0.0, "mrr": 0.0}


def test_retrieval_hits_count_any_gold_passage_and_read_nan_without_gold():
    ranked = ["a", "doc-2", "doc-1"]
    assert retrieval_hits(ranked, ["doc-1", "doc-2"], ks=(1, 3)) == {"hit@1": 0.0, "hit@3": 1.0, "mrr": 0.5}
    for gold in ([], None, ""):
        assert all(math.isnan(v) for v in retrieval_hits(ranked, gold, ks=(1, 3)).values())
    # Aggregates leave questions without gold out instead of counting them as misses.
    m = retrieval_metrics([["g"], ["x"]], ["g", []], ks=(1,))
    assert m == {"n": 1, "hit@1": 1.0, "mrr": 1.0}


@pytest.mark.parametrize(("k", "ks"), [(1, (1,)), (3, (1, 3)), (5, (1, 5))])
def test_hit_ks_follow_the_number_of_passages_retrieved(k, ks):
    assert hit_ks(k) == ks


def test_citation_precision_against_a_set_of_gold_passages_and_without_gold():
    by_number = {1: "c1", 2: "c2", 3: "c9"}
    assert citation_precision("See [1] and [3].", by_number, ["c1", "c2"]) == 0.5
    assert citation_precision("See [1][2].", by_number, {"c1", "c2"}) == 1.0
    assert math.isnan(citation_precision("See [1].", by_number, []))
    assert math.isnan(citation_precision("See [1].", by_number, None))


def test_the_projects_own_handover_reply_counts_as_a_refusal_in_any_language():
    reply = "Det vet jag tyvärr inte. Vill du prata med en kollega?"
    german = "Das weiß ich leider nicht. Soll ich Sie mit einem Kollegen verbinden?"
    assert not is_refusal(german)
    assert is_refusal("Das weiß ich LEIDER nicht! Soll ich...", [german])
    assert is_refusal(reply, [reply]) and not is_refusal("Das Dach braucht eine Genehmigung.", [german])
