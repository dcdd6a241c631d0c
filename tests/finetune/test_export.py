"""`raglora export`: one LoRA per stage on the plain base that computes exactly what the merged chain computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from ft_helpers import tiny_cfg, tiny_model_cfg
from transformers import AutoModelForCausalLM

from finetune.export import cumulative_adapter, export_stages
from finetune.model import load_merged_chain
from raglora.errors import RagloraError

IDS = torch.tensor([[1, 40, 41, 42, 2, 201, 1, 50, 51, 52, 53], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])


def _exported_logits(tiny_base: Path, folder: Path) -> torch.Tensor:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=IDS).logits


def _merged_logits(tiny_base: Path, adapters: Path, chain: list[str], cache: Path) -> torch.Tensor:
    model, _ = load_merged_chain(str(tiny_base), adapters, chain, cache_dir=cache, device="cpu", dtype="float32")
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _hand_stage(adapters: Path, tiny_base: Path, name: str, parents: list[str], config, *, manifest=None, seed=0):
    """A PEFT folder with random, non-zero weights and a manifest, as `finetune.stages` would leave it."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), copy.deepcopy(config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(adapters / name)
    data = {"stage": name, "parents": parents, "method": "lora", "base": str(tiny_base), **(manifest or {})}
    (adapters / name / "manifest.json").write_text(json.dumps(data), encoding="utf-8")


def _lora(**kw):
    from peft import LoraConfig

    values = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    return LoraConfig(**{**values, **kw})


