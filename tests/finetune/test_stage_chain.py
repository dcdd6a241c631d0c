"""Sequential stages on the tiny model: manifests, parents chain, PEFT format, merge, per-request adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.merge import merge_stages
from finetune.model import load_for_inference, load_merged_chain
from raglora.errors import RagloraError

IDS = torch.tensor([[1, 40, 41, 42, 2, 201, 1, 50, 51, 52, 53]])


def _manifest(run, stage):
    return json.loads((run["kwargs"]["adapters_dir"] / stage / "manifest.json").read_text())


def test_each_stage_writes_a_peft_adapter_and_a_manifest(trained_run):
    adapters = run_dir = trained_run["kwargs"]["adapters_dir"]
    for stage in ("general", "domain", "subdomain"):
        d = adapters / stage
        for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "resolved_config.json"):
            assert (d / name).is_file(), name
        log = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == [1, 2]
        assert {"loss", "lr", "tokens_per_s"} <= set(log[0])
        m = _manifest(trained_run, stage)
        metrics = m["metrics"]
        for key in ("final_train_loss", "wall_seconds", "peak_rss_mb", "trainable_params", "trainable_ratio"):
            assert metrics[key] is not None, key
        assert metrics["adapter_bytes"] < metrics["full_model_bytes"]
        assert metrics["tokens_per_s"] > 0 and 0 < metrics["padding_efficiency"] <= 1
        assert len(m["data"]["files"]["train"]["sha256"]) == 64
        assert m["lora"]["r"] == 16 and m["stage_config"]["name"] == stage
    assert not list(run_dir.glob(".tmp-*"))


def test_stage_n_lists_earlier_stages_as_parents_and_a_forgetting_table(trained_run):
    assert _manifest(trained_run, "general")["parents"] == []
    assert _manifest(trained_run, "domain")["parents"] == ["general"]
    sub = _manifest(trained_run, "subdomain")
    assert sub["parents"] == ["general", "domain"]
    table = sub["metrics"]["forgetting"]
    assert set(table) == {"general", "domain", "subdomain"}
    general_after_own = _manifest(trained_run, "general")["metrics"]["validation_loss"]["general"]
    assert table["general"]["after_own_stage"] == general_after_own
    assert table["general"]["delta"] == pytest.approx(
        table["general"]["after_this_stage"] - general_after_own, abs=1e-5
    )
    assert set(sub["metrics"]["validation_loss"]) == {"general", "domain", "subdomain"}


def test_raft_and_replay_are_recorded(trained_run):
    dom = _manifest(trained_run, "domain")["data"]
    assert dom["raft"]["raft_examples"] == 4  # raft_fraction 0.5 of 8 rows
    assert dom["raft"]["with_gold"] + dom["raft"]["without_gold"] == 4
    # the validation rows of every stage are held out (5 FAQ chunks): never shown, not even as a row's own gold
    # (in this toy data the validation rows are also training rows: those fall back to their own answer)
    raft = dom["raft"]
    assert raft["excluded_gold_chunks"] == 5
    assert raft["gold_by_source"] + raft["gold_fallback"] == raft["with_gold"]
    assert raft["gold_fallback"] == raft["gold_withheld_held_out"]
    sub = _manifest(trained_run, "subdomain")["data"]
    assert sub["replay_examples"] == 2  # round(0.4 * 5) rows from general+domain train
    assert sub["train_examples"] == 5 + 2


def test_adapters_load_with_peft_and_the_chain_reproduces_stage_outputs(trained_run, tiny_base, tmp_path):
    from peft import PeftModel

    adapters = trained_run["kwargs"]["adapters_dir"]
    # standard PEFT loading: base + merged parents, then the stage adapter
    chain_model, _ = load_merged_chain(
        str(tiny_base), adapters, ["general", "domain"], cache_dir=tmp_path, device="cpu"
    )
    peft_model = PeftModel.from_pretrained(chain_model, str(adapters / "subdomain")).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        served, _ = load_for_inference(str(tiny_base), adapters, "subdomain", cache_dir=tmp_path, device="cpu")
        torch.testing.assert_close(served(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
        base_only, _ = load_for_inference(str(tiny_base), adapters, None, cache_dir=tmp_path, device="cpu")
        assert not torch.allclose(base_only(input_ids=IDS).logits, expected, atol=1e-5)
        # merged full model folder
        out = merge_stages(
            str(tiny_base), adapters, ["general", "domain", "subdomain"], tmp_path / "merged", cache_dir=tmp_path
        )
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-5)
        assert json.loads((out / "raglora_merge.json").read_text())["stages"] == ["general", "domain", "subdomain"]
        # serving: one base, every stage adapter attached, switched per request (pipeline.stage_models.StageModels)
        from pipeline.stage_models import StageModels

        base, tok = load_for_inference(str(tiny_base), adapters, None, cache_dir=tmp_path, device="cpu")
        multi = StageModels(base, tok, adapters, strategy="stack")
        for stage in ("general", "domain", "subdomain"):
            one, _ = load_for_inference(str(tiny_base), adapters, stage, cache_dir=tmp_path, device="cpu")
            with multi.use(stage) as m:
                torch.testing.assert_close(m(input_ids=IDS).logits, one(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
        with multi.use(None) as m:
            torch.testing.assert_close(m(input_ids=IDS).logits, base_only(input_ids=IDS).logits)


def test_merge_rejects_a_stage_outside_the_chain(trained_run, tiny_base, tmp_path):
    adapters = trained_run["kwargs"]["adapters_dir"]
    with pytest.raises(RagloraError, match="not trained on top of"):
        merge_stages(str(tiny_base), adapters, ["subdomain", "general"], tmp_path / "m", cache_dir=tmp_path)
    with pytest.raises(RagloraError, match="has not been trained"):
        merge_stages(str(tiny_base), adapters, ["nope"], tmp_path / "m", cache_dir=tmp_path)


def test_a_completed_stage_is_skipped(trained_run):
    from finetune.stages import run_finetune

    run = trained_run
    adapters: Path = run["kwargs"]["adapters_dir"]
    mtime = (adapters / "general" / "adapter_model.safetensors").stat().st_mtime_ns
    out = run_finetune(run["cfg"], run["model_cfg"], index=run["index"], stages=["general", "domain"], **run["kwargs"])
    assert [s["skipped"] for s in out] == [True, True]
    assert (adapters / "general" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert out[0]["final_train_loss"] == _manifest(run, "general")["metrics"]["final_train_loss"]


def test_unknown_stage_and_missing_parent_are_errors(trained_run, tmp_path):
    from finetune.stages import run_finetune

    run = trained_run
    with pytest.raises(RagloraError, match="unknown stage 'legal'; configured stages: general, domain, subdomain"):
        run_finetune(run["cfg"], run["model_cfg"], stages=["legal"], **run["kwargs"])
    kwargs = {**run["kwargs"], "adapters_dir": tmp_path / "fresh"}
    with pytest.raises(RagloraError, match="builds on stage general, which has not been trained"):
        run_finetune(run["cfg"], run["model_cfg"], stages=["domain"], index=run["index"], **kwargs)


def test_raft_without_an_index_says_make_index(trained_run, tmp_path):
    from finetune.stages import run_finetune

    run = trained_run
    kwargs = {**run["kwargs"], "adapters_dir": tmp_path / "a", "index_dir": str(tmp_path / "no-index")}
    cfg = run["cfg"].model_copy(deep=True)
    cfg.stages = cfg.stages[1:2]
    with pytest.raises(RagloraError, match="make index"):
        run_finetune(cfg, run["model_cfg"], **kwargs)
