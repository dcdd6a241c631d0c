"""SIGKILL a real `raglora index` process mid-build: the previous index still loads and answers; a rerun completes.

tests/retriever/test_index_atomic_write.py kills an in-process `build_index` at two exact points (before the
swap, between the renames). This kills the real CLI (`pipeline.cli.main` in its own process) at wall-clock
moments instead: while it embeds, and while it writes and fsyncs the new files.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_embedder import FakeEmbedder
from rel_helpers import REPO, SLOW_INDEX_CLI, child_env

from retriever.index import load_index

pytestmark = pytest.mark.slow

N_DOCS = 240


def _write_kb(kb: Path, version: int) -> None:
    kb.mkdir(parents=True, exist_ok=True)
    for i in range(N_DOCS):
        topic = f"topic{i:03d}"
        word = "granite" if version == 1 else "basalt"
        (kb / f"doc{i:03d}.md").write_text(f"# Section {topic}\n\nThe {topic} wall is made of {word} v{version}.\n")


def _cli(kb: Path, out: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SLOW_INDEX_CLI), "index", "--docs", str(kb), "--out", str(out)]
    cmd += ["--set", "index.chunk_size=300", "--set", "index.chunk_overlap=30"]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(kb: Path, out: Path) -> str:
    proc = _cli(kb, out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    return stdout.decode()


def _siblings(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock")}


def _assert_answers(out: Path, word: str) -> None:
    index = load_index(out, FakeEmbedder())
    assert len(index) == N_DOCS
    hit = index.search("topic117 wall", k=1, mode="hybrid")[0]
    assert hit.chunk.title == "Section topic117" and word in hit.chunk.text


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the build ended (rc {proc.returncode}) before the kill point"
        time.sleep(0.002)
    raise AssertionError("kill point not reached")


@pytest.mark.parametrize("moment", ["while_embedding", "while_writing_files"])
def test_sigkill_of_the_index_cli_keeps_the_previous_index_and_a_rerun_completes(tmp_path, moment):
    kb, out = tmp_path / "kb", tmp_path / "ix"
    _write_kb(kb, 1)
    assert f"{N_DOCS} chunks ({N_DOCS} embedded" in _run(kb, out)
    _assert_answers(out, "granite")

    _write_kb(kb, 2)  # every chunk changes: the next build re-embeds all of them
    progress = tmp_path / "progress.txt"
    if moment == "while_embedding":
        proc = _cli(kb, out, FAKE_EMBED_DELAY="0.02", FAKE_EMBED_PROGRESS=str(progress))
        _wait_for(lambda: progress.exists() and len(progress.read_text().split()) >= 5, proc)
    else:
        proc = _cli(kb, out, FAKE_FSYNC_DELAY="0.3")
        _wait_for(lambda: any(n.startswith(".ix.tmp-") for n in _siblings(out)), proc)
        time.sleep(0.2)  # inside the fsync of the first new file
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    _assert_answers(out, "granite")  # the previous index still loads and answers
    if moment == "while_writing_files":
        assert any(n.startswith(".ix.tmp-") for n in _siblings(out))  # the dead build's half-written folder

    stdout = _run(kb, out)  # the rerun completes and cleans up
    assert f"{N_DOCS} chunks ({N_DOCS} embedded, 0 reused" in stdout
    _assert_answers(out, "basalt")
    assert _siblings(out) == set()
