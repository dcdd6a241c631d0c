"""Fixtures for the finetune tests: a tiny model folder and a trained 3-stage run shared per module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `.venv/bin/pytest` (unlike `python -m pytest`) does not put the repo root on sys.path, and pytest's
# rootdir insertion puts tests/ first, where tests/finetune/ would shadow the real `finetune` package as a
# namespace package. Put the repo root first and drop a shadowing namespace module if one got imported.
_REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ft_helpers
sys.path.insert(0, str(_REPO))
for _name in [m for m in sys.modules if m == "finetune" or m.startswith("finetune.")]:
    if getattr(sys.modules[_name], "__file__", None) is None:
        del sys.modules[_name]

from ft_helpers import StubIndex, faq_rows, tiny_cfg, tiny_model_cfg, write_stage_data  # noqa: E402
from tiny_model import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def stage_data(tmp_path_factory) -> Path:
    return write_stage_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_base, stage_data):
    """general -> domain (RAFT on a stub index) -> subdomain, 2 steps each, on the tiny model."""
    from finetune.stages import run_finetune

    root = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg()
    cfg.stages[1].raft = True
    cfg.stages[2].replay_fraction = 0.4
    model_cfg = tiny_model_cfg(tiny_base)
    index = StubIndex(faq_rows("bygglov") + faq_rows("tillbyggnad", 5))
    kwargs = dict(data_dir=stage_data, adapters_dir=root / "adapters", cache_dir=root / "cache", index_dir=None)
    summaries = run_finetune(cfg, model_cfg, index=index, **kwargs)
    return {"cfg": cfg, "model_cfg": model_cfg, "index": index, "summaries": summaries, "kwargs": kwargs, "root": root}
