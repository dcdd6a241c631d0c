"""finetune.allocator: which malloc `raglora finetune` re-executes itself on, and the errors a bad setting gets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from finetune import allocator
from raglora.errors import RagloraError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


@linux
def test_auto_prefers_the_first_installed_allocator_in_order(monkeypatch, tmp_path):
    installed = {"jemalloc": tmp_path / "libjemalloc.so.2", "mimalloc": tmp_path / "libmimalloc.so.3"}
    monkeypatch.setattr(allocator, "find_allocator", installed.get)
    assert allocator.resolve_allocator("auto") == installed["jemalloc"]  # tcmalloc missing, jemalloc next
    assert allocator.resolve_allocator("mimalloc") == installed["mimalloc"]
    del installed["jemalloc"]
    assert allocator.resolve_allocator("auto") == installed["mimalloc"]
    assert allocator.resolve_allocator("system") is None


@linux
def test_a_named_allocator_that_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(allocator, "find_allocator", lambda name: None)
    with pytest.raises(RagloraError, match="tcmalloc is not installed here: apt-get install libtcmalloc"):
        allocator.resolve_allocator("tcmalloc")
    with pytest.raises(RagloraError, match="'nosuch.so' is neither auto, system"):
        allocator.resolve_allocator("nosuch.so")


@linux
def test_the_mimalloc_dependency_is_found_in_site_packages():
    lib = allocator.find_allocator("mimalloc")
    assert lib is not None and lib.is_file()


def test_preload_env_puts_the_library_first_and_marks_the_process(tmp_path):
    lib = tmp_path / "libmimalloc.so.3"
    env = allocator.preload_env(lib, {"LD_PRELOAD": "/x/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so" and env[allocator.ACTIVE_ENV] == str(lib)
    assert allocator.preload_env(None, {"PATH": "/bin"}) == {"PATH": "/bin"}
    # mimalloc keeps freed pages (its default returns them after 10 ms: 1.5x slower training), unless told otherwise
    assert env["MIMALLOC_PURGE_DELAY"] == "-1"
    assert allocator.preload_env(lib, {"MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"


def test_relaunch_happens_once(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv(allocator.ACTIVE_ENV, "/already/libmimalloc.so.3")
    allocator.relaunch_with_allocator("auto")
    assert calls == []  # the re-executed process does not re-execute again
    monkeypatch.delenv(allocator.ACTIVE_ENV)
    allocator.relaunch_with_allocator("system")
    assert calls == []


@linux
def test_relaunch_re_executes_the_same_command_with_the_library_preloaded(monkeypatch, tmp_path):
    lib = tmp_path / "libmimalloc.so.3"
    calls = []
    monkeypatch.delenv(allocator.ACTIVE_ENV, raising=False)
    monkeypatch.setattr(allocator, "find_allocator", lambda name: lib if name == "mimalloc" else None)
    monkeypatch.setattr(allocator.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(allocator.sys, "orig_argv", ["python", "-m", "pipeline.cli", "finetune", "--config", "x"])
    allocator.relaunch_with_allocator("auto")
    ((exe, argv, env),) = calls
    assert exe == sys.executable and argv == [sys.executable, "-m", "pipeline.cli", "finetune", "--config", "x"]
    assert env["LD_PRELOAD"].split(":")[0] == str(lib)


@linux
def test_the_active_allocator_is_read_from_the_memory_map():
    import os
    import subprocess

    code = "from finetune.allocator import active_allocator; print(active_allocator())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ACTIVE_ENV)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])

    def run(env):
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()

    assert run(env) == "system"
    assert run(allocator.preload_env(allocator.find_allocator("mimalloc"), env)) == "mimalloc"
