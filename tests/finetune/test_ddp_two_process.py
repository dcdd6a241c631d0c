"""Multi-process training goes through accelerate (DDP): 2 CPU processes with gloo via torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist
from ft_helpers import tiny_model_cfg

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_smoke_run(tiny_base, stage_data, tmp_path):
    assert dist.is_gloo_available()
    tiny_model_cfg(tiny_base)  # writes the short system prompt files the worker uses
    out = tmp_path / "adapters"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"), str(tiny_base), str(stage_data), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "general" / "manifest.json").read_text())
    assert m["metrics"]["world_size"] == 2
    assert m["metrics"]["optimizer_steps"] == 2
    assert m["metrics"]["ddp_params_in_sync"] is True
    assert (out / "general" / "adapter_model.safetensors").is_file()
    log = [json.loads(x) for x in (out / "general" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
