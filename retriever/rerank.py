"""A cross-encoder reranker: re-scores (query, passage) pairs jointly, which a bi-encoder's cosine cannot.

`retriever.search.search(..., reranker=...)` applies it to the top `rerank_depth` fused hits. No cross-encoder
ships with bundled weights on the package index, so `retrieval.reranker` is a local model folder, or a Hugging
Face id already in the local cache (runs stay offline). sentence-transformers is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raglora.errors import RagloraError
from raglora.threads import side_work

_CACHE: dict[tuple[str, str], CrossEncoderReranker] = {}


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder behind the reranker protocol: `name` and `score(query, texts)`."""

    def __init__(self, name: str, model) -> None:
        self.name = name
        self.model = model

    def score(self, query: str, texts: list[str], *, batch_size: int = 32) -> np.ndarray:
        """One relevance score per text (higher is better), float32 of shape (len(texts),)."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        with side_work():  # single-threaded while a generation engine owns the CPU threads
            scores = self.model.predict(
                [(query, text) for text in texts], batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
            )
        return np.asarray(scores, dtype=np.float32).reshape(len(texts), -1)[:, 0]

    def __repr__(self) -> str:
        return f"CrossEncoderReranker({self.name!r})"


def load_reranker(name_or_path: str, *, device: str = "cpu") -> CrossEncoderReranker:
    """Load (once per process) a CrossEncoder from a local folder or a locally cached Hugging Face id."""
    if not name_or_path or not name_or_path.strip():
        raise RagloraError("reranker name is empty: set retrieval.reranker to a model folder or id, or null")
    key = (name_or_path, device)
    if key in _CACHE:
        return _CACHE[key]
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise RagloraError(f"reranker path is not a model folder (no config.json): {path}")
    from sentence_transformers import CrossEncoder

    try:
        model = CrossEncoder(str(path) if looks_local else name_or_path, device=device, local_files_only=True)
    except Exception as exc:  # format/hub errors come in many types
        hint = "" if looks_local else " (offline: only models already in the local Hugging Face cache can load)"
        first = (str(exc).splitlines() or [""])[0]
        raise RagloraError(f"could not load reranker {name_or_path!r}{hint}: {type(exc).__name__}: {first}") from exc
    labels = int(getattr(model, "num_labels", 1))
    if labels != 1:
        raise RagloraError(
            f"reranker {name_or_path!r} has {labels} output labels; a cross-encoder reranker scores relevance with one"
        )
    _CACHE[key] = reranker = CrossEncoderReranker(name_or_path, model)
    return reranker
