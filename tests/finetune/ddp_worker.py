"""Run by test_ddp_two_process.py under `torchrun --nproc_per_node=2` (CPU, gloo): one tiny stage, 2 steps."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

from ft_helpers import tiny_cfg  # noqa: E402

from finetune.config import ModelConfig  # noqa: E402
from finetune.stages import run_finetune  # noqa: E402


def main() -> None:
    base, data_dir, out = (Path(a) for a in sys.argv[1:4])
    cfg = tiny_cfg(n_stages=1, max_steps=2)
    # the prompt files were written by the test before launch (two ranks writing them could race)
    model_cfg = ModelConfig(
        base=str(base),
        device="cpu",
        max_length=256,
        system_prompt_file=str(base.parent / "system.txt"),
        rag_system_prompt_file=str(base.parent / "system_rag.txt"),
    )
    run_finetune(cfg, model_cfg, data_dir=data_dir, adapters_dir=out, cache_dir=out / "cache", index_dir=None)


if __name__ == "__main__":
    main()
