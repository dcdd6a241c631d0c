"""While a generation engine runs on CPU, embedder work on other threads runs single-threaded (raglora.threads)."""

from __future__ import annotations

import torch
from tiny_model import make_tiny_model, make_tiny_tokenizer

from pipeline.generate import Generator
from pipeline.stage_models import StageModels
from raglora import threads


def test_side_work_is_single_threaded_only_while_an_engine_runs(monkeypatch):
    monkeypatch.setattr(threads, "_engines", 0)
    before = torch.get_num_threads()
    with threads.side_work():
        assert torch.get_num_threads() == before  # no engine: unchanged
    tok = make_tiny_tokenizer()
    gen = Generator(StageModels(make_tiny_model(tok), tok))
    try:
        with threads.side_work():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before  # restored
    finally:
        gen.close()
    with threads.side_work():
        assert torch.get_num_threads() == before  # the engine stopped


def test_the_policy_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(threads, "_engines", 0)
    monkeypatch.setenv("RAGLORA_ENGINE_OWNS_THREADS", "0")
    tok = make_tiny_tokenizer()
    gen = Generator(StageModels(make_tiny_model(tok), tok))
    try:
        with threads.side_work():
            assert torch.get_num_threads() == gen._cpu_threads
    finally:
        gen.close()
