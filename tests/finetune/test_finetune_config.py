"""Config models: defaults, validation (extra keys, ranges, stage rules), per-stage LoRA overrides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from finetune.config import FinetuneConfig, LoraOverride, ModelConfig, StageConfig, resolve_lora
from raglora.errors import RagloraError


def test_defaults_have_no_stages_and_time_based_checkpoints():
    cfg = FinetuneConfig()
    assert cfg.stages == []  # stages come from the project's config (raglora init writes them)
    assert cfg.save_steps is None and cfg.save_minutes == 5
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    m = ModelConfig()
    assert m.base == "packaged:smollm2-135m-instruct" and m.device == "auto" and m.max_length == 512


def test_stage_files_default_to_the_stage_folder():
    s = StageConfig(name="heat-pumps", sources=["tickets"], where={"category": "heat-pumps"})
    assert (s.train_file, s.validation_file) == ("heat-pumps/train.jsonl", "heat-pumps/validation.jsonl")
    assert s.kind == "chat" and s.where == {"category": ["heat-pumps"]}
    assert StageConfig(name="a", train_file="x.jsonl").train_file == "x.jsonl"
    with pytest.raises(ValidationError, match="text stage"):
        StageConfig(name="manuals", kind="text", sources=["tickets"])
    with pytest.raises(ValidationError, match="raft needs a chat stage"):
        StageConfig(name="manuals", kind="text", raft=True)


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        FinetuneConfig(stagez=[])
    with pytest.raises(ValidationError):
        ModelConfig(device="tpu")
    with pytest.raises(ValidationError):
        StageConfig(name="bad name!", train_file="x")
    with pytest.raises(ValidationError, match="duplicate stage names"):
        FinetuneConfig(stages=[StageConfig(name="a", train_file="x"), StageConfig(name="a", train_file="y")])
    with pytest.raises(ValidationError, match="cannot be merged"):
        FinetuneConfig(
            stages=[
                StageConfig(name="a", train_file="x", lora=LoraOverride(method="prompt_tuning")),
                StageConfig(name="b", train_file="y"),
            ]
        )
    with pytest.raises(ValidationError, match="packing"):
        FinetuneConfig(packing=True, lora={"method": "prefix_tuning"}, stages=[StageConfig(name="a", train_file="x")])


def test_stage_lora_override_and_lookup():
    cfg = FinetuneConfig(
        lora={"r": 8, "target_modules": "all-linear"},
        stages=[StageConfig(name="a", train_file="x", lora=LoraOverride(r=4, use_dora=True))],
    )
    resolved = resolve_lora(cfg, cfg.stages[0])
    assert (resolved.r, resolved.use_dora, resolved.target_modules) == (4, True, "all-linear")
    assert cfg.stage("a").name == "a"
    with pytest.raises(RagloraError, match="unknown stage 'b'"):
        cfg.stage("b")
