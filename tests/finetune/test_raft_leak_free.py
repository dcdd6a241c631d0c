"""RAFT gold passages via GoldFinder and leak-freedom: held-out rows' gold chunks never reach a training prompt."""

from __future__ import annotations

import json
from types import SimpleNamespace

from ft_helpers import StubIndex, faq_rows, tiny_model_cfg, write_jsonl

import finetune.raft as raft_mod
from finetune.config import FinetuneConfig, StageConfig
from finetune.data import load_examples
from finetune.raft import build_raft_examples, held_out_gold_chunks
from finetune.stages import held_out_rows, run_finetune
from retriever.gold import GoldFinder

TRAIN = [
    ("How do I bleed a radiator?", "Open the bleed valve with a radiator key until water comes out."),
    ("Why is my heat pump noisy?", "Check that the outdoor unit stands level on its rubber feet."),
    ("How often should a boiler be serviced?", "Have the boiler serviced by an engineer once a year."),
    ("What pressure should the heating system have?", "Keep the pressure gauge between one and two bar."),
]
HELD_OUT = [
    ("My radiator is cold at the top, why?", "Trapped air collects at the top; bleeding releases the pocket."),
    ("The heat pump shows error E5, what now?", "Error E5 means low refrigerant; call a certified installer."),
]


