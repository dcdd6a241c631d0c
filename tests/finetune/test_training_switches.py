"""Packing, gradient checkpointing and gradient accumulation change the compute layout, not the maths."""

from __future__ import annotations

import json

import pytest
from ft_helpers import tiny_cfg, tiny_model_cfg

from finetune.stages import run_finetune


def _run(tiny_base, stage_data, out, **overrides):
    cfg = tiny_cfg(n_stages=1, max_steps=2, **overrides)
    cfg.lora.lora_dropout = 0.0
    summary = run_finetune(
        cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, adapters_dir=out, cache_dir=out / "c", index_dir=None
    )[0]
    log = [json.loads(x) for x in (out / "general" / "train_log.jsonl").read_text().splitlines()]
    return summary, [e["loss"] for e in log]


def test_packing_and_checkpointing_give_the_same_losses(tiny_base, stage_data, tmp_path):
    ref_summary, ref = _run(tiny_base, stage_data, tmp_path / "ref")
    packed_summary, packed = _run(tiny_base, stage_data, tmp_path / "packed", packing=True)
    ckpt_summary, ckpt = _run(tiny_base, stage_data, tmp_path / "gc", gradient_checkpointing=True)
    assert packed == pytest.approx(ref, abs=1e-4)
    assert ckpt == pytest.approx(ref, abs=1e-4)
    assert packed_summary["train_tokens"] == ref_summary["train_tokens"]
    assert packed_summary["padding_efficiency"] >= ref_summary["padding_efficiency"]


def test_gradient_accumulation_runs_and_counts_every_micro_batch(tiny_base, stage_data, tmp_path):
    cfg = tiny_cfg(n_stages=1, max_steps=2)
    cfg.stages[0].grad_accum = 2
    cfg.stages[0].batch_size = 1
    out = tmp_path / "ga"
    summary = run_finetune(
        cfg, tiny_model_cfg(tiny_base), data_dir=stage_data, adapters_dir=out, cache_dir=out / "c", index_dir=None
    )[0]
    assert summary["optimizer_steps"] == 2
    m = json.loads((out / "general" / "manifest.json").read_text())
    assert m["metrics"]["train_tokens"] > 0 and m["stage_config"]["grad_accum"] == 2
