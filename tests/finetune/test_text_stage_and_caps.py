"""Text stages (continued pre-training on document chunks), the --max-steps cap, time-based checkpoints and
the empty-stage-list error."""

from __future__ import annotations

import json

import pytest
from ft_helpers import chat_rows, tiny_cfg, tiny_model_cfg, write_jsonl

import finetune.train as train_mod
from finetune.config import FinetuneConfig, StageConfig
from finetune.data import IGNORE_INDEX, collate, load_examples, tokenize_text
from finetune.model import load_tokenizer
from finetune.stages import _tokenize_all, run_finetune
from finetune.train import checkpoint_due
from raglora.errors import RagloraError

DOCS = [
    {"id": "manual-1", "text": "A friggebod or attefallshus can often be built without a permit.", "source": "m.md",
     "title": "Permits"},
    {"id": "manual-2", "text": "Demolition needs a rivningslov. " * 30, "source": "m.md", "title": "Demolition"},
]  # fmt: skip


@pytest.fixture()
def tok(tiny_base):
    return load_tokenizer(str(tiny_base), cache_dir=tiny_base.parent)


def _text_data(root):
    write_jsonl(root / "manuals/train.jsonl", DOCS)
    write_jsonl(root / "manuals/validation.jsonl", DOCS[:1])
    write_jsonl(root / "chat/train.jsonl", chat_rows())
    write_jsonl(root / "chat/validation.jsonl", chat_rows()[:2])
    return root


