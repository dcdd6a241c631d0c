"""Why the engine's worker thread can decode slower than the main thread: one decode forward of the base model
timed on the main thread and on a worker thread, in the order serving runs them.

    .venv/bin/python -m bench.omp_threads [--base packaged:smollm2-135m-instruct] [--cache-dir artifacts/base]

Each line is the median of 30 single-token forwards (KV cache, 280-token prompt). On 2 cores the first thread to
run the model decodes at full speed; once a second thread has also run torch ops (the embedder on the event loop,
the merging of stage copies on the main thread), both decode at roughly single-core speed.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time

from bench.common import DEFAULT_BASE, DEFAULT_CACHE, md_table, median, write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--out-dir", default="reports/bench")
    args = ap.parse_args(argv)

    import torch

    from finetune.model import load_base

    model, tok = load_base(args.base, cache_dir=args.cache_dir, device="cpu")
    ids = torch.tensor([tok("How do I apply for a permit for my house? " * 25)["input_ids"]])

    def decode_ms() -> float:
        with torch.inference_mode():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        return round(median(times) * 1000, 2)

    jobs: queue.Queue = queue.Queue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            job()

    def on_worker() -> float:
        box: list[float] = []
        done = threading.Event()
        jobs.put(lambda: (box.append(decode_ms()), done.set()))
        done.wait()
        return box[0]

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    rows = [["worker thread, first to run the model", on_worker()]]
    rows.append(["main thread, afterwards", decode_ms()])
    rows.append(["worker thread again", on_worker()])
    rows.append(["main thread again", decode_ms()])
    jobs.put(None)
    write_report(
        "omp_threads",
        args=vars(args),
        results={"decode_ms": {r[0]: r[1] for r in rows}, "torch_threads": torch.get_num_threads()},
        tables={f"Decode ms per token of {args.base} by thread, in order": md_table(["where", "ms/token"], rows)},
        out_dir=args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
