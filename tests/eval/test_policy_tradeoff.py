"""The citation-policy trade-off is computed from the answers already generated, kind by kind."""

import math

from pipeline.evaluate import citation_policy_tradeoff
from pipeline.report import render_markdown

REPLY = "I'm sorry, I can't find that in our documentation, so I'm handing you over to a colleague."
KINDS = {"faq": "kb", "gone": "gold_removed", "near": "near_domain", "off": "out_of_kb"}


def rec(test_set, *, raw, share=math.nan, handoff=False, answer=None):
    return {
        "test_set": test_set,
        "raw_answer": raw,
        "supported_share": share,
        "handoff": handoff,
        "answer": answer if answer is not None else (raw or REPLY),
    }


def test_each_setting_hands_over_what_its_unsupported_share_says_and_keeps_earlier_handovers():
    records = [
        rec("faq", raw="Fully supported.", share=1.0),
        rec("faq", raw="Mostly supported.", share=0.7),  # 30 % unsupported
        rec("gone", raw="Made up.", share=0.0),
        rec("near", raw="Half made up.", share=0.5),
        rec("off", raw=None, handoff=True, answer=REPLY),  # the gate: a hand-over under every setting
        rec("near", raw=REPLY, share=math.nan),  # the model wrote the hand-over itself
    ]
    rows = {r["policy"]: r for r in citation_policy_tradeoff(records, KINDS, (REPLY,))}
    assert rows["handover > 0% unsupported"]["answerable"] == 0.5
    assert rows["handover > 25% unsupported"]["answerable"] == 0.5
    assert rows["handover > 50% unsupported"]["answerable"] == 0.0
    assert rows["handover > 25% unsupported"]["near_domain"] == 1.0
    assert rows["handover > 50% unsupported"]["near_domain"] == 0.5  # exactly half is not more than half
    assert rows["handover > 50% unsupported"]["gold_removed+near_domain"] == 2 / 3
    keep = rows["keep"]
    assert (keep["answerable"], keep["gold_removed"], keep["near_domain"], keep["out_of_kb"]) == (0.0, 0.0, 0.5, 1.0)


def test_the_report_shows_the_tradeoff_table():
    records = [rec("faq", raw="Fine.", share=1.0), rec("gone", raw="Made up.", share=0.0)]
    results = {
        "run": {"name": "t"},
        "arms": {},
        "citation_policy_tradeoff": {
            "arm": "rag+lora-x",
            "configured": "handover, max_unsupported_share 0.5",
            "rows": citation_policy_tradeoff(records, KINDS, (REPLY,)),
        },
    }
    md = render_markdown(results)
    assert "## Hand-over trade-off of the citation policy" in md
    assert "| keep |" in md and "answerable (false hand-over)" in md
