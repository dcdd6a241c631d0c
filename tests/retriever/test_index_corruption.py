"""Missing or damaged index files are RagloraErrors that name the file, never tracebacks from numpy/faiss/json."""

import json

import pytest

from raglora.errors import RagloraError
from retriever.index import build_index, load_index

SETTINGS = {"chunk_size": 300, "chunk_overlap": 30, "show_progress": False}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path):
    path.write_bytes(b"this is not what you think it is")


def _extra_chunk(path):
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[0]]) + "\n")


def _bad_json_line(path):
    lines = path.read_text().splitlines()
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")


DAMAGE = [
    ("manifest.json", _garbage),
    ("manifest.json", lambda p: p.unlink()),
    ("chunks.jsonl", _bad_json_line),
    ("chunks.jsonl", _extra_chunk),
    ("chunks.jsonl", lambda p: p.unlink()),
    ("vectors.npy", _truncate),
    ("vectors.npy", _garbage),
    ("faiss.index", _truncate),
    ("faiss.index", _garbage),
]


@pytest.fixture
def built(kb, tmp_path, embedder):
    build_index([kb], tmp_path / "ix", embedder, **SETTINGS)
    return tmp_path / "ix"


@pytest.mark.parametrize("with_checksums", [True, False], ids=["checksummed", "no-checksums"])
@pytest.mark.parametrize(("name", "damage"), DAMAGE, ids=lambda x: x if isinstance(x, str) else "")
def test_damaged_file_is_an_error_naming_it(built, embedder, name, damage, with_checksums):
    if not with_checksums and name != "manifest.json":  # also exercise the parsers behind the checksum check
        manifest = json.loads((built / "manifest.json").read_text())
        del manifest["files"]
        (built / "manifest.json").write_text(json.dumps(manifest))
    damage(built / name)
    with pytest.raises(RagloraError, match=name.replace(".", r"\.")):
        load_index(built, embedder)


def test_missing_index_folder_is_an_error(tmp_path):
    with pytest.raises(RagloraError, match="no index at"):
        load_index(tmp_path / "nowhere")


def test_unsupported_format_version_is_an_error(built):
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["format_version"] = 99
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RagloraError, match="format version 99"):
        load_index(built)


def test_a_corrupt_index_is_rebuilt_from_scratch_by_the_next_build(built, kb, embedder):
    _garbage(built / "vectors.npy")
    report = build_index([kb], built, embedder, **SETTINGS)
    assert report.reused == 0 and any("not reusable" in w for w in report.warnings)
    assert len(load_index(built, embedder)) == report.n_chunks
