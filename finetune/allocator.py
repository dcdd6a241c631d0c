"""The memory allocator a training process runs on (Linux).

Training frees and re-allocates gigabytes of activations every step, in shapes that change with every batch.
glibc's malloc keeps the freed pieces fragmented in its heap: the demo's RAFT stage peaked at 2.6x the tensors
it holds. A size-class allocator reuses them and stays near the tensors' own size. It has to be in place before
the process allocates anything, so `raglora finetune` and `raglora demo` re-execute themselves once with it in
LD_PRELOAD (`relaunch_with_allocator`), as the `finetune.allocator` setting says:

- `auto` (default): the first found of `PREFERENCE`; mimalloc is a dependency of raglora on Linux, so one
  always is;
- `tcmalloc` / `mimalloc` / `jemalloc`: that one, or an error naming how to install it;
- a path to a shared library;
- `system`: the C library's malloc (tuned by `finetune.train.tune_cpu_malloc`).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
from pathlib import Path

from raglora.errors import RagloraError

#: allocator -> shared library file names, most specific first
LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
#: what `auto` takes, in order. Measured on the demo's RAFT stage (peak RSS / counted tensors, real tokens/s;
#: glibc: 2.59x, 261): tcmalloc 1.31x, 277; jemalloc 1.30x, 226; mimalloc 1.42x, 301 (with SETTINGS; its
#: default of returning freed pages after 10 ms: 1.36x, 205). mimalloc is the one pip installs everywhere.
PREFERENCE = ("tcmalloc", "jemalloc", "mimalloc")
#: environment an allocator runs with unless the user's environment already says otherwise
SETTINGS = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"}}  # keep freed pages for the next step's activations
INSTALL = {
    "tcmalloc": "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu)",
    "mimalloc": "pip install cmeel-mimalloc",
    "jemalloc": "apt-get install libjemalloc2 (Debian/Ubuntu)",
}
#: set in the re-executed process: the library it runs on (and so it never re-executes again)
ACTIVE_ENV = "RAGLORA_ALLOCATOR_ACTIVE"


def _search_dirs() -> list[Path]:
    """The pip-installed copy (cmeel packages unpack into <site-packages>/cmeel.prefix/lib) first, then the
    system's library folders."""
    sites = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")} | {p for p in sys.path if p}
    arch = f"{platform.machine()}-linux-gnu"
    system = ["/usr/local/lib", f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib"]
    return [Path(s) / "cmeel.prefix" / "lib" for s in sorted(sites)] + [Path(d) for d in system]


def find_allocator(name: str) -> Path | None:
    """The shared library of allocator `name` (see LIBRARIES), or None when it is not installed."""
    for directory in _search_dirs():
        for lib in LIBRARIES[name]:
            if (directory / lib).is_file():
                return directory / lib
    return None


def resolve_allocator(choice: str) -> Path | None:
    """The library `choice` (a `finetune.allocator` value) names, None for the C library's malloc."""
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        return next((lib for name in PREFERENCE if (lib := find_allocator(name))), None)
    if choice in LIBRARIES:
        lib = find_allocator(choice)
        if lib is None:
            raise RagloraError(f"finetune.allocator: {choice} is not installed here: {INSTALL[choice]}, or use auto")
        return lib
    path = Path(choice).expanduser()
    if not path.is_file():
        raise RagloraError(
            f"finetune.allocator: {choice!r} is neither auto, system, {', '.join(LIBRARIES)} nor an existing "
            "shared library file"
        )
    return path.resolve()


def preload_env(lib: Path | None, env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's) whose processes run on `lib` (None: the C library's malloc)."""
    env = dict(os.environ if env is None else env)
    if lib is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
        env[ACTIVE_ENV] = str(lib)
        name = next((n for n, libs in LIBRARIES.items() if any(lib.name.startswith(x) for x in libs)), None)
        env = {**SETTINGS.get(name, {}), **env}
    return env


def relaunch_with_allocator(choice: str) -> None:
    """Re-execute this command with the allocator in LD_PRELOAD, once; returns when nothing is to be done (not
    Linux, `system`, none found, or already running on it). Call before the process allocates anything large."""
    if os.environ.get(ACTIVE_ENV):
        return
    lib = resolve_allocator(choice)
    if lib is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], preload_env(lib))


def active_allocator() -> str:
    """The allocator this process runs on, read from its own memory map (so a hand-set LD_PRELOAD counts too)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name, libs in LIBRARIES.items():
        if any(f"/{lib}" in maps for lib in libs):
            return name
    return "system"
