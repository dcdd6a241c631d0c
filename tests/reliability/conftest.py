"""Reliability / security suite: faults, hostile input and load. Slow tests are `-m slow` (`make reliability`)."""

from __future__ import annotations

import sys
from pathlib import Path

# Reuse the API tests' builders (tiny model, fake-embedder index, service): `from helpers import ...`.
_API_TESTS = str(Path(__file__).resolve().parents[1] / "api")
if _API_TESTS not in sys.path:
    sys.path.insert(0, _API_TESTS)
