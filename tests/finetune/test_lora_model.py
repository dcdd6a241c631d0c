"""PEFT set-up: only adapter weights train, zero-init B is a no-op, merge parity, methods, bad-input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from tiny_model import make_tiny_model, make_tiny_tokenizer

from finetune.config import LoraSettings
from finetune.data import collate, tokenize_conversation
from finetune.model import apply_method, check_4bit, count_parameters, load_base, make_peft_config, resolve_device
from finetune.train import CausalLMLoss
from raglora.errors import RagloraError


def _batch(tok):
    convo = [
        {"role": "system", "content": "Help."},
        {"role": "user", "content": "Do I need a building permit?"},
        {"role": "assistant", "content": "Yes, a bygglov."},
    ]
    return collate([tokenize_conversation(tok, convo)], pad_id=tok.pad_token_id)


def _step(model, batch, prompt_learning=False):
    loss = CausalLMLoss(model, prompt_learning=prompt_learning)
    loss.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    s, n = loss(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    (s / n).backward()
    opt.step()
    return float((s / n).detach())


def test_only_lora_parameters_change_after_a_step():
    tok = make_tiny_tokenizer()
    model = apply_method(make_tiny_model(tok), LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, _batch(tok))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("lora_" in n for n in trainable)
    assert any("lora_B" in n for n in changed)
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)
    t, total = count_parameters(model)
    assert 0 < t < total


def test_zero_initialised_b_leaves_the_model_unchanged():
    tok = make_tiny_tokenizer()
    base = make_tiny_model(tok)
    ids = _batch(tok)["input_ids"]
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        adapted = apply_method(copy.deepcopy(base), LoraSettings(r=4, lora_dropout=0.0)).eval()
        assert all(float(p.abs().sum()) == 0 for n, p in adapted.named_parameters() if "lora_B" in n)
        torch.testing.assert_close(adapted(input_ids=ids).logits, ref)


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"use_rslora": True}, {"target_modules": "all-linear"}])
def test_merged_logits_equal_unmerged_with_nonzero_b(extra):
    from peft import get_peft_model

    tok = make_tiny_tokenizer()
    base = make_tiny_model(tok)
    settings = LoraSettings(r=4, lora_alpha=16, lora_dropout=0.0, **extra)
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(base), make_peft_config(settings, base, init_lora_weights=False)).eval()
    ids = _batch(tok)["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        assert not torch.allclose(unmerged, base(input_ids=ids).logits, atol=1e-4)
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "prefix_tuning", "full"])
def test_baseline_methods_train_a_step(method):
    tok = make_tiny_tokenizer()
    model = apply_method(make_tiny_model(tok), LoraSettings(method=method, num_virtual_tokens=4))
    t, total = count_parameters(model)
    assert (t == total) == (method == "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = _step(model, _batch(tok), prompt_learning=method in ("prompt_tuning", "prefix_tuning"))
    assert loss == loss and loss > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_unknown_target_module_is_reported_with_the_available_names():
    tok = make_tiny_tokenizer()
    with pytest.raises(RagloraError, match=r"\['qkv_proj'\] not found.*q_proj"):
        apply_method(make_tiny_model(tok), LoraSettings(target_modules=["q_proj", "qkv_proj"]))


def test_rank_must_be_positive():
    with pytest.raises(ValidationError, match="r"):
        LoraSettings(r=0)
    with pytest.raises(RagloraError, match="r must be > 0"):
        make_peft_config(LoraSettings.model_construct(**{**LoraSettings().model_dump(), "r": -1}))


def test_missing_model_path_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(RagloraError, match="model path not found"):
        load_base(str(tmp_path / "no-such-model"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagloraError, match="no config.json"):
        load_base(str(tmp_path / "empty"), cache_dir=tmp_path)
    with pytest.raises(RagloraError, match="unknown packaged generator"):
        load_base("packaged:gpt-17", cache_dir=tmp_path)
    with pytest.raises(RagloraError, match="could not load"):
        load_base("nobody-owns-this/model-xyz", cache_dir=tmp_path)  # offline: not in the HF cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_4bit_and_cuda_on_a_cpu_machine_are_refused(tmp_path, tiny_base):
    with pytest.raises(RagloraError, match="needs a CUDA GPU"):
        check_4bit("cpu")
    with pytest.raises(RagloraError, match="needs a CUDA GPU"):
        load_base(str(tiny_base), cache_dir=tmp_path, load_in_4bit=True)
    with pytest.raises(RagloraError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_load_base_from_a_local_folder(tiny_base, tmp_path):
    model, tok = load_base(str(tiny_base), cache_dir=tmp_path)
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tok.pad_token == "<|im_end|>" and tok.chat_template


def test_fast_dropout_keeps_one_minus_p_of_elements_and_rescales_them():
    from finetune.model import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.2).train()
    x = torch.ones(4, 300, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.8))
    y.sum().backward()  # the gradient is the same mask times the same scale
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(FastDropout(0.2).train()(x), y)  # reproducible under the global seed
    assert torch.equal(drop.eval()(x), x)


def test_lora_dropout_modules_are_swapped_without_changing_saved_weights(tmp_path):
    from finetune.model import FastDropout

    tok = make_tiny_tokenizer()
    model = apply_method(make_tiny_model(tok), LoraSettings(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.1]
    assert drops and all(type(m) is FastDropout for m in drops)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)


def _bytes_saved_for_backward(model, ids) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(storages.values())


def test_fast_dropout_keeps_less_memory_for_backward_than_stock_dropout():
    tok = make_tiny_tokenizer()
    settings = LoraSettings(r=4, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    fast = apply_method(make_tiny_model(tok), settings).train()
    stock = copy.deepcopy(fast)
    for module in stock.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            for name in list(module.lora_dropout):
                module.lora_dropout[name] = torch.nn.Dropout(0.1)
    ids = torch.randint(3, tok.vocab_size, (4, 64))
    fast_bytes, stock_bytes = _bytes_saved_for_backward(fast, ids), _bytes_saved_for_backward(stock, ids)
    assert fast_bytes < 0.95 * stock_bytes, (fast_bytes, stock_bytes)
