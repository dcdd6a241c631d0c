"""SIGKILL `raglora finetune` mid-stage: finished stages stay intact and `--resume` continues the curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetune"))

from ft_helpers import write_stage_data  # noqa: E402
from tiny_model import save_tiny_model  # noqa: E402

from raglora.files import file_sha256  # noqa: E402


def _config(tmp_path: Path) -> Path:
    data = write_stage_data(tmp_path / "data")
    base = save_tiny_model(tmp_path / "base")
    stage = {"batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0}
    cfg = {
        "paths": {
            "data_dir": str(data),
            "adapters_dir": str(tmp_path / "adapters"),
            "base_cache_dir": str(tmp_path / "cache"),
        },
        "model": {"base": str(base), "device": "cpu"},
        "finetune": {
            "save_steps": 2,
            "stages": [
                {"name": "general", "train_file": "general/train.jsonl", "max_steps": 2, **stage},
                {"name": "domain", "train_file": "domain/train.jsonl", "max_steps": 20, **stage},
            ],
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, *extra: str, delay: str = "0") -> subprocess.Popen:
    env = {**os.environ, "FAKE_STEP_DELAY": delay, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "slow_finetune_cli.py"), "finetune", "--config", str(cfg), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_sigkill_mid_stage_keeps_finished_stages_and_resume_continues(tmp_path):
    cfg = _config(tmp_path)
    adapters = tmp_path / "adapters"
    proc = _run(cfg, delay="0.4")
    checkpoints = adapters / ".checkpoints" / "domain"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoints.exists() and any(checkpoints.rglob("*.safetensors"))):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    general = adapters / "general"
    assert (general / "manifest.json").is_file() and not (adapters / "domain" / "manifest.json").exists()
    before = file_sha256(general / "adapter_model.safetensors")

    done = _run(cfg, "--resume")
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    manifest = json.loads((adapters / "domain" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] >= 2
    steps = _steps(adapters / "domain" / "train_log.jsonl")
    assert steps == sorted(steps) and steps[-1] == 20 and len(set(steps)) == len(steps)
    assert file_sha256(general / "adapter_model.safetensors") == before  # the finished stage was not retrained


def test_corrupt_adapter_files_are_errors_naming_the_file(tmp_path):
    from finetune.model import load_for_inference
    from raglora.errors import RagloraError

    cfg = _config(tmp_path)
    proc = _run(cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    adapters = tmp_path / "adapters"
    base = yaml.safe_load(cfg.read_text())["model"]["base"]
    (adapters / "domain" / "manifest.json").write_text("{truncated")
    with pytest.raises(RagloraError, match="domain/manifest.json"):
        load_for_inference(base, adapters, "domain", cache_dir=tmp_path / "cache", device="cpu")
    weights = adapters / "general" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RagloraError, match="general"):
        load_for_inference(base, adapters, "general", cache_dir=tmp_path / "cache", device="cpu")
