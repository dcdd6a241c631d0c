"""`after:` starts a stage from a named earlier stage (a sibling branch), for training, replay, forgetting and
serving's stage order; the demo's RAFT-paper variant is such a sibling and never the default stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from finetune.config import FinetuneConfig, LoraOverride, StageConfig, resolve_lora
from finetune.stages import _resolve_chain, run_finetune
from pipeline.stage_models import StageInfo, deepest_stage, discover_stages
from raglora.errors import RagloraError

REPO = Path(__file__).resolve().parents[2]


def _stages(*specs) -> list[StageConfig]:
    return [StageConfig(name=n, train_file="x.jsonl", **kw) for n, kw in specs]


def test_after_must_name_an_earlier_stage():
    cfg = FinetuneConfig(stages=_stages(("a", {}), ("b", {}), ("c", {}), ("b2", {"after": "a"})))
    assert cfg.builds_on("b2").name == "a" and cfg.builds_on("c").name == "b" and cfg.builds_on("a") is None
    assert [s.name for s in cfg.lineage("b2")] == ["a"] and [s.name for s in cfg.lineage("c")] == ["a", "b"]
    with pytest.raises(ValidationError, match="after: 'c' is a later stage"):
        FinetuneConfig(stages=_stages(("a", {}), ("b", {"after": "c"}), ("c", {})))
    with pytest.raises(ValidationError, match="after: 'nope' is no stage"):
        FinetuneConfig(stages=_stages(("a", {}), ("b", {"after": "nope"})))
    with pytest.raises(ValidationError, match="names the stage itself"):
        StageConfig(name="a", after="a")
    with pytest.raises(ValidationError, match="none: it is the first"):
        FinetuneConfig(stages=_stages(("a", {"after": "b"}), ("b", {})))


def test_only_a_stage_something_builds_on_must_be_mergeable():
    prompt = {"lora": LoraOverride(method="prompt_tuning")}
    # b is not last, but nothing builds on it: c starts from a
    cfg = FinetuneConfig(stages=_stages(("a", {}), ("b", prompt), ("c", {"after": "a"})))
    assert resolve_lora(cfg, cfg.stages[1]).method == "prompt_tuning"
    with pytest.raises(ValidationError, match="cannot be merged"):
        FinetuneConfig(stages=_stages(("a", prompt), ("b", {}), ("c", {"after": "a"})))


def _ctx(tmp_path, cfg, manifests: dict[str, dict]):
    for name, manifest in manifests.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    return SimpleNamespace(cfg=cfg, adapters_dir=tmp_path)


@pytest.mark.parametrize("continue_previous", [False, True])
def test_the_chain_of_an_after_stage_is_its_named_stage(tmp_path, continue_previous):
    stages = _stages(("a", {}), ("b", {}), ("c", {}), ("c2", {"after": "b"}))
    cfg = FinetuneConfig(stages=stages, continue_previous_adapter=continue_previous)
    parents = {"a": [], "b": ["a"], "c": ["a", "b"]}
    ctx = _ctx(tmp_path, cfg, {name: {"parents": p, "method": "lora"} for name, p in parents.items()})
    chain = _resolve_chain(ctx, 3, cfg.stages[3], resolve_lora(cfg, cfg.stages[3]))
    if continue_previous:  # keeps training b's adapter on a merged: never c's
        assert (chain.parents, chain.init_from) == (["a"], "b")
    else:
        assert (chain.parents, chain.init_from) == (["a", "b"], None)
    assert "c" not in chain.parent_manifests
    shutil.rmtree(tmp_path / "b")
    with pytest.raises(RagloraError, match="builds on stage b, which has not been trained"):
        _resolve_chain(ctx, 3, cfg.stages[3], resolve_lora(cfg, cfg.stages[3]))


def test_a_sibling_stage_trains_on_its_named_parent_and_subdomain_stays_the_default(trained_run, tmp_path):
    run = trained_run
    adapters = tmp_path / "adapters"
    shutil.copytree(run["kwargs"]["adapters_dir"], adapters)  # general -> domain -> subdomain, trained
    cfg = run["cfg"].model_copy(deep=True)
    variant = StageConfig(
        name="subdomain-raft-answer", after="domain", train_file="subdomain/train.jsonl",
        validation_file="subdomain/validation.jsonl", max_steps=1, batch_size=2, lr=1e-2, warmup_ratio=0.0,
        replay_fraction=0.4, raft=True, raft_fraction=1.0, raft_p_no_gold=0.4, raft_no_gold_target="answer",
    )  # fmt: skip
    cfg.stages.append(variant)
    kwargs = {**run["kwargs"], "adapters_dir": adapters}
    out = run_finetune(cfg, run["model_cfg"], index=run["index"], stages=[variant.name], **kwargs)
    assert out[0]["optimizer_steps"] == 1
    m = json.loads((adapters / variant.name / "manifest.json").read_text())
    assert m["parents"] == ["general", "domain"] and m["initialized_from"] is None
    # replay, validation losses and forgetting follow the chain it was trained on, not the config's list
    assert set(m["metrics"]["forgetting"]) == {"general", "domain", variant.name}
    assert set(m["metrics"]["validation_loss"]) == {"general", "domain", variant.name}
    assert {k for k in m["data"]["files"] if k.startswith("replay:")} == {"replay:general", "replay:domain"}
    raft = m["data"]["raft"]
    assert raft["no_gold_target"] == "answer" and raft["answer_targets_without_gold"] == raft["without_gold"] == 2
    assert raft["refusal_targets"] == 0 and raft["cited_targets"] == raft["with_gold"] == 3
    # serving orders it after domain and keeps subdomain as the default (the deepest chains tie; first by name)
    found = {s.name: s for s in discover_stages(adapters)}
    assert found[variant.name].chain == ("general", "domain", variant.name)
    assert deepest_stage(list(found.values())) == "subdomain"
    # `raglora merge` without --stages merges that default chain (not every configured stage: they are no chain)
    import yaml

    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    stages = [s.model_dump(exclude_none=True) for s in cfg.stages]
    paths = {"adapters_dir": str(adapters), "base_cache_dir": str(tmp_path / "cache")}
    config.write_text(yaml.safe_dump({"paths": paths, "model": {"base": str(run["model_cfg"].base)},
                                      "finetune": {"stages": stages}}))  # fmt: skip
    assert main(["merge", "--config", str(config), "--out", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "raglora_merge.json").read_text())["stages"] == [
        "general", "domain", "subdomain"
    ]  # fmt: skip


def test_the_demo_configs_opt_in_raft_paper_variant_is_a_sibling_evaluation_arm_once_uncommented():
    import re

    import yaml

    from pipeline.config import _validate

    text = (REPO / "configs" / "default.yaml").read_text()
    block = re.search(r"^    # - name: domain-raft-answer\n(?:    #   .*\n)+", text, re.M)
    assert block, "the commented domain-raft-answer stage is gone from configs/default.yaml"
    uncommented = re.sub(r"^    # ", "    ", block.group(0), flags=re.M)
    cfg = _validate(yaml.safe_load(text.replace(block.group(0), uncommented)), "default.yaml, uncommented")
    ft = cfg.finetune
    main = ft.stage("domain")
    variant = ft.stage("domain-raft-answer")
    assert variant.after == ft.builds_on("domain").name == "general"
    assert variant.raft and variant.raft_no_gold_target == "answer"
    assert (variant.max_steps, variant.lr, variant.replay_fraction) == (main.max_steps, main.lr, main.replay_fraction)
    assert (variant.raft_fraction, variant.raft_p_no_gold) == (main.raft_fraction, main.raft_p_no_gold)
    assert (variant.train_file, variant.validation_file) == (main.train_file, main.validation_file)
    assert all(s.raft_no_gold_target == "refusal" for s in ft.stages if s.raft and s is not variant)
    assert all(s.raft_search_mode == cfg.retrieval.mode for s in ft.stages if s.raft)  # RAFT retrieves as served
    chains = [StageInfo(s.name, Path(s.name), tuple(p.name for p in ft.lineage(s.name))) for s in ft.stages]
    assert cfg.serve.default_stage in (None, "subdomain") and deepest_stage(chains) == "subdomain"
