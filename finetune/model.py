"""Base model loading (packaged GGUF -> cached HF folder, HF ids, local folders), PEFT set-up and the
stage chain: stage N's adapter was trained on base + merged(its parents), as listed in its manifest.

`load_for_inference(base, adapters_dir, stage)` gives one stage with its parents merged and its adapter
attached. Serving many stages from one base (switched per request) lives in `pipeline.stage_models.StageModels`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from raglora.errors import RagloraError
from raglora.files import atomic_replace_dir
from raglora.packaged import PREFIX as PACKAGED_PREFIX
from raglora.packaged import package_folder, packaged_model

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- devices


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RagloraError("model.device is 'cuda' but no CUDA GPU is available (use 'auto' or 'cpu')")
    if device not in ("cpu", "cuda"):
        raise RagloraError(f"model.device: unknown device {device!r} (expected auto, cpu or cuda)")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> torch.dtype:
    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise RagloraError(f"model.dtype: unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
    return table[dtype]


def check_4bit(device: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; say so clearly instead of failing deep inside transformers."""
    if device != "cuda":
        raise RagloraError(
            "model.load_in_4bit (QLoRA) needs a CUDA GPU; this run is on CPU - set model.load_in_4bit: false"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RagloraError("model.load_in_4bit needs bitsandbytes: pip install 'raglora[gpu]' (or bitsandbytes)")


# ---------------------------------------------------------------------------------------------- base model


def packaged_gguf(name: str) -> Path:
    path = package_folder(name, "generator") / packaged_model(name, "generator")["gguf_file"]
    if not path.is_file():
        raise RagloraError(f"packaged model {name}: weights file missing: {path}")
    return path


def ensure_packaged_base(name: str, cache_dir: str | Path) -> Path:
    """Dequantise the packaged GGUF once into `<cache_dir>/<name>/` (an HF folder) and reuse it afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / name
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    gguf = packaged_gguf(name)
    info = packaged_model(name, "generator")
    log.info("converting packaged %s (%s) to an HF folder at %s (once)", name, gguf.name, out)
    tmp = Path(cache_dir) / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bos_id = tok.convert_tokens_to_ids(info["bos"])
        eos_id = tok.convert_tokens_to_ids(info["eos"])
        tok.bos_token, tok.eos_token, tok.pad_token = info["bos"], info["eos"], info["eos"]
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = bos_id, eos_id, eos_id
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}) + "\n")
        atomic_replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(base: str, cache_dir: str | Path) -> str:
    """A local HF folder path or a hub id for `base` (packaged names are converted on first use)."""
    if base.startswith(PACKAGED_PREFIX):
        return str(ensure_packaged_base(base.removeprefix(PACKAGED_PREFIX), cache_dir))
    p = Path(base).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise RagloraError(f"model path {p} is not a Hugging Face model folder (no config.json)")
        return str(p)
    looks_like_path = base.startswith((".", "/", "~")) or p.is_absolute() or len(p.parts) > 2 or "\\" in base
    if looks_like_path:
        raise RagloraError(f"model path not found: {p}")
    return base


def _fix_tokenizer(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.warning("tokenizer has no chat template; using ChatML")
        tok.chat_template = CHATML_TEMPLATE


def load_tokenizer(base: str, *, cache_dir: str | Path):
    from transformers import AutoTokenizer

    path = resolve_base(base, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RagloraError(f"could not load the tokenizer of {base!r}: {str(exc).splitlines()[0]}") from None
    _fix_tokenizer(tok)
    return tok


def load_base(
    base: str,
    *,
    cache_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
):
    """(model, tokenizer) for a packaged name, HF id or local folder, on the resolved device/dtype."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    if load_in_4bit:
        check_4bit(dev)
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_base(base, cache_dir)
    tok = load_tokenizer(base, cache_dir=cache_dir)
    kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch_dtype == torch.float32 else torch_dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise RagloraError(f"could not load model {base!r}: {str(exc).splitlines()[0]}") from None
    if not load_in_4bit:
        model.to(dev)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------------------------- PEFT


def linear_module_names(model) -> set[str]:
    """Short names (last dotted part) of the Linear/Conv1D layers PEFT can target."""
    names = set()
    for full, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return names


def check_target_modules(model, target_modules) -> None:
    """Fail with the available names before PEFT fails with a less helpful message."""
    if target_modules == "all-linear":
        return
    module_names = [n for n, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        avail = ", ".join(sorted(linear_module_names(model)))
        raise RagloraError(
            f"finetune.lora.target_modules: {missing} not found in the model; linear modules: {avail} (or 'all-linear')"
        )


def make_peft_config(settings, model=None, *, init_lora_weights: bool | str = True):
    """The peft config object for LoraSettings (None for method 'full')."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    method = settings.method
    if method in ("lora", "ia3") and model is not None:
        check_target_modules(model, settings.target_modules)
    targets = settings.target_modules if settings.target_modules == "all-linear" else list(settings.target_modules)
    if method == "lora":
        if settings.r <= 0:
            raise RagloraError(f"finetune.lora.r must be > 0, got {settings.r}")
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=targets,
            use_dora=settings.use_dora,
            use_rslora=settings.use_rslora,
            init_lora_weights=init_lora_weights,
        )
    if method == "ia3":
        if targets == "all-linear":
            ff = ["gate_proj", "up_proj", "down_proj", "mlp"]
        else:
            ff = [t for t in targets if t in ("down_proj", "fc2", "c_proj", "dense_4h_to_h")]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)
    if method == "full":
        return None
    raise RagloraError(f"finetune.lora.method: unknown method {method!r}")


def apply_method(model, settings, *, load_in_4bit: bool = False, gradient_checkpointing: bool = False):
    """Wrap `model` for training with the configured method; only the method's parameters train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    peft_config = make_peft_config(settings, model)
    if peft_config is None:  # full fine-tuning
        if load_in_4bit:
            raise RagloraError("method 'full' cannot train a 4-bit model; set model.load_in_4bit: false")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if gradient_checkpointing:
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, peft_config)
    use_fast_dropout(peft_model)
    return peft_model


class FastDropout(torch.nn.Dropout):
    """Inverted dropout whose CPU mask costs one 64-bit random draw per four elements.

    `F.dropout` on CPU draws one Bernoulli sample per element; with LoRA on q/k/v/o that was ~10 % of a
    training step. Here each element keeps a uniform 16-bit draw and is kept when it clears `p` (p is
    rounded to 1/65536). Same distribution, other random stream; CUDA keeps the fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= -32768 + round(self.p * 65536)
        return _MaskScale.apply(x, keep, 1.0 / (1.0 - self.p))


class _MaskScale(torch.autograd.Function):
    """x * keep * scale that saves the boolean mask (1 byte per element) for backward, not a float copy."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def use_fast_dropout(model) -> None:
    """Swap PEFT's LoRA dropout modules for FastDropout (no parameters, so saved adapters are unchanged)."""
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, drop in drops.items():
                if type(drop) is torch.nn.Dropout:
                    drops[name] = FastDropout(drop.p)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); for PEFT prompt methods the virtual-token parameters count as trainable."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------- stage chain


