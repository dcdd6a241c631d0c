"""`raglora export`: one standard PEFT LoRA per stage, relative to the plain base, equal to the merged chain.

Stage N's adapter was trained on base + merged parents, so serving it needs the parents too (stacked or merged).
A LoRA chain is a sum of low-rank deltas on the same linear layers, `W + s1 B1 A1 + s2 B2 A2 + ...`, which is
exactly one LoRA of rank R = r1 + r2 + ...: `B = [s1 B1  s2 B2 ...]`, `A = [A1; A2; ...]`, scale 1
(`lora_alpha = R`, no rsLoRA). A module that some chain member does not target gets zero factors from it, so every
module has the same rank R (no rank_pattern): engines that take plain LoRA folders (PEFT, vLLM `--lora-modules`)
serve every stage from one base, and rows of different stages can share one batch.

Anything that is not a sum of plain low-rank deltas (DoRA, IA3, prompt/prefix tuning, full fine-tuning, trained
biases, modules_to_save) is refused with one line, never approximated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raglora.errors import RagloraError

EXPORT_INFO = "raglora_export.json"

# LoraConfig fields whose non-default values change what the adapter computes beyond `s * B @ A`.
_REFUSED_FIELDS = {
    "use_dora": "DoRA (magnitude vectors are not a sum of low-rank deltas)",
    "lora_bias": "a trained bias in lora_B",
    "modules_to_save": "modules_to_save (whole trained modules)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
}
# The factors of a LoRA module as PEFT saves them: (down, up). Embedding LoRAs keep bare Parameters (no ".weight").
_FACTOR_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


@dataclass
class Cumulative:
    """The cumulative LoRA of one stage: `config` and `state` (PEFT's saved key format, no adapter name) load as
    one adapter on the plain `base`; `chain` is the stages it contains (parents, then the stage)."""

    config: object  # peft.LoraConfig
    state: dict[str, torch.Tensor]
    chain: tuple[str, ...]
    rank: int
    base: str | None
    sources: dict[str, str | None] = field(default_factory=dict)  # stage -> adapter_sha256 from its manifest


def _read_adapter_config(folder: Path, stage: str) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise RagloraError(f"stage {stage}: no {path}; retrain with `raglora finetune --stages {stage} --force`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RagloraError(
            f"{path}: malformed JSON; retrain with `raglora finetune --stages {stage} --force`"
        ) from None
    if not isinstance(data, dict):
        raise RagloraError(f"{path}: expected a JSON object")
    return data


def _check_method(stage: str, manifest: dict) -> None:
    """What the manifest says: full fine-tunes and non-LoRA methods have no low-rank factors to concatenate."""
    method = str(manifest.get("method", "lora"))
    if method == "full":
        raise RagloraError(f"stage {stage} is a full fine-tune: only LoRA stages can be exported as a LoRA adapter")
    if method != "lora":
        raise RagloraError(f"stage {stage} is {method}: only plain LoRA stages can be exported as a cumulative LoRA")
    if (manifest.get("lora") or {}).get("use_dora"):
        raise RagloraError(f"stage {stage} uses DoRA: only plain LoRA stages can be exported as a cumulative LoRA")


def _check_config(stage: str, cfg: dict) -> None:
    """What the PEFT config says (a folder without a raglora manifest entry is checked too)."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise RagloraError(
            f"stage {stage} is {peft_type.lower()}: only plain LoRA stages can be exported as a cumulative LoRA"
        )
    for key, what in _REFUSED_FIELDS.items():
        if cfg.get(key):
            raise RagloraError(
                f"stage {stage} uses {what}: only plain LoRA stages can be exported as a cumulative LoRA"
            )
    if cfg.get("bias", "none") != "none":
        raise RagloraError(
            f"stage {stage} trains biases (bias={cfg.get('bias')!r}): only bias='none' LoRA stages can be exported"
        )


