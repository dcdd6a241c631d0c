"""The real packaged SmolLM2-135M: converted once from the GGUF, trained 2 steps on real FAQ rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig, ModelConfig, StageConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory) -> Path:
    # RAGLORA_BASE_CACHE reuses an existing conversion (e.g. artifacts/base) instead of converting (~20 s)
    return Path(os.environ.get("RAGLORA_BASE_CACHE") or tmp_path_factory.mktemp("base"))


def test_packaged_smollm2_converts_trains_two_steps_and_the_adapter_loads(tmp_path, base_cache):
    import zaragoza_construction_faq
    from peft import PeftModel

    from finetune.model import load_base
    from finetune.stages import run_finetune

    model, tok = load_base("packaged:smollm2-135m-instruct", cache_dir=base_cache, device="cpu")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 2)
    assert getattr(model.config, "quantization_config", None) is None
    folder = base_cache / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and (folder / ".complete").is_file()

    rows = [r for r in zaragoza_construction_faq.load(lang="en") if r.get("q") and r.get("a")][:6]
    data = tmp_path / "data"
    (data / "domain").mkdir(parents=True)
    lines = []
    for r in rows:
        msgs = [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}]
        lines.append(json.dumps({"id": r["id"], "faq_id": r["id"], "category": r["category"], "messages": msgs}))
    (data / "domain" / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (data / "domain" / "validation.jsonl").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    cfg = FinetuneConfig(
        stages=[
            StageConfig(
                name="domain", train_file="domain/train.jsonl", validation_file="domain/validation.jsonl",
                max_steps=2, batch_size=2, lr=1e-3,
            )
        ],
        lora={"r": 4, "lora_alpha": 8},
    )  # fmt: skip
    model_cfg = ModelConfig(device="cpu", max_length=256)
    out = run_finetune(
        cfg, model_cfg, data_dir=data, adapters_dir=tmp_path / "adapters", cache_dir=base_cache, index_dir=None
    )
    assert out[0]["optimizer_steps"] == 2 and out[0]["final_train_loss"] > 0
    assert out[0]["validation_loss"]["domain"] < 10
    adapter = tmp_path / "adapters" / "domain"
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": rows[0]["q"]}], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
