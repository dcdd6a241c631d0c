"""A crash at any point of a build leaves the previous index loadable, and the next build cleans up."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kb_helpers import faq_rows, write_jsonl

import retriever.index as index_module
from retriever.index import build_index, load_index

SETTINGS = {"chunk_size": 300, "chunk_overlap": 30, "show_progress": False}
REPO = Path(__file__).resolve().parents[2]


def _edit_kb(kb: Path) -> None:
    rows = faq_rows()
    rows[0]["answer"] = "Brand new answer about zinc gutters."
    write_jsonl(kb / "faq.jsonl", rows)


def _answers_old_content(out: Path, embedder) -> None:
    index = load_index(out, embedder)
    assert index.chunks[0].chunk_id == "roofing-001" and "zinc" not in index.chunks[0].text
    assert index.search("roof tiles frost winter", k=1)[0].chunk.chunk_id == "roofing-001"


def _siblings(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock")}


def test_failure_while_writing_keeps_the_previous_index_and_leaves_no_temp(kb, tmp_path, embedder, monkeypatch):
    out = tmp_path / "ix"
    build_index([kb], out, embedder, **SETTINGS)
    _edit_kb(kb)
    real_write = index_module._write_files

    def write_then_fail(folder, *args):
        real_write(folder, *args)
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_files", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_index([kb], out, embedder, **SETTINGS)
    _answers_old_content(out, embedder)
    assert _siblings(out) == set()


def test_failure_between_the_two_renames_falls_back_to_the_kept_previous_index(kb, tmp_path, embedder, monkeypatch):
    out = tmp_path / "ix"
    build_index([kb], out, embedder, **SETTINGS)
    _edit_kb(kb)
    real_rename, calls = index_module._rename, []

    def rename_fails_second_time(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(index_module, "_rename", rename_fails_second_time)
    with pytest.raises(OSError, match="power cut"):
        build_index([kb], out, embedder, **SETTINGS)
    assert not out.exists()
    _answers_old_content(out, embedder)

    monkeypatch.setattr(index_module, "_rename", real_rename)
    build_index([kb], out, embedder, **SETTINGS)
    assert "zinc" in load_index(out, embedder).chunks[0].text
    assert _siblings(out) == set()


CRASHING_BUILD = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from fake_embedder import FakeEmbedder
import retriever.index as ri

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if {point!r} == "before_swap":
    ri._swap_into_place = die
else:
    real, calls = ri._rename, []
    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            die()
        real(src, dst)
    ri._rename = rename
ri.build_index([{kb!r}], {out!r}, FakeEmbedder(), chunk_size=300, chunk_overlap=30, show_progress=False)
"""


@pytest.mark.parametrize("point", ["before_swap", "between_renames"])
def test_sigkill_mid_build_leaves_a_loadable_index_and_the_next_build_cleans_up(kb, tmp_path, embedder, point):
    out = tmp_path / "ix"
    build_index([kb], out, embedder, **SETTINGS)
    _edit_kb(kb)
    script = CRASHING_BUILD.format(repo=str(REPO), tests=str(REPO / "tests"), point=point, kb=str(kb), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    if point == "before_swap":  # the dead build's temp folder is left behind ...
        assert [n for n in _siblings(out) if n.startswith(".ix.tmp-")] and out.is_dir()
    else:  # ... or the previous index sits in .ix.old with no index in place
        assert ".ix.old" in _siblings(out) and not out.exists()
    _answers_old_content(out, embedder)  # ... yet the previous index still loads and answers

    build_index([kb], out, embedder, **SETTINGS)
    assert "zinc" in load_index(out, embedder).chunks[0].text
    assert _siblings(out) == set()
