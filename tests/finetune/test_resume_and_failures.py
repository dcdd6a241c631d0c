"""Checkpoints/resume continue the loss curve exactly; failures never damage trained stages; pinned losses."""

from __future__ import annotations

import hashlib
import json

import pytest
from ft_helpers import tiny_cfg, tiny_model_cfg, write_jsonl

import finetune.train as train_mod
from finetune.stages import run_finetune
from finetune.train import TrainingInterrupted
from raglora.errors import RagloraError


def _log(adapters, stage):
    return [json.loads(x) for x in (adapters / stage / "train_log.jsonl").read_text().splitlines()]


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _interrupt_at_call(monkeypatch, n, exc):
    calls = {"n": 0}
    real = train_mod.collate

    def flaky(*a, **kw):
        if "packing" in kw:  # training micro-batches only (evaluation batches are collated without it)
            calls["n"] += 1
            if calls["n"] == n:
                raise exc
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "collate", flaky)


def test_seeded_two_step_losses_are_pinned(tiny_base, stage_data, tmp_path):
    cfg = tiny_cfg(n_stages=1)
    kwargs = dict(data_dir=stage_data, cache_dir=tmp_path / "c", index_dir=None)
    run_finetune(cfg, tiny_model_cfg(tiny_base), adapters_dir=tmp_path / "a", **kwargs)
    losses = [e["loss"] for e in _log(tmp_path / "a", "general")]
    assert losses == pytest.approx([5.9565, 5.9450], abs=1e-3)  # step 2 moved with FastDropout's random stream
    run_finetune(cfg, tiny_model_cfg(tiny_base), adapters_dir=tmp_path / "b", **kwargs)
    assert [e["loss"] for e in _log(tmp_path / "b", "general")] == losses  # bit-for-bit reproducible


def test_resume_continues_the_step_count_and_the_loss_curve(tiny_base, stage_data, tmp_path, monkeypatch):
    cfg = tiny_cfg(n_stages=1, max_steps=4, save_steps=2)
    cfg.lora.lora_dropout = 0.3  # RNG state matters: it must be restored too
    kwargs = dict(data_dir=stage_data, cache_dir=tmp_path / "c", index_dir=None)
    run_finetune(cfg, tiny_model_cfg(tiny_base), adapters_dir=tmp_path / "ref", **kwargs)
    reference = _log(tmp_path / "ref", "general")

    _interrupt_at_call(monkeypatch, 4, KeyboardInterrupt())  # 4th micro-batch = step 4 (save_steps=2 saved step 2)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), adapters_dir=tmp_path / "a", **kwargs)
    monkeypatch.undo()
    ckpt = tmp_path / "a" / ".checkpoints" / "general"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000003"]  # Ctrl-C saved the last finished step
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "plan.json", "state.json"} <= {
        p.name for p in (ckpt / "step-000003").iterdir()
    }
    assert not (tmp_path / "a" / "general").exists()

    out = run_finetune(cfg, tiny_model_cfg(tiny_base), adapters_dir=tmp_path / "a", resume=True, **kwargs)
    assert out[0]["resumed_from_step"] == 3 and out[0]["optimizer_steps"] == 4
    resumed = _log(tmp_path / "a", "general")
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in reference], abs=1e-5)
    assert not ckpt.exists()  # checkpoints are removed once the stage is complete


def test_resume_with_a_changed_config_is_refused(tiny_base, stage_data, tmp_path, monkeypatch):
    cfg = tiny_cfg(n_stages=1, max_steps=3, save_steps=1)
    kwargs = dict(data_dir=stage_data, adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c", index_dir=None)
    _interrupt_at_call(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(TrainingInterrupted):
        run_finetune(cfg, tiny_model_cfg(tiny_base), **kwargs)
    monkeypatch.undo()
    cfg.stages[0].lr = 0.5
    with pytest.raises(RagloraError, match="different configuration"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), resume=True, **kwargs)


def test_failed_runs_leave_trained_stages_intact(tiny_base, stage_data, tmp_path, monkeypatch):
    cfg = tiny_cfg(n_stages=2)
    kwargs = dict(adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c", index_dir=None)
    run_finetune(cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, **kwargs)
    before = {s: _hashes(tmp_path / "a" / s) for s in ("general", "domain")}

    # a crash in the middle of retraining domain
    _interrupt_at_call(monkeypatch, 2, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, stages=["domain"], force=True, **kwargs)
    monkeypatch.undo()
    # an out-of-memory turns into advice
    _interrupt_at_call(monkeypatch, 1, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(RagloraError, match="out of memory.*batch_size.*gradient_checkpointing"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, stages=["domain"], force=True, **kwargs)
    monkeypatch.undo()
    # bad data for a forced rerun of both stages
    bad = tmp_path / "bad"
    for split in ("train", "validation"):
        write_jsonl(bad / "general" / f"{split}.jsonl", [{"messages": []}])
    with pytest.raises(RagloraError, match=r"general/train\.jsonl:1"):
        run_finetune(cfg, tiny_model_cfg(tiny_base), data_dir=bad, force=True, **kwargs)
    assert {s: _hashes(tmp_path / "a" / s) for s in ("general", "domain")} == before
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_continue_previous_adapter_chains_by_initialisation(tiny_base, stage_data, tmp_path):
    cfg = tiny_cfg(n_stages=2, continue_previous_adapter=True)
    out = run_finetune(
        cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, adapters_dir=tmp_path / "a",
        cache_dir=tmp_path / "c", index_dir=None,
    )  # fmt: skip
    m = json.loads((tmp_path / "a" / "domain" / "manifest.json").read_text())
    assert m["parents"] == [] and m["initialized_from"] == "general"
    assert out[1]["trainable_params"] == out[0]["trainable_params"]


def test_changed_stage_config_retrains_that_stage_and_later_ones_only(tiny_base, stage_data, tmp_path):
    cfg = tiny_cfg(n_stages=3)
    kwargs = dict(data_dir=stage_data, adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c", index_dir=None)
    run_finetune(cfg, tiny_model_cfg(tiny_base), **kwargs)
    cfg.stages[1].lr = 5e-3
    out = run_finetune(cfg, tiny_model_cfg(tiny_base), **kwargs)
    # subdomain's hash includes domain's new adapter digest, so it is retrained too
    assert [s["skipped"] for s in out] == [True, False, False]
    out = run_finetune(cfg, tiny_model_cfg(tiny_base), force=True, stages=["general"], **kwargs)
    assert [s["skipped"] for s in out] == [False]
