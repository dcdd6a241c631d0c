"""`raglora finetune` in a real process with every optimizer step slowed, so a test can SIGKILL it mid-stage.

    python tests/reliability/slow_finetune_cli.py finetune --config CFG [--resume]

Env: FAKE_STEP_DELAY (seconds added to each optimizer step). The hook is installed here, in the child.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

import torch  # noqa: E402

from pipeline.cli import main  # noqa: E402

_step = torch.optim.AdamW.step


def _slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ.get("FAKE_STEP_DELAY", "0")))
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = _slow_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
