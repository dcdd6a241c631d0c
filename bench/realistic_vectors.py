"""Realistic vectors for the retrieval scale benchmark: this project's own embeddings, extended to N.

Uniform random unit vectors have no neighbourhood structure, and vectors drawn around a few random centres are
trivially separable (every ANN index scored recall@10 = 1.00 on them). Real embeddings are neither, but this
project has only a few thousand texts. So:

1. Base: every text the project has, encoded with the configured embedder. That is the chunks of `index.docs`
   (`index_text`, what `raglora index` embeds), and the questions and answers of every data/ split. Held-out
   questions (data/{domain,subdomain}/test.jsonl and data/eval/*.jsonl) are left out of the base: they are
   the queries. Duplicate texts are encoded once.
2. Spread: the median Euclidean distance from a real base vector to its nearest other real vector.
3. Synthetic vectors: a random convex mixture (Dirichlet(1) weights) of 2 or 3 real vectors: an anchor drawn
   uniformly from the base and 1-2 partners among its 10 nearest real neighbours, so mixtures stay in the
   regions the corpus occupies instead of between unrelated topics. The mixture is normalised, Gaussian noise of
   norm about `sigma` is added, and it is normalised again. `sigma` is calibrated by bisection on a sample so
   that the median distance of a synthetic vector to its nearest real vector equals the measured spread:
   synthetic points sit about as far from the real ones as real points sit from each other.
4. Queries: the held-out question embeddings (any within cosine 0.9999 of a base vector dropped), then mixtures
   anchored at a held-out question with partners among its nearest base vectors, with the same noise. So no
   query equals a base vector.

The N rows are the real base (first, as many as fit), then synthetic rows, generated in chunks into one
preallocated array or `np.lib.format.open_memmap` file (1M x 384 float32 = 1.5 GB; no second copy). Every chunk
draws from its own generator seeded by (seed, chunk number): the same seed gives the same vectors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEIGHBOURS = 10  # partners come from an anchor's nearest real neighbours
CHUNK_ROWS = 32_768  # synthetic rows per generation chunk (a few (chunk, d) temporaries at a time)
SAME = 0.9999  # cosine at or above which two unit vectors count as the same vector


@dataclass
class ProjectTexts:
    base: list[str]  # what the index holds: chunks and every non-held-out question and answer
    queries: list[str]  # held-out questions


@dataclass
class Spread:
    real_nn: float  # median distance from a real vector to its nearest other real vector
    sigma: float  # noise norm added to mixtures
    synthetic_nn: float  # median distance from a synthetic vector to its nearest real vector, at sigma


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _row_texts(row: dict) -> list[str]:
    texts = [row.get("question"), row.get("answer")]
    texts += [m.get("content") for m in row.get("messages") or [] if isinstance(m, dict)]
    return [t.strip() for t in texts if isinstance(t, str) and re.search(r"\w", t)]  # not "," or "?"


def project_texts(data_dir: str | Path, docs: list[str], *, chunk_size: int, chunk_overlap: int) -> ProjectTexts:
    """Every text of the project: the chunks of `docs` and data/ splits as base, held-out questions as queries."""
    from retriever.chunking import chunk_documents
    from retriever.documents import load_documents

    data = Path(data_dir)
    held_out = [data / "domain" / "test.jsonl", data / "subdomain" / "test.jsonl", *sorted(data.glob("eval/*.jsonl"))]
    queries = list(dict.fromkeys(r["question"].strip() for p in held_out if p.is_file() for r in _rows(p)
                                 if isinstance(r.get("question"), str) and r["question"].strip()))  # fmt: skip
    documents, _ = load_documents(docs)
    texts = [c.index_text for c in chunk_documents(documents, chunk_size=chunk_size, chunk_overlap=chunk_overlap)]
    held = set(held_out)
    for path in sorted(data.glob("*/*.jsonl")):
        if path not in held:
            texts += [t for row in _rows(path) for t in _row_texts(row)]
    asked = set(queries)
    return ProjectTexts(base=[t for t in dict.fromkeys(texts) if t not in asked], queries=queries)


def _nearest(points: np.ndarray, ref: np.ndarray, k: int, *, self_excluded: bool, block: int = 2048):
    """(cosines, ids) of the k nearest `ref` rows of each point, best first; `self_excluded` when points is ref."""
    sims_out = np.empty((len(points), k), dtype=np.float32)
    ids_out = np.empty((len(points), k), dtype=np.int64)
    for i in range(0, len(points), block):
        sims = points[i : i + block] @ ref.T  # (block, n_ref)
        if self_excluded:
            rows = np.arange(sims.shape[0])
            sims[rows, i + rows] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        ids_out[i : i + block] = np.take_along_axis(top, order, axis=1)
        sims_out[i : i + block] = np.take_along_axis(sims, ids_out[i : i + block], axis=1)
    return sims_out, ids_out


def distance(cosine: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors with this cosine."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cosine))


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _mix(anchors: np.ndarray, partners: np.ndarray, weights: np.ndarray, noise: np.ndarray, sigma: float):
    """Unit rows: normalise(normalise(w0 anchor + w1 p1 + w2 p2) + sigma * noise). Shapes (m,d), (2,m,d), (m,3)."""
    out = weights[:, :1] * anchors + weights[:, 1:2] * partners[0] + weights[:, 2:3] * partners[1]
    _normalise(out)
    out += sigma * noise
    return _normalise(out)


def _draw(rng: np.random.Generator, m: int, dim: int, n_partner_choices: int):
    """Random mixture recipe: partner columns (2,m), weights (m,3) with 2 or 3 parts, unit-norm-ish noise (m,d)."""
    cols = rng.integers(0, n_partner_choices, (2, m))
    weights = rng.dirichlet(np.ones(3), m).astype(np.float32)
    weights[rng.random(m) < 0.5, 2] = 0.0  # half the mixtures have 2 parts
    weights /= weights.sum(axis=1, keepdims=True)
    noise = rng.standard_normal((m, dim), dtype=np.float32) / np.float32(np.sqrt(dim))  # norm ~ 1
    return cols, weights, noise


def neighbours(base: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(n, k) ids of each base vector's nearest other base vectors."""
    return _nearest(base, base, min(k, len(base) - 1), self_excluded=True)[1]