def _qa(pairs, prefix):
    return [
        {"id": f"{prefix}-{i}", "category": "heating", "question": q, "answer": a,
         "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(pairs)
    ]  # fmt: skip


class AdversarialIndex(StubIndex):
    """The retriever ranks the held-out rows' chunks first for every query: the worst case for leaks."""

    def __init__(self, rows, first_ids):
        super().__init__(rows)
        self.first = set(first_ids)
        for c, r in zip(self.chunks, rows, strict=True):  # a Q/A knowledge base indexes question and answer
            c.text = f"{r['question']} {r['answer']}"

    def search(self, query, *, k, mode="hybrid", filters=None):
        ranked = sorted(self.chunks, key=lambda c: c.chunk_id not in self.first)
        return [SimpleNamespace(chunk=c, score=1.0 / (i + 1)) for i, c in enumerate(ranked[:k])]


def _examples(tmp_path, rows):
    return load_examples(write_jsonl(tmp_path / "train.jsonl", rows), stage="heating")


def _contexts(example) -> str:
    return example["messages"][1]["content"]


def test_held_out_gold_chunks_are_never_distractors_nor_inside_any_training_context(tmp_path):
    train, held = _qa(TRAIN, "t"), _qa(HELD_OUT, "h")
    index = AdversarialIndex(train + held, first_ids=[r["id"] for r in held])
    # a training row with no chunk of its own whose answer nearly duplicates a held-out one: by content, its
    # gold would be the held-out row's chunk (held-out question included)
    dup = _qa([("Why is only the top of my radiator cold?", "Trapped air collects at the top; bleeding the radiator "
                "releases the air pocket.")], "dup")  # fmt: skip
    finder = GoldFinder(index.chunks)
    exclude = held_out_gold_chunks(finder, held)
    assert exclude == {"h-0", "h-1"} and finder.by_content(dup[0]["answer"]) == ["h-0"]
    kw = dict(index=index, fraction=1.0, n_distractors=2, p_no_gold=0.0, system_prompt="S", seed=0)

    leaky, _ = build_raft_examples(_examples(tmp_path, train + dup), **kw)  # without the exclusion: leaks
    assert any(q in _contexts(e) for e in leaky for q, _ in HELD_OUT)

    out, stats = build_raft_examples(_examples(tmp_path, train + dup), gold_finder=finder, exclude_chunks=exclude, **kw)
    assert stats["raft_examples"] == 5 and stats["excluded_gold_chunks"] == 2
    assert stats["skipped_held_out_distractors"] > 0 and stats["distractors"] == 10
    assert stats["gold_by_source"] == 4 and stats["gold_fallback"] == stats["gold_withheld_held_out"] == 1
    for e in out:
        assert not set(e["raft"]["sources"]) & exclude
        for q, a in HELD_OUT:
            assert a not in _contexts(e) and q not in _contexts(e)
        assert e["raft"]["sources"].count(e["id"]) == 1  # the gold passage, once: own gold is never a distractor
    assert "bleeding the radiator releases the air pocket" in _contexts(out[-1])  # its own answer stands in


def test_gold_found_by_source_file_name_for_a_docs_kb(tmp_path):
    docs = {
        "/data/helpcenter/heat-pumps.md": "Heat pumps: keep the outdoor unit level and free of snow.",
        "/data/helpcenter/boilers.md": "Boilers: an engineer should service the boiler once a year.",
        "/data/helpcenter/radiators.md": "Radiators: bleed them with a radiator key when cold at the top.",
    }
    chunks = [
        SimpleNamespace(chunk_id=f"c{i}", source=src, title=src.rsplit("/", 1)[1], text=text)
        for i, (src, text) in enumerate(docs.items())
    ]
    index = SimpleNamespace(
        chunks=chunks, search=lambda q, *, k, mode="hybrid": [SimpleNamespace(chunk=c) for c in chunks[:k]]
    )
    rows = _qa(TRAIN[:3], "ticket")
    for row, name in zip(rows, ["radiators.md", "heat-pumps.md", "nowhere.md"], strict=True):
        row["source"] = name  # tickets name the page that answers them, not its path
    rows[2]["answer"] = "Something no page says at all, verbatim or otherwise."
    rows[2]["messages"][1]["content"] = rows[2]["answer"]
    out, stats = build_raft_examples(
        _examples(tmp_path, rows), index=index, fraction=1.0, n_distractors=1, p_no_gold=0.0, system_prompt="S", seed=0
    )
    assert (stats["gold_by_source"], stats["gold_by_content"], stats["gold_fallback"]) == (2, 0, 1)
    assert "/data/helpcenter/radiators.md" in out[0]["raft"]["sources"]
    assert "bleed them with a radiator key" in _contexts(out[0])
    assert "/data/helpcenter/heat-pumps.md" in out[1]["raft"]["sources"]
    # the distractor of a row is never a chunk of its own source
    assert out[0]["raft"]["sources"].count("/data/helpcenter/radiators.md") == 1
    assert "Something no page says" in _contexts(out[2])  # fallback: the row's own answer as the gold passage


def test_gold_found_by_content_when_the_row_names_no_source(tmp_path):
    rows = faq_rows("bygglov", 3)
    index = StubIndex(rows)
    for c in index.chunks:  # chunks no longer carry the row ids: only their text can match
        c.source = c.chunk_id = f"page-{c.chunk_id}"
    out, stats = build_raft_examples(
        _examples(tmp_path, rows), index=index, fraction=1.0, n_distractors=1, p_no_gold=0.0, system_prompt="S", seed=0
    )
    assert stats["gold_by_content"] == 3 and stats["gold_fallback"] == 0
    assert all(f"page-{e['id']}" in e["raft"]["sources"] for e in out)


def test_held_out_rows_are_validation_and_test_of_every_chat_stage(tmp_path):
    write_jsonl(tmp_path / "a/validation.jsonl", _qa(HELD_OUT[:1], "va"))
    write_jsonl(tmp_path / "a/test.jsonl", _qa(HELD_OUT[1:], "te"))
    write_jsonl(tmp_path / "b/test.jsonl", _qa(TRAIN[:1], "tb"))
    write_jsonl(tmp_path / "docs/validation.jsonl", [{"id": "d", "text": "a page", "source": "x.md", "title": "x"}])
    cfg = FinetuneConfig(
        stages=[
            StageConfig(name="docs", kind="text"),
            StageConfig(name="a"),
            StageConfig(name="b"),
        ]
    )
    assert sorted(r["id"] for r in held_out_rows(cfg, tmp_path)) == ["tb-0", "te-0", "va-0"]


def test_a_raft_stage_never_shows_held_out_rows_end_to_end(tiny_base, tmp_path, monkeypatch):
    train, held = _qa(TRAIN, "t"), _qa(HELD_OUT, "h")
    data = tmp_path / "data"
    write_jsonl(data / "heating/train.jsonl", train)
    write_jsonl(data / "heating/validation.jsonl", held[:1])
    write_jsonl(data / "heating/test.jsonl", held[1:])
    built = []
    real = raft_mod.build_raft_examples

    def spy(*a, **kw):
        out, stats = real(*a, **kw)
        built.extend(e for e in out if "raft" in e)
        return out, stats

    monkeypatch.setattr(raft_mod, "build_raft_examples", spy)
    stage = StageConfig(name="heating", raft=True, raft_fraction=1.0, raft_p_no_gold=0.0, max_steps=1, batch_size=2)
    out = run_finetune(
        FinetuneConfig(stages=[stage]), tiny_model_cfg(tiny_base), data_dir=data, adapters_dir=tmp_path / "a",
        cache_dir=tmp_path / "c", index_dir=None, index=AdversarialIndex(train + held, [r["id"] for r in held]),
    )  # fmt: skip
    assert out[0]["optimizer_steps"] == 1 and len(built) == len(TRAIN)
    for e in built:
        for q, a in HELD_OUT:
            assert q not in _contexts(e) and a not in _contexts(e)
    raft = json.loads((tmp_path / "a/heating/manifest.json").read_text())["data"]["raft"]
    assert raft["excluded_gold_chunks"] == 2 and raft["gold_by_source"] == len(TRAIN)


def test_a_page_a_held_out_ticket_cites_is_still_gold_for_training_tickets_but_never_a_distractor(tmp_path):
    docs = {
        "/kb/radiators.md": "Radiators: bleed them with a radiator key when they are cold at the top.",
        "/kb/heat-pumps.md": "Heat pumps: keep the outdoor unit level and free of snow and ice.",
        "/kb/boilers.md": "Boilers: an engineer should service the boiler once a year.",
    }
    chunks = [SimpleNamespace(chunk_id=f"c{i}", source=s, title="", text=t) for i, (s, t) in enumerate(docs.items())]
    index = SimpleNamespace(
        chunks=chunks, search=lambda q, *, k, mode="hybrid": [SimpleNamespace(chunk=c) for c in chunks[:k]]
    )
    train, held = _qa(TRAIN[:2], "ticket"), _qa(HELD_OUT[:1], "held")
    train[0]["source"], train[1]["source"], held[0]["source"] = "radiators.md", "heat-pumps.md", "radiators.md"
    finder = GoldFinder(chunks)
    exclude = held_out_gold_chunks(finder, held)
    assert exclude == {"c0"} and raft_mod.held_out_row_chunks(finder, held) == set()  # a page, not the held-out row
    out, stats = build_raft_examples(
        _examples(tmp_path, train), index=index, fraction=1.0, n_distractors=2, p_no_gold=0.0, system_prompt="S",
        seed=0, gold_finder=finder, exclude_chunks=exclude, withhold_chunks=set(),
    )  # fmt: skip
    assert out[0]["raft"]["sources"].count("/kb/radiators.md") == 1 and stats["gold_withheld_held_out"] == 0
    assert "/kb/radiators.md" not in out[1]["raft"]["sources"]  # never another row's distractor
