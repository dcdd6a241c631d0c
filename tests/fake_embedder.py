"""A deterministic stand-in for a sentence-transformers model, so unit tests never load real weights.

Texts become hashed bags of lower-cased words and character trigrams, L2-normalised: texts sharing
words score high cosine similarity, which is enough to test ranking, fusion, filters and persistence.
Usage: `from fake_embedder import FakeEmbedder` (tests/ is on sys.path via tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")


class FakeEmbedder:
    """Implements retriever.embedder.Embedder. `calls` and `texts_encoded` count work for incremental tests."""

    def __init__(self, dimension: int = 64, name: str = "fake-embedder"):
        self.name = name
        self.dimension = dimension
        self.calls = 0
        self.texts_encoded: list[str] = []

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        grams = [w[i : i + 3] for w in words for i in range(max(1, len(w) - 2))]
        return [f"w:{w}" for w in words] * 2 + [f"g:{g}" for g in grams]

    def _bucket(self, feature: str) -> tuple[int, float]:
        digest = hashlib.md5(feature.encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "little") % self.dimension, (1.0 if digest[4] & 1 else -1.0)

    def encode(self, texts: list[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        self.calls += 1
        self.texts_encoded.extend(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                col, sign = self._bucket(feature)
                out[row, col] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)