def test_exported_stages_on_the_plain_base_equal_the_merged_chain_for_one_two_and_three_stages(
    trained_run, tiny_base, tmp_path
):
    adapters = trained_run["kwargs"]["adapters_dir"]
    out = export_stages(adapters, None, tmp_path / "export", base=str(tiny_base))
    chains = {"general": ["general"], "domain": ["general", "domain"], "subdomain": ["general", "domain", "subdomain"]}
    for stage, chain in chains.items():
        got = _exported_logits(tiny_base, out / stage)
        torch.testing.assert_close(got, _merged_logits(tiny_base, adapters, chain, tmp_path), rtol=1e-4, atol=1e-5)
        if len(chain) > 1:  # the parents matter: the stage's own adapter alone on the base is something else
            alone = _exported_logits(tiny_base, adapters / stage)
            assert not torch.allclose(got, alone, atol=1e-4)
        cfg = json.loads((out / stage / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == 16 * len(chain) and cfg["use_rslora"] is False
        assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and cfg["bias"] == "none"
        assert set(cfg["target_modules"]) <= {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
        info = json.loads((out / stage / "raglora_export.json").read_text())
        assert info["chain"] == chain and info["rank"] == cfg["r"] and info["base"] == str(tiny_base)
        sources = {s: json.loads((adapters / s / "manifest.json").read_text())["adapter_sha256"] for s in chain}
        assert info["sources"] == sources
    listing = json.loads((out / "manifest.json").read_text())
    assert set(listing["stages"]) == set(chains) and listing["base"] == str(tiny_base)
    assert not list(out.glob(".tmp-*"))


def test_a_continued_adapter_is_exported_once_not_stacked_on_the_stage_it_continued(tiny_base, stage_data, tmp_path):
    from finetune.stages import run_finetune

    adapters = tmp_path / "a"
    cfg = tiny_cfg(n_stages=2, continue_previous_adapter=True)
    run_finetune(
        cfg,
        tiny_model_cfg(tiny_base),
        data_dir=stage_data,
        adapters_dir=adapters,
        cache_dir=tmp_path / "c",
        index_dir=None,
    )
    cum = cumulative_adapter(adapters, "domain")
    assert cum.chain == ("domain",) and cum.rank == 16  # it already holds general's weights
    out = export_stages(adapters, ["domain"], tmp_path / "export", base=str(tiny_base))
    expected = _merged_logits(tiny_base, adapters, ["domain"], tmp_path)
    torch.testing.assert_close(_exported_logits(tiny_base, out / "domain"), expected, rtol=1e-4, atol=1e-5)


def test_stages_on_different_modules_ranks_and_scalings_are_zero_padded_to_one_rank(tiny_base, tmp_path):
    adapters = tmp_path / "adapters"
    _hand_stage(adapters, tiny_base, "a", [], _lora(), seed=1)
    b = _lora(r=2, lora_alpha=3, use_rslora=True, target_modules=["down_proj", "q_proj"])
    _hand_stage(adapters, tiny_base, "b", ["a"], b, seed=2)
    c = _lora(
        r=3, lora_alpha=5, target_modules=["o_proj", "v_proj"], alpha_pattern={"o_proj": 11}, rank_pattern={"o_proj": 5}
    )
    _hand_stage(adapters, tiny_base, "c", ["a", "b"], c, seed=3)
    cum = cumulative_adapter(adapters, "c")
    assert cum.rank == 4 + 2 + 5 and cum.chain == ("a", "b", "c")  # c's block: its largest rank (o_proj's 5)
    assert sorted(cum.config.target_modules) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    b_key = next(k for k in cum.state if k.endswith("layers.0.mlp.down_proj.lora_B.weight"))
    a_key = b_key.replace("lora_B", "lora_A")
    assert cum.state[b_key][:, :4].abs().sum() == 0 and cum.state[b_key][:, 4:6].abs().sum() > 0  # a: zeros
    assert cum.state[a_key][6:].abs().sum() == 0  # c does not target down_proj either
    v_a = cum.state[next(k for k in cum.state if k.endswith("layers.0.self_attn.v_proj.lora_A.weight"))]
    assert v_a[6:9].abs().sum() > 0 and v_a[9:].abs().sum() == 0  # c's v_proj has rank 3 of its block's 5
    out = export_stages(adapters, ["b", "c"], tmp_path / "export", base=str(tiny_base))
    for stage, chain in {"b": ["a", "b"], "c": ["a", "b", "c"]}.items():
        expected = _merged_logits(tiny_base, adapters, chain, tmp_path)
        torch.testing.assert_close(_exported_logits(tiny_base, out / stage), expected, rtol=1e-4, atol=1e-5)
    assert sorted(json.loads((out / "manifest.json").read_text())["stages"]) == ["b", "c"]


def _refused_configs():
    from peft import IA3Config, PromptTuningConfig

    return {
        "dora": (_lora(use_dora=True), {}, "uses DoRA"),
        "ia3": (
            IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            {"method": "ia3"},
            "is ia3",
        ),
        "prompt": (
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            {"method": "prompt_tuning"},
            "is prompt_tuning",
        ),  # fmt: skip
        "modules_to_save": (_lora(modules_to_save=["norm"]), {}, "uses modules_to_save"),
        "bias": (_lora(bias="all"), {}, "trains biases"),
    }


@pytest.mark.parametrize("kind", ["dora", "ia3", "prompt", "modules_to_save", "bias"])
def test_adapters_that_are_not_plain_low_rank_deltas_are_refused_with_one_line(kind, tiny_base, tmp_path):
    adapters = tmp_path / "adapters"
    _hand_stage(adapters, tiny_base, "a", [], _lora(), seed=1)
    config, manifest, message = _refused_configs()[kind]
    _hand_stage(adapters, tiny_base, "b", ["a"], config, manifest=manifest, seed=2)
    with pytest.raises(RagloraError, match=rf"^stage b {message}") as err:
        export_stages(adapters, ["a", "b"], tmp_path / "export", base=str(tiny_base))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "export").exists()  # refused before anything is written, "a" included


def test_a_full_fine_tune_in_the_chain_is_refused(tiny_base, tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "full").mkdir(parents=True)
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(adapters / "full")
    (adapters / "full" / "manifest.json").write_text(json.dumps({"parents": [], "method": "full"}))
    _hand_stage(adapters, tiny_base, "b", ["full"], _lora(), seed=2)
    with pytest.raises(RagloraError, match="stage full is a full fine-tune"):
        cumulative_adapter(adapters, "b")


def test_a_chain_trained_on_another_base_or_missing_a_parent_is_refused(tiny_base, tmp_path):
    adapters = tmp_path / "adapters"
    _hand_stage(adapters, tiny_base, "a", [], _lora(), manifest={"base": "other/model"}, seed=1)
    _hand_stage(adapters, tiny_base, "b", ["a"], _lora(), seed=2)
    with pytest.raises(RagloraError, match=r"different base models \(a: other/model, b: .*\)"):
        cumulative_adapter(adapters, "b")
    with pytest.raises(RagloraError, match="trained on base other/model, not"):
        export_stages(adapters, ["a"], tmp_path / "export", base=str(tiny_base))
    _hand_stage(adapters, tiny_base, "c", ["gone"], _lora(), seed=3)
    with pytest.raises(RagloraError, match="trained on top of gone, which is not under"):
        cumulative_adapter(adapters, "c")


def test_cli_export_writes_every_trained_stage_and_refuses_in_one_line(tiny_base, tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    adapters = tmp_path / "adapters"
    _hand_stage(adapters, tiny_base, "a", [], _lora(), seed=1)
    _hand_stage(adapters, tiny_base, "b", ["a"], _lora(r=2), seed=2)
    config = tmp_path / "config.yaml"
    paths = {"adapters_dir": str(adapters), "artifacts_dir": str(tmp_path / "art")}
    config.write_text(yaml.safe_dump({"paths": paths, "model": {"base": str(tiny_base)}}))
    assert main(["export", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "b: chain a -> b, rank 6" in printed and str(tmp_path / "art" / "export") in printed
    assert sorted(json.loads((tmp_path / "art" / "export" / "manifest.json").read_text())["stages"]) == ["a", "b"]
    assert main(["export", "--config", str(config), "--stages", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stage 'nope'") and "\n" not in err
