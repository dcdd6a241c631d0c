"""`raglora merge`: fold a chain of trained stages into one full model folder (+ tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from finetune.model import load_merged_chain, read_manifest
from raglora.errors import RagloraError
from raglora.files import atomic_replace_dir


def stage_chain(adapters_dir: str | Path, stage: str) -> list[str]:
    """The stages to merge, in order, to reproduce `stage`: its parents, then itself."""
    return [*read_manifest(adapters_dir, stage).get("parents", []), stage]


def _lineage(adapters_dir: str | Path, chain: list[str]) -> set[str]:
    """Every stage whose training is contained in the chain (following continue_previous_adapter)."""
    seen: set[str] = set()
    todo = list(chain)
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        m = read_manifest(adapters_dir, s)
        todo += [p for p in [m.get("initialized_from"), *m.get("parents", [])] if p]
    return seen


def merge_stages(
    base: str,
    adapters_dir: str | Path,
    stages: list[str],
    out_dir: str | Path,
    *,
    cache_dir: str | Path,
    dtype: str = "float32",
) -> Path:
    """Write base + the stage chain ending at `stages[-1]` merged, loadable by AutoModelForCausalLM.

    `stages` may be the full chain (names from finetune.stages, in order) or just its last stage; listing a stage that
    the last one was not trained on top of is an error. Merging happens in fp32; `dtype` is the saved dtype.
    """
    if not stages:
        raise RagloraError(
            "merge: no stages given: pass --stages with the trained stage(s) to merge (names in finetune.stages)"
        )
    chain = stage_chain(adapters_dir, stages[-1])
    stray = [s for s in stages if s not in _lineage(adapters_dir, chain)]
    if stray:
        raise RagloraError(
            f"merge: stage {stages[-1]} was not trained on top of {stray}; its chain is {','.join(chain)}"
        )
    out = Path(out_dir)
    model, tok = load_merged_chain(base, adapters_dir, chain, cache_dir=cache_dir, device="cpu", dtype="float32")
    if dtype != "float32":
        from finetune.model import resolve_dtype

        model.to(resolve_dtype(dtype, "cpu"))
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {
            "base": base,
            "stages": chain,
            "adapters": {s: read_manifest(adapters_dir, s).get("adapter_sha256") for s in chain},
            "dtype": dtype,
        }
        (tmp / "raglora_merge.json").write_text(json.dumps(info, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