def test_text_rows_load_and_train_on_every_token_split_into_windows(tmp_path, tok):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", DOCS), stage="manuals")
    assert examples[0] == {"id": "manual-1", "stage": "manuals", **{k: DOCS[0][k] for k in ("text", "source", "title")}}
    out, stats = _tokenize_all(tok, examples, "unused system prompt", 64)
    assert stats["split_into_windows"] == 1 and stats["dropped"] == 0
    for e in out:
        assert e["labels"] == e["input_ids"] and e["length"] <= 64  # a label on every token, no chat template
        assert tok.decode(e["input_ids"]).find("<|im_start|>") == -1
    # the long chunk is split, not cut: the windows (overlapping by one token) cover every token
    ids = tok(DOCS[1]["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = tokenize_text(tok, DOCS[1]["text"], 64)
    assert len(windows) > 1
    rebuilt = windows[0]["input_ids"] + [t for w in windows[1:] for t in w["input_ids"][1:]]
    assert rebuilt == ids
    batch = collate(windows[:1], pad_id=tok.pad_token_id)
    assert (batch["labels"][0, 1:] != IGNORE_INDEX).all()  # only position 0 (never predicted) is masked


def test_text_stage_then_chat_stage_with_replay(tiny_base, tmp_path):
    data = _text_data(tmp_path / "data")
    cfg = tiny_cfg(n_stages=0)
    cfg.stages = [
        StageConfig(name="manuals", kind="text", max_steps=2, batch_size=2, lr=1e-2),
        StageConfig(name="chat", max_steps=2, batch_size=2, lr=1e-2, replay_fraction=0.5),
    ]
    out = run_finetune(
        cfg, tiny_model_cfg(tiny_base, max_length=64), data_dir=data, adapters_dir=tmp_path / "a",
        cache_dir=tmp_path / "c", index_dir=None,
    )  # fmt: skip
    assert [s["optimizer_steps"] for s in out] == [2, 2]
    manuals = json.loads((tmp_path / "a/manuals/manifest.json").read_text())
    assert manuals["kind"] == "text" and manuals["data"]["split_into_windows"] == 1
    assert manuals["data"]["train_examples"] > len(DOCS)  # the long chunk became several windows
    assert manuals["metrics"]["validation_loss"]["manuals"] > 0
    chat = json.loads((tmp_path / "a/chat/manifest.json").read_text())
    assert chat["parents"] == ["manuals"] and chat["data"]["replay_examples"] == 2
    assert set(chat["metrics"]["forgetting"]) == {"manuals", "chat"}


def test_text_stage_without_documents_and_empty_stage_list_are_errors(tiny_base, tmp_path):
    kwargs = dict(data_dir=tmp_path, adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c", index_dir=None)
    with pytest.raises(RagloraError, match=r"no stages in finetune\.stages: add at least one \(see raglora init\)"):
        run_finetune(FinetuneConfig(), tiny_model_cfg(tiny_base), **kwargs)
    (tmp_path / "manuals").mkdir()
    (tmp_path / "manuals/train.jsonl").write_text("")
    (tmp_path / "manuals/validation.jsonl").write_text("")
    cfg = FinetuneConfig(stages=[StageConfig(name="manuals", kind="text", max_steps=1)])
    with pytest.raises(RagloraError, match=r"stage manuals \(kind: text\): no document chunks in .*manuals/train"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), **kwargs)
    write_jsonl(tmp_path / "manuals/train.jsonl", chat_rows())
    with pytest.raises(RagloraError, match=r"holds conversations"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), **kwargs)
    assert not (tmp_path / "a" / "manuals").exists()


def test_max_steps_caps_every_stage_and_changes_the_config_hash(tiny_base, stage_data, tmp_path):
    cfg = tiny_cfg(n_stages=2, max_steps=3)
    kwargs = dict(data_dir=stage_data, adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c", index_dir=None)

    def manifest(stage):
        return json.loads((tmp_path / "a" / stage / "manifest.json").read_text())

    out = run_finetune(cfg, tiny_model_cfg(tiny_base), max_steps=1, **kwargs)
    assert [s["optimizer_steps"] for s in out] == [1, 1]
    capped = manifest("general")
    assert capped["max_steps_cap"] == 1
    assert [e["step"] for e in map(json.loads, (tmp_path / "a/general/train_log.jsonl").read_text().splitlines())] == [
        1
    ]
    again = run_finetune(cfg, tiny_model_cfg(tiny_base), max_steps=1, **kwargs)
    assert [s["skipped"] for s in again] == [True, True]
    full = run_finetune(
        cfg, tiny_model_cfg(tiny_base), stages=["general"], **kwargs
    )  # the capped run is not the full one
    assert full[0]["skipped"] is False and full[0]["optimizer_steps"] == 3
    assert manifest("general")["config_hash"] != capped["config_hash"]
    cfg.stages[0].max_steps = None  # epochs: the cap still applies (and never raises the step count)
    epochs = run_finetune(cfg, tiny_model_cfg(tiny_base), stages=["general"], max_steps=100, **kwargs)
    assert epochs[0]["optimizer_steps"] == 2  # 1 epoch of 4 rows at batch size 2
    with pytest.raises(RagloraError, match="max-steps"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), max_steps=0, **kwargs)


def test_checkpoint_due_by_steps_or_minutes():
    assert checkpoint_due(10, save_steps=5, save_minutes=5, since_last=0)
    assert not checkpoint_due(11, save_steps=5, save_minutes=5, since_last=10_000)
    assert not checkpoint_due(3, save_steps=None, save_minutes=5, since_last=299)
    assert checkpoint_due(3, save_steps=None, save_minutes=5, since_last=300)


def test_save_minutes_checkpoints_by_wall_time(tiny_base, stage_data, tmp_path, monkeypatch):
    clock = {"t": 0.0}
    saved: list[int] = []
    real_collate, real_save = train_mod.collate, train_mod.save_checkpoint

    def slow_collate(*a, **kw):  # every training micro-batch takes 31 s of (fake) wall time
        if "packing" in kw:
            clock["t"] += 31
        return real_collate(*a, **kw)

    def spy(*a, **kw):
        saved.append(kw["step"])
        return real_save(*a, **kw)

    monkeypatch.setattr(train_mod, "_now", lambda: clock["t"])
    monkeypatch.setattr(train_mod, "collate", slow_collate)
    monkeypatch.setattr(train_mod, "save_checkpoint", spy)
    cfg = tiny_cfg(n_stages=1, max_steps=5, save_steps=None, save_minutes=1.0)
    run_finetune(
        cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c",
        index_dir=None,
    )  # fmt: skip
    assert saved == [2, 4]  # 62 s after the start, then 62 s after that checkpoint; never after the last step