def stage_dir(adapters_dir: str | Path, stage: str) -> Path:
    return Path(adapters_dir) / stage


def read_manifest(adapters_dir: str | Path, stage: str) -> dict:
    path = stage_dir(adapters_dir, stage) / MANIFEST
    if not path.is_file():
        raise RagloraError(f"stage {stage!r} has not been trained: no {path} (run `raglora finetune --stages {stage}`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise RagloraError(
            f"{path}: malformed JSON{where}; retrain with `raglora finetune --stages {stage} --force`"
        ) from None
    if not isinstance(manifest, dict):
        raise RagloraError(f"{path}: expected a JSON object")
    _check_weights(stage_dir(adapters_dir, stage), stage)
    return manifest


def _check_weights(folder: Path, stage: str) -> None:
    """Read every safetensors header, so a truncated or corrupt file is named here, not deep inside PEFT."""
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise RagloraError(
                f"corrupt weights file {weights} ({exc}); retrain with `raglora finetune --stages {stage} --force`"
            ) from None


def merge_stage_into(model, adapters_dir: str | Path, stage: str, manifest: dict | None = None):
    """Fold one trained stage into `model` (LoRA/IA3 merge_and_unload; 'full' stages are whole models)."""
    from peft import PeftModel

    manifest = manifest or read_manifest(adapters_dir, stage)
    method = manifest.get("method", "lora")
    sd = stage_dir(adapters_dir, stage)
    if method == "full":
        raise RagloraError(f"stage {stage}: internal error: full stages start a chain, they are not merged")
    if method not in ("lora", "ia3"):
        raise RagloraError(f"stage {stage}: a {method} adapter cannot be merged into the model weights")
    peft_model = PeftModel.from_pretrained(model, str(sd))  # the default adapter name: PEFT refuses '.' in names
    return peft_model.merge_and_unload()