def calibrate(base: np.ndarray, nbrs: np.ndarray, *, seed: int = 0, sample: int = 2000) -> Spread:
    """Measure the real spread and find the noise norm that gives synthetic vectors the same nearest distance."""
    real_nn = float(np.median(distance(_nearest(base, base, 1, self_excluded=True)[0][:, 0])))
    rng = np.random.default_rng([seed, 0])
    anchor = rng.integers(0, len(base), sample)
    cols, weights, noise = _draw(rng, sample, base.shape[1], nbrs.shape[1])
    partners = base[nbrs[anchor[None, :], cols]]  # (2, sample, d)

    def synthetic_nn(sigma: float) -> float:
        x = _mix(base[anchor], partners, weights, noise, sigma)
        return float(np.median(distance(_nearest(x, base, 1, self_excluded=False)[0][:, 0])))

    lo, hi = 0.0, 4.0  # the same draws at every sigma, so synthetic_nn grows with sigma
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if synthetic_nn(mid) < real_nn else (lo, mid)
    sigma = (lo + hi) / 2
    return Spread(real_nn=real_nn, sigma=sigma, synthetic_nn=synthetic_nn(sigma))


def realistic_vectors(
    base: np.ndarray,
    n: int,
    *,
    nbrs: np.ndarray,
    sigma: float,
    seed: int = 0,
    out: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """(n, d) float32 unit rows: the real base first, then mixtures. `out`: a preallocated (n, d) array or memmap."""
    dim = base.shape[1]
    out = np.empty((n, dim), dtype=np.float32) if out is None else out
    n_real = min(n, len(base))
    out[:n_real] = base[:n_real]
    for start in range(n_real, n, CHUNK_ROWS):
        m = min(CHUNK_ROWS, n - start)
        rng = np.random.default_rng([seed, 1, start // CHUNK_ROWS])
        anchor = rng.integers(0, len(base), m)
        cols, weights, noise = _draw(rng, m, dim, nbrs.shape[1])
        out[start : start + m] = _mix(base[anchor], base[nbrs[anchor[None, :], cols]], weights, noise, sigma)
        if progress:
            progress(start + m, n)
    return out


def realistic_queries(
    questions: np.ndarray, base: np.ndarray, n: int, *, sigma: float, seed: int = 0
) -> tuple[np.ndarray, int]:
    """(n, d) queries and how many are real: held-out question vectors not in the base, then mixtures of them."""
    q_sims, q_nbrs = _nearest(questions, base, min(NEIGHBOURS, len(base)), self_excluded=False)
    real = questions[q_sims[:, 0] < SAME]
    n_real = min(n, len(real))
    m = n - n_real
    if m == 0:
        return real[:n].copy(), n_real
    real_nbrs = q_nbrs[q_sims[:, 0] < SAME]
    rng = np.random.default_rng([seed, 2])
    anchor = rng.integers(0, len(real), m)
    cols, weights, noise = _draw(rng, m, base.shape[1], real_nbrs.shape[1])
    mixed = _mix(real[anchor], base[real_nbrs[anchor[None, :], cols]], weights, noise, sigma)
    return np.concatenate([real[:n_real], mixed]).astype(np.float32), n_real