def _scale(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r (or alpha / sqrt(r) with rsLoRA), honouring alpha_pattern; `rank`
    is the module's saved tensor's, so rank_pattern needs no lookup."""
    from peft.utils.other import get_pattern_key

    alpha = float(cfg.get("lora_alpha", 8))
    pattern = cfg.get("alpha_pattern") or {}
    if pattern:
        key = get_pattern_key(list(pattern), module)
        alpha = float(pattern.get(key, alpha))
    return alpha / (rank**0.5 if cfg.get("use_rslora") else rank)


def _factors(state: dict[str, torch.Tensor], stage: str) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(module path, pair index): (A, B)} from one saved adapter; any other tensor is refused."""
    out: dict[tuple[str, int], list] = {}
    for key, tensor in state.items():
        for i, pair in enumerate(_FACTOR_PAIRS):
            for j, suffix in enumerate(pair):
                if key.endswith("." + suffix):
                    out.setdefault((key[: -len(suffix) - 1], i), [None, None])[j] = tensor
                    break
            else:
                continue
            break
        else:
            raise RagloraError(
                f"stage {stage}: adapter tensor {key} is not a LoRA factor; only plain LoRA stages can be exported"
            )
    for (module, _), pair in out.items():
        if pair[0] is None or pair[1] is None:
            raise RagloraError(f"stage {stage}: module {module} has only one of its two LoRA factors (corrupt adapter)")
    return {k: (v[0], v[1]) for k, v in out.items()}


def _manifest(adapters_dir: Path, stage: str) -> dict:
    """The stage's manifest; a bare PEFT folder (no manifest.json) reads as a first stage, as serving reads it."""
    from finetune.model import read_manifest, stage_dir

    folder = stage_dir(adapters_dir, stage)
    if not (folder / "manifest.json").is_file() and (folder / "adapter_config.json").is_file():
        return {}
    return read_manifest(adapters_dir, stage)


def _chain(adapters_dir: Path, stage: str) -> tuple[list[str], dict[str, dict]]:
    from finetune.model import stage_dir

    if not stage_dir(adapters_dir, stage).is_dir():
        raise RagloraError(f"stage {stage!r} has no adapter under {adapters_dir}: train it first")
    manifest = _manifest(adapters_dir, stage)
    parents = manifest.get("parents") or []
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RagloraError(f"{stage_dir(adapters_dir, stage) / 'manifest.json'}: parents must be a list of stage names")
    chain = [*parents, stage]
    manifests = {stage: manifest}
    for p in parents:
        if not stage_dir(adapters_dir, p).is_dir():
            raise RagloraError(
                f"stage {stage} was trained on top of {p}, which is not under {adapters_dir}: "
                f"train it first (raglora finetune --stages {p})"
            )
        manifests[p] = _manifest(adapters_dir, p)
    return chain, manifests


def cumulative_adapter(adapters_dir: str | Path, stage: str) -> Cumulative:
    """The chain ending at `stage` as one LoRA on the plain base (see the module docstring); fp32 factors."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    from finetune.model import stage_dir

    adapters_dir = Path(adapters_dir)
    chain, manifests = _chain(adapters_dir, stage)
    bases = {s: manifests[s].get("base") for s in chain if manifests[s].get("base")}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{s}: {b}" for s, b in bases.items())
        raise RagloraError(f"stage {stage}: its chain was trained on different base models ({listed}); retrain it")
    for s in chain:
        _check_method(s, manifests[s])
    members = []  # (stage, {(module, kind): (A, B)}, config)
    for s in chain:
        folder = stage_dir(adapters_dir, s)
        cfg = _read_adapter_config(folder, s)
        _check_config(s, cfg)
        try:
            state = load_peft_weights(str(folder), device="cpu")
        except (OSError, ValueError, RuntimeError) as exc:
            raise RagloraError(f"stage {s}: cannot read adapter weights in {folder}: {exc}") from None
        members.append((s, _factors(state, s), cfg))
    modules = sorted({key for _, factors, _ in members for key in factors})
    ranks = []  # each stage's block width: its largest module rank (rank_pattern: smaller ones are zero-padded)
    for s, factors, _ in members:
        if not factors:
            raise RagloraError(f"stage {s}: its adapter has no LoRA weights")
        ranks.append(max(a.shape[0] for a, _ in factors.values()))
    rank = sum(ranks)
    state: dict[str, torch.Tensor] = {}
    for module, kind in modules:
        present = [factors[(module, kind)] for _, factors, _ in members if (module, kind) in factors]
        a_ref, b_ref = present[0]
        a_parts, b_parts = [], []
        for (s, factors, cfg), r in zip(members, ranks, strict=True):
            if (module, kind) in factors:
                a, b = factors[(module, kind)]
                if a.shape[1:] != a_ref.shape[1:] or b.shape[0] != b_ref.shape[0] or b.shape[2:] != b_ref.shape[2:]:
                    raise RagloraError(
                        f"stage {s}: module {module} has shapes {tuple(a.shape)}/{tuple(b.shape)} unlike the rest of "
                        "its chain; was it trained on another base model?"
                    )
                pad = r - a.shape[0]
                a_parts += [a.float(), a_ref.new_zeros((pad, *a_ref.shape[1:]), dtype=torch.float32)]
                b = b.float() * _scale(cfg, module, a.shape[0])
                b_parts += [b, b_ref.new_zeros((b_ref.shape[0], pad, *b_ref.shape[2:]), dtype=torch.float32)]
            else:  # not targeted by this stage: zero factors keep the rank uniform
                a_parts.append(a_ref.new_zeros((r, *a_ref.shape[1:]), dtype=torch.float32))
                b_parts.append(b_ref.new_zeros((b_ref.shape[0], r, *b_ref.shape[2:]), dtype=torch.float32))
        down, up = _FACTOR_PAIRS[kind]
        state[f"{module}.{down}"] = torch.cat(a_parts, dim=0).contiguous()
        state[f"{module}.{up}"] = torch.cat(b_parts, dim=1).contiguous()
    targets = sorted({module.rsplit(".", 1)[-1] for module, _ in modules})
    first = members[-1][2]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        task_type=first.get("task_type"),
        base_model_name_or_path=first.get("base_model_name_or_path"),
        init_lora_weights=True,  # a module the state does not cover keeps B = 0: no change
        inference_mode=True,
    )
    base = next(iter(bases.values()), None)
    sources = {s: manifests[s].get("adapter_sha256") for s in chain}
    return Cumulative(config=config, state=state, chain=tuple(chain), rank=rank, base=base, sources=sources)


def _trained_stages(adapters_dir: Path) -> list[str]:
    from pipeline.stage_models import discover_stages

    return [s.name for s in discover_stages(adapters_dir)]


def export_stages(
    adapters_dir: str | Path,
    stages: list[str] | None,
    out_dir: str | Path,
    *,
    base: str | None,
    on_stage: Callable[[str, tuple[str, ...], int], None] | None = None,
) -> Path:
    """Write `<out>/<stage>/` (adapter_config.json, adapter_model.safetensors, raglora_export.json) per stage, each
    folder replaced atomically, and `<out>/manifest.json` listing every stage exported there.

    `stages` None: every trained stage. `base`: the base model the config names; a chain trained on another base
    is refused. `on_stage(stage, chain, rank)` is called after each folder is in place (progress lines).
    """
    from safetensors.torch import save_file

    from raglora.files import atomic_replace_dir, atomic_write_text

    adapters_dir = Path(adapters_dir)
    out = Path(out_dir)
    names = list(stages) if stages else _trained_stages(adapters_dir)
    if not names:
        raise RagloraError(f"export: no trained stage adapters under {adapters_dir} (run `raglora finetune` first)")
    built = [cumulative_adapter(adapters_dir, s) for s in names]  # every refusal before anything is written
    for c in built:
        if base and c.base and c.base != base:
            raise RagloraError(
                f"stage {c.chain[-1]} was trained on base {c.base}, not {base} (finetune.base); retrain it or "
                "export with the config it was trained with"
            )
    out.mkdir(parents=True, exist_ok=True)
    listing_path = out / "manifest.json"
    listing: dict = {"stages": {}}
    if listing_path.is_file():
        try:
            old = json.loads(listing_path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and isinstance(old.get("stages"), dict):
                listing = old
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # rewritten below
    for c in built:
        stage = c.chain[-1]
        final = out / stage
        tmp = out / f".tmp-{stage}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            c.config.save_pretrained(str(tmp))
            save_file(c.state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            weights = hashlib.sha256((tmp / "adapter_model.safetensors").read_bytes()).hexdigest()
            info = {
                "stage": stage,
                "chain": list(c.chain),
                "rank": c.rank,
                "base": base or c.base,
                "sources": c.sources,
                "adapter_sha256": weights,
            }
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            atomic_replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        listing["stages"][stage] = {"chain": list(c.chain), "rank": c.rank, "adapter_sha256": weights}
        if on_stage:
            on_stage(stage, c.chain, c.rank)
    listing["base"] = base or built[0].base
    atomic_write_text(listing_path, json.dumps(listing, indent=2, sort_keys=True) + "\n")
    return out


__all__ = ["Cumulative", "cumulative_adapter", "export_stages"]
