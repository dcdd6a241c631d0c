"""CPU threads while a generation engine runs: the engine's thread keeps torch's intra-op threads, other threads
run their torch work (the embedder) on one thread.

On CPU, once two threads each run multi-threaded torch ops, both lose much of the pool's speed: on 2 cores a
decode step of SmolLM2-135M goes from 32 to 56 ms (`python -m bench.omp_threads`). Serving runs the language
model on the engine's worker thread and the embedder (retrieval, citation checks) on the event loop's worker
threads, concurrently, so while an engine is running `side_work()` keeps embedder calls single-threaded. Index
builds and everything outside a running engine keep every thread. RAGLORA_ENGINE_OWNS_THREADS=0 turns this off
(every thread keeps torch's setting), e.g. on a machine with many cores.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_lock = threading.Lock()
_engines = 0


def engine_owns_threads() -> bool:
    return os.environ.get("RAGLORA_ENGINE_OWNS_THREADS", "1") != "0"


def engine_started() -> None:
    global _engines
    if not engine_owns_threads():
        return
    with _lock:
        _engines += 1


def engine_stopped() -> None:
    global _engines
    with _lock:
        _engines = max(0, _engines - 1)


@contextlib.contextmanager
def side_work():
    """Run the block's torch ops on one thread while an engine is running (else unchanged)."""
    threads = torch.get_num_threads()
    if not _engines or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
