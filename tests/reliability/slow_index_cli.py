"""`raglora index` in a real process with a deliberately slow fake embedder, so a test can SIGKILL it mid-build.

    python tests/reliability/slow_index_cli.py index --docs KB --out IX [--set ...]

Env: FAKE_EMBED_DELAY (seconds per batch of 8 texts), FAKE_EMBED_PROGRESS (file that gets one line per batch),
FAKE_FSYNC_DELAY (seconds added to every os.fsync, to widen the window in which the index files are written).
No test-process monkeypatching: the hooks are installed here, in the child, before `pipeline.cli.main` runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

import numpy as np  # noqa: E402
from fake_embedder import FakeEmbedder  # noqa: E402

import retriever.embedder  # noqa: E402


class SlowFakeEmbedder(FakeEmbedder):
    def encode(self, texts, *, batch_size=64, show_progress=False):
        delay = float(os.environ.get("FAKE_EMBED_DELAY", "0"))
        progress = os.environ.get("FAKE_EMBED_PROGRESS")
        parts = []
        for i in range(0, len(texts), 8):
            parts.append(super().encode(texts[i : i + 8]))
            if progress:
                with open(progress, "a") as f:
                    f.write(f"{i + len(parts[-1])}\n")
            time.sleep(delay)
        return np.concatenate(parts) if parts else np.zeros((0, self.dimension), dtype=np.float32)


def _slow_fsync(real):
    delay = float(os.environ.get("FAKE_FSYNC_DELAY", "0"))

    def fsync(fd):
        time.sleep(delay)
        return real(fd)

    return fsync


if __name__ == "__main__":
    retriever.embedder.load_embedder = lambda name, device="cpu": SlowFakeEmbedder()
    if float(os.environ.get("FAKE_FSYNC_DELAY", "0")) > 0:
        os.fsync = _slow_fsync(os.fsync)
    from pipeline.cli import main

    sys.exit(main(sys.argv[1:]))
