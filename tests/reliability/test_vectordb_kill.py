"""SIGKILL a process mid-way through updating an embedded Qdrant collection: the index still loads and answers,
and a rerun finishes the update, embedding only what the killed one had not written.

The child is this file run as a script: `build_index(backend="qdrant")` with a slow fake embedder and small
upsert rounds, so the kill lands after some rounds of new points are written and before the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from fake_embedder import FakeEmbedder  # noqa: E402

from retriever.vectordb import release  # noqa: E402

pytestmark = pytest.mark.slow

N_DOCS = 400
ROUND = 40  # texts embedded and upserted per round in the child


def _write_kb(kb: Path, word: str) -> None:
    kb.mkdir(parents=True, exist_ok=True)
    for i in range(N_DOCS):
        (kb / f"doc{i:03d}.md").write_text(f"# Section topic{i:03d}\n\nThe topic{i:03d} wall is made of {word}.\n")


class SlowFakeEmbedder(FakeEmbedder):
    """Sleeps per call and appends the number of texts to FAKE_EMBED_PROGRESS, so the test knows where it is."""

    def encode(self, texts, *, batch_size=64, show_progress=False):
        out = super().encode(texts)
        time.sleep(float(os.environ.get("FAKE_EMBED_DELAY", "0")))
        if os.environ.get("FAKE_EMBED_PROGRESS"):
            with open(os.environ["FAKE_EMBED_PROGRESS"], "a") as f:
                f.write(f"{len(texts)}\n")
        return out


def _build(kb: Path, out: Path, embedder) -> tuple[int, int]:
    from retriever.index import build_index

    report = build_index([kb], out, embedder, chunk_size=300, chunk_overlap=30, show_progress=False, backend="qdrant")
    return report.embedded, report.n_chunks


def _child(kb: Path, out: Path, progress: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "FAKE_EMBED_PROGRESS": str(progress), "FAKE_EMBED_DELAY": str(delay), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, __file__, str(kb), str(out)], env=env, stderr=subprocess.PIPE)


def _answers(out: Path) -> list[str]:
    """Load the index and search every topic's wall; returns the material each top hit names."""
    from retriever.index import load_index

    index = load_index(out, FakeEmbedder())
    assert len(index) == N_DOCS
    words = []
    for i in range(0, N_DOCS, 40):
        hit = index.search(f"topic{i:03d} wall", k=1, mode="hybrid")[0]
        assert hit.chunk.title == f"Section topic{i:03d}"
        words.append(hit.chunk.text.split()[-1].rstrip("."))
    index.close()  # unlock the embedded storage for the next process
    return words


def test_sigkill_mid_update_leaves_a_searchable_collection_and_a_rerun_completes(tmp_path):
    kb, out, progress = tmp_path / "kb", tmp_path / "ix", tmp_path / "progress.txt"
    _write_kb(kb, "granite")
    proc = _child(kb, out, progress, 0.0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    assert set(_answers(out)) == {"granite"}

    _write_kb(kb, "basalt")  # every chunk changes: the update re-embeds and rewrites all of them
    progress.unlink()
    proc = _child(kb, out, progress, 0.15)
    deadline = time.monotonic() + 60
    while not (progress.exists() and len(progress.read_text().split()) >= 3):
        assert proc.poll() is None, f"the update ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    words = _answers(out)  # opens and answers: every point is an old or a new one, none half-written
    assert set(words) <= {"granite", "basalt"}

    embedded, n_chunks = _build(kb, out, FakeEmbedder())
    release(out / "qdrant")  # the rerun embeds only what the killed one had not
    assert n_chunks == N_DOCS and 0 < embedded <= N_DOCS - 2 * ROUND
    assert set(_answers(out)) == {"basalt"}
    assert np.all([word == "basalt" for word in _answers(out)])


if __name__ == "__main__":
    import retriever.vectordb

    retriever.vectordb.EMBED_BATCH = ROUND
    _build(Path(sys.argv[1]), Path(sys.argv[2]), SlowFakeEmbedder())
