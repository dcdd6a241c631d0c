"""Trust-Score metrics by hand: grounded-refusal F1, citation F1, the trust score's composition, and their
bootstrap intervals over items."""

import math

import pytest

from pipeline.metrics import citation_f1, grounded_refusal_f1, trust_components, trust_metrics

NAN = math.nan
# three answerable items (the second refused), two unanswerable (the first refused)
ANSWERABLE = [True, True, True, False, False]
REFUSED = [False, True, False, True, False]


def test_grounded_refusal_f1_is_the_macro_f1_of_refuse_and_answer_by_hand():
    # refuse class: predicted {1, 3}, positives {3, 4}: P = R = 1/2 -> F1 1/2
    # answer class: predicted {0, 2, 4}, positives {0, 1, 2}: P = R = 2/3 -> F1 2/3
    assert grounded_refusal_f1(ANSWERABLE, REFUSED) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert grounded_refusal_f1(ANSWERABLE, [False, False, False, True, True]) == 1.0
    # never refusing: the refuse class is never predicted (F1 0); answer: P 3/5, R 1 -> 3/4
    assert grounded_refusal_f1(ANSWERABLE, [False] * 5) == pytest.approx((0 + 0.75) / 2)


def test_grounded_refusal_f1_needs_both_kinds_of_item():
    assert math.isnan(grounded_refusal_f1([True, True], [False, True]))
    assert math.isnan(grounded_refusal_f1([False], [True]))
    with pytest.raises(ValueError):
        grounded_refusal_f1([True], [True, False])


def test_citation_f1_is_zero_for_an_arm_that_never_cites_and_nan_with_nothing_to_cite():
    assert citation_f1(1.0, 0.5) == pytest.approx(2 / 3)
    assert citation_f1(NAN, 0.0) == 0.0  # closed book: nothing cited, nothing supported
    assert citation_f1(0.0, 0.0) == 0.0
    assert math.isnan(citation_f1(NAN, NAN))


def test_trust_score_is_the_mean_of_its_three_parts_by_hand():
    parts = trust_components(
        ANSWERABLE,
        REFUSED,
        correctness=[0.6, NAN, 0.2, NAN, NAN],  # answered answerable: items 0 and 2 -> 0.4
        citation_precision=[1.0, NAN, NAN, NAN, NAN],  # item 2 cited nothing -> P = 1.0
        citation_recall=[1.0, NAN, 0.0, NAN, NAN],  # -> R = 0.5, citation F1 = 2/3
    )
    assert parts["grounded_refusal_f1"] == pytest.approx(7 / 12)
    assert parts["answer_correctness"] == pytest.approx(0.4)
    assert parts["citation_f1"] == pytest.approx(2 / 3)
    assert parts["trust_score"] == pytest.approx((7 / 12 + 0.4 + 2 / 3) / 3)


def test_refusing_every_answerable_question_earns_no_correctness_and_no_citations():
    parts = trust_components([True, False], [True, True], [NAN, NAN], [NAN, NAN], [NAN, NAN])
    assert parts["answer_correctness"] == 0.0 and parts["citation_f1"] == 0.0
    assert parts["grounded_refusal_f1"] == pytest.approx((2 / 3 + 0) / 2)  # refuse: P 1/2, R 1
    # an answer with nothing checkable (recall n/a, e.g. empty) supported nothing by citing: recall 0
    assert trust_components([True, False], [False, True], [0.0, NAN], [NAN, NAN], [NAN, NAN])["citation_f1"] == 0.0
    only_answerable = trust_components([True], [False], [1.0], [1.0], [1.0])
    assert math.isnan(only_answerable["trust_score"])  # no unanswerable item: grounded refusals unmeasured


def test_trust_metrics_bootstrap_over_items_brackets_the_point():
    items = [
        {"answerable": a, "refused": r, "correctness": c, "citation_precision": p, "citation_recall": q}
        for a, r, c, p, q in zip(
            ANSWERABLE * 4,
            REFUSED * 4,
            [0.6, None, 0.2, None, None] * 4,
            [1.0, None, None, None, None] * 4,
            [1.0, None, 0.0, None, None] * 4,
            strict=True,
        )
    ]
    out = trust_metrics(items, n_resamples=200)
    assert set(out) == {"grounded_refusal_f1", "answer_correctness", "citation_f1", "trust_score"}
    t = out["trust_score"]
    assert t["mean"] == pytest.approx((7 / 12 + 0.4 + 2 / 3) / 3) and t["n"] == 20
    assert t["low"] <= t["mean"] <= t["high"] and t["low"] < t["high"]
    assert trust_metrics(items, n_resamples=200) == out  # seeded