def _chain_start(adapters_dir: str | Path, stages: list[str]) -> tuple[str | None, list[str]]:
    """(last full-model stage or None, the adapter stages to merge after it)."""
    manifests = {s: read_manifest(adapters_dir, s) for s in stages}
    start = None
    rest = list(stages)
    for i, s in enumerate(stages):
        if manifests[s].get("method") == "full":
            start, rest = s, list(stages[i + 1 :])
    return start, rest


def load_merged_chain(
    base: str,
    adapters_dir: str | Path,
    stages: list[str],
    *,
    cache_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
):
    """base with `stages` (in order) merged in full precision on CPU, then cast/moved (or re-quantised)."""
    if not stages:
        return load_base(
            base,
            cache_dir=cache_dir,
            device=device,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            attn_implementation=attn_implementation,
        )
    start, rest = _chain_start(adapters_dir, stages)
    start_path = str(stage_dir(adapters_dir, start)) if start else base
    tok = load_tokenizer(base, cache_dir=cache_dir)
    model, _ = load_base(
        start_path, cache_dir=cache_dir, device="cpu", dtype="float32", attn_implementation=attn_implementation
    )
    for s in rest:
        model = merge_stage_into(model, adapters_dir, s)
    dev = resolve_device(device)
    if load_in_4bit:
        check_4bit(dev)
        key = hashlib.sha256(json.dumps([base, *[_adapter_digest(adapters_dir, s) for s in stages]]).encode())
        merged_dir = Path(cache_dir) / ".merged" / key.hexdigest()[:16]
        if not (merged_dir / "config.json").is_file():
            tmp = merged_dir.with_name(f".tmp-{merged_dir.name}-{os.getpid()}")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            atomic_replace_dir(tmp, merged_dir)
        del model
        model, _ = load_base(
            str(merged_dir),
            cache_dir=cache_dir,
            device=dev,
            dtype=dtype,
            load_in_4bit=True,
            attn_implementation=attn_implementation,
        )
        return model, tok
    model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    model.eval()
    return model, tok


def _adapter_digest(adapters_dir: str | Path, stage: str) -> str:
    return str(read_manifest(adapters_dir, stage).get("adapter_sha256", stage))


def load_for_inference(
    base: str,
    adapters_dir: str | Path,
    stage: str | None,
    *,
    cache_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    merge: bool = False,
    attn_implementation: str | None = None,
):
    """(model, tokenizer): base with the stage's parents merged and its adapter attached (named `stage`).

    stage=None gives the plain base. merge=True also folds the stage's own adapter in (faster generation).
    """
    from peft import PeftModel

    if stage is None:
        return load_base(base, cache_dir=cache_dir, device=device, dtype=dtype, attn_implementation=attn_implementation)
    manifest = read_manifest(adapters_dir, stage)
    if manifest.get("base") not in (None, base):
        log.warning("stage %s was trained on base %s, loading it on %s", stage, manifest.get("base"), base)
    parents = list(manifest.get("parents", []))
    if manifest.get("method") == "full":
        return load_merged_chain(base, adapters_dir, [*parents, stage], cache_dir=cache_dir, device=device, dtype=dtype)
    model, tok = load_merged_chain(
        base, adapters_dir, parents, cache_dir=cache_dir, device="cpu", dtype="float32",
        attn_implementation=attn_implementation,
    )  # fmt: skip
    # PEFT refuses '.' in adapter names ("heat-pumps.boilers")
    model = PeftModel.from_pretrained(
        model, str(stage_dir(adapters_dir, stage)), adapter_name=re.sub(r"\W", "_", stage)
    )
    if merge:
        model = model.merge_and_unload()
    dev = resolve_device(device)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    model.eval()
    return model, tok
