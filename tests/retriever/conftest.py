"""Shared fixtures for retriever tests: a fake embedder and a small mixed-format knowledge base."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_embedder import FakeEmbedder
from kb_helpers import GUIDE_MD, faq_rows, write_jsonl


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def kb(tmp_path: Path) -> Path:
    """A knowledge base folder: 10 FAQ rows (jsonl) and one markdown guide with three sections."""
    root = tmp_path / "kb"
    write_jsonl(root / "faq.jsonl", faq_rows())
    (root / "guides").mkdir()
    (root / "guides" / "energy.md").write_text(GUIDE_MD, encoding="utf-8")
    return root
