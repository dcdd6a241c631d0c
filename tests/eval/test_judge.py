"""The groundedness judge (one batched embed call, per-passage support), its calibration, sentence/marker pairing
and citation precision/recall, against hand-computed cases."""

import math

import numpy as np
import pytest

from pipeline.metrics import Judge, calibrate_judge, citation_scores, cited_sentences, groundedness


def topic_embed(texts):
    """One axis per topic word (+ a small constant), so cosines are easy by hand: same topic ~1.0, other ~0.01."""
    topics = ["deck", "roof", "garage"]
    return np.array([[float(t in s.lower()) for t in topics] + [0.1] for s in texts])


class CountingEmbed:
    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return topic_embed(texts)


DECK = "A deck under 1.8 metres above ground normally does not require a permit."
ROOF = "A roof over the deck changes that. Then it counts as a building."
GARAGE = "Garages larger than 30 square metres need a building permit."


def test_support_is_a_sentence_by_passage_matrix_from_one_embed_call():
    embed = CountingEmbed()
    judge = Judge(embed=embed, threshold=0.6)
    # "deck" sentence: cos 1.0 with DECK (deck axis), ~0.99 with ROOF's "roof over the deck" sentence -> both;
    # "garage" sentence: only GARAGE shares its axis
    s = judge.support(["Your deck is fine.", "The garage is big."], [DECK, ROOF, GARAGE])
    assert s.tolist() == [[True, True, False], [False, False, True]]
    assert embed.calls == 1
    assert judge.support([], [DECK]).shape == (0, 1) and judge.support(["x"], []).shape == (1, 0)


def test_support_by_ngram_overlap_alone_is_judged_per_passage():
    judge = Judge(embed=None)
    # content trigrams of the sentence: (normally require permit) is in DECK; half of one gram set -> 1/1 >= 0.5
    s = judge.support(["Normally does not require a permit.", "Garages need a building permit."], [DECK, GARAGE])
    assert s.tolist() == [[True, False], [False, True]]
    # grams split over two passages support in neither: "deck metres" from DECK, "building permit" from GARAGE
    assert not Judge(embed=None).support(["deck metres building permit"], [DECK, GARAGE]).any()


def test_overlap_above_one_switches_the_ngram_rule_off():
    # no topic axis in common with DECK (cos ~0.0099) but every trigram is in it
    sentence = "normally does not require permit"
    assert Judge(embed=topic_embed).support([sentence], [DECK])[0, 0]
    assert not Judge(embed=topic_embed, overlap=math.inf).support([sentence], [DECK])[0, 0]


def test_groundedness_is_the_share_of_sentences_some_passage_supports():
    answer = "Your deck is fine. Garages are another matter."
    assert groundedness(answer, [DECK], embed=topic_embed) == 0.5
    assert groundedness(answer, [DECK, GARAGE], embed=topic_embed) == 1.0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("A deck needs no permit [1]. Garages do.", [("A deck needs no permit.", [1]), ("Garages do.", [])]),
        ("A deck needs no permit. [1] Garages do. [2][3]", [("A deck needs no permit.", [1]), ("Garages do.", [2, 3])]),
        ("A deck [2] needs no permit [1, 3].", [("A deck needs no permit.", [2, 1, 3])]),
        ("A deck needs no permit.\n[1]\nGarages do [2].", [("A deck needs no permit.", [1]), ("Garages do.", [2])]),
        ("[1] A deck needs no permit.", [("A deck needs no permit.", [1])]),
        ("No markers here. None at all!", [("No markers here.", []), ("None at all!", [])]),
        ("", []),
        ("[1][2]", []),
    ],
)
def test_cited_sentences_attach_markers_inside_or_right_after_a_sentence(answer, expected):
    assert cited_sentences(answer) == expected


def test_cited_sentences_stay_linear_on_adversarial_input():
    for text in (" " * 100_000 + "x", "." * 100_000, "[1," * 30_000, ". [1]" * 20_000):
        assert isinstance(cited_sentences(text), list)


def test_citation_precision_and_recall_by_hand():
    judge = Judge(embed=topic_embed)
    passages = {1: DECK, 2: GARAGE}
    # sentence 1 cites [1] (supports) and [2] (does not); sentence 2 cites [2] (supports) -> precision 2/3, recall 1
    answer = "Your deck is fine [1][2]. The garage needs a permit [2]."
    assert citation_scores(answer, passages, judge) == pytest.approx({"precision": 2 / 3, "recall": 1.0})
    # sentence 2 cites nothing: it counts against recall, not precision -> precision 1/2, recall 1/2
    answer = "Your deck is fine [1][2]. The garage needs a permit."
    assert citation_scores(answer, passages, judge) == pytest.approx({"precision": 0.5, "recall": 0.5})


def test_marker_before_or_after_the_full_stop_scores_the_same():
    judge = Judge(embed=topic_embed)
    passages = {1: DECK, 2: GARAGE}
    inside = citation_scores("Your deck is fine [1]. The garage is big [2].", passages, judge)
    after = citation_scores("Your deck is fine. [1] The garage is big. [2]", passages, judge)
    assert inside == after == {"precision": 1.0, "recall": 1.0}


def test_a_marker_number_not_among_the_passages_is_unsupported():
    judge = Judge(embed=topic_embed)
    # "[3]" reads like a marker but there is no passage 3: that pair is unsupported and supports nothing
    scores = citation_scores("Your deck is fine [1][3].", {1: DECK, 2: GARAGE}, judge)
    assert scores == {"precision": 0.5, "recall": 1.0}
    scores = citation_scores("The deck rule [3] says so.", {1: DECK, 2: GARAGE}, judge)
    assert scores == {"precision": 0.0, "recall": 0.0}


def test_citation_scores_are_nan_when_not_applicable():
    judge = Judge(embed=topic_embed)
    no_marker = citation_scores("Your deck is fine.", {1: DECK}, judge)
    assert math.isnan(no_marker["precision"]) and no_marker["recall"] == 0.0
    empty = citation_scores("[1] !!", {1: DECK}, judge)
    assert math.isnan(empty["precision"]) and math.isnan(empty["recall"])


def test_calibrate_judge_labels_pairs_from_knowledge_base_passages():
    from fake_embedder import FakeEmbedder

    texts = [
        f"Topic {w} is about {w} things. Every {w} needs a {w} permit. Ask the {w} office."
        for w in ("roof", "deck", "garage", "sauna", "fence")
    ]
    embedder = FakeEmbedder()
    result = calibrate_judge(texts, lambda t: embedder.encode(list(t)), n_pairs=5)
    assert result["n_supported"] == 5 and result["n_unsupported"] == 5
    assert 0.0 <= result["threshold"] <= 1.0 and "balanced accuracy" in result["method"]
    assert calibrate_judge(texts[:2], topic_embed, n_pairs=5)["threshold"] == 0.6  # too few passages: default


def test_calibration_positives_restate_a_passage_sentence_loosely_in_order():
    import numpy as np

    from pipeline.metrics import _reword

    sentence = "A deck lower than 1.8 metres above the ground does not require a building permit here"
    for seed in range(20):
        out = _reword(sentence, np.random.default_rng(seed)).split()
        words = sentence.split()
        assert len(words) // 2 <= len(out) <= len(words)
        it = iter(words)
        assert all(w in it for w in out)  # a subsequence: words left out, none added or reordered
