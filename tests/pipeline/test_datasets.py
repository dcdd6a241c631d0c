"""`raglora data`: splits per stage from configured sources, leak-free, reproducible; the packaged demo project."""

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.datasets import datasets_from_config, split_stratified, write_datasets
from raglora.errors import RagloraError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "default.yaml"


@pytest.fixture(scope="module")
def demo():
    cfg = load_config(DEFAULT)
    return datasets_from_config(cfg)


def _ids(rows):
    return {r["id"] for r in rows}


def _questions(rows):
    return {" ".join(m["content"].lower().split()) for r in rows for m in r["messages"] if m["role"] == "user"}


def test_split_is_a_seeded_partition_with_every_group_in_test():
    rows = [{"id": f"{g}-{i}", "g": g} for g in "abc" for i in range(10)]
    a = split_stratified(rows, key="g", seed=1, test_fraction=0.2, validation_fraction=0.1)
    b = split_stratified(list(reversed(rows)), key="g", seed=1, test_fraction=0.2, validation_fraction=0.1)
    assert a == b  # input order does not matter, only the seed
    all_ids = [r["id"] for s in a.values() for r in s]
    assert sorted(all_ids) == sorted(r["id"] for r in rows)  # a partition: nothing lost, nothing twice
    assert {r["g"] for r in a["test"]} == {"a", "b", "c"}
    assert len(a["test"]) == 6 and len(a["validation"]) == 3
    c = split_stratified(rows, key="g", seed=2, test_fraction=0.2, validation_fraction=0.1)
    assert _ids(c["test"]) != _ids(a["test"])


def test_demo_held_out_questions_never_enter_any_training_split(demo):
    files, info, _ = demo
    stages = ("general", "domain", "subdomain")
    trained = set().union(*(_questions(files[f"{s}/train.jsonl"]) for s in stages))
    trained_ids = set().union(*(_ids(files[f"{s}/train.jsonl"]) for s in stages))
    for stage in stages:
        for split in ("validation", "test"):
            rows = files[f"{stage}/{split}.jsonl"]
            assert rows, f"{stage}/{split} is empty"
            assert not _ids(rows) & trained_ids, f"{stage}/{split} ids leak into training"
            assert not _questions(rows) & trained, f"{stage}/{split} questions leak into training"
    assert info["leak_check"]["held_out_in_training"] == 0 and info["leak_check"]["held_out_questions"] > 0


def test_demo_subdomain_brings_rows_the_domain_stage_never_saw(demo):
    files, _, _ = demo
    sub = {"bygglov", "bbr-pbl", "marklov-rivningslov", "attefallshus-friggebod", "tillbyggnad"}
    for split in ("train", "validation", "test"):
        assert {r["category"] for r in files[f"subdomain/{split}.jsonl"]} == sub
        assert not {r["category"] for r in files[f"domain/{split}.jsonl"]} & sub
    kb = files["kb/faq.jsonl"]
    assert len(kb) == len(_ids(kb)) > 490  # every FAQ entry (duplicate questions collapsed) is in the knowledge base
    assert {r["kind"] for r in files["eval/out_of_kb.jsonl"]} == {"general-knowledge"}


def test_every_chat_example_is_a_user_assistant_conversation(demo):
    files, _, _ = demo
    for rel, rows in files.items():
        if rel.startswith(("kb/", "eval/")):
            continue
        for r in rows:
            roles = [m["role"] for m in r["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
            assert all(m["content"].strip() for m in r["messages"])


def test_written_files_match_manifest_hashes_and_are_reproducible(tmp_path, demo):
    files, info, settings = demo
    m1 = write_datasets(tmp_path / "a", files, settings=settings, info=info)
    again = datasets_from_config(load_config(DEFAULT))
    m2 = write_datasets(tmp_path / "b", again[0], settings=again[2], info=again[1])
    assert m1 == m2
    for rel in m1["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert not list((tmp_path / "a").rglob(".*.tmp-*"))  # no temp files left behind


def test_committed_data_folder_is_what_raglora_data_writes(demo):
    """data/ is versioned in git; this fails if the code or the source packages drift from it."""
    files, info, settings = demo
    manifest = json.loads((ROOT / "data" / "manifest.json").read_text())
    assert manifest["settings"] == settings
    assert manifest["leak_check"] == info["leak_check"]
    assert set(manifest["files"]) == set(files)
    for rel, rows in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        assert manifest["files"][rel]["sha256"] == hashlib.sha256(text.encode()).hexdigest(), rel


def test_a_filter_that_selects_nothing_is_a_clear_error(tmp_path):
    cfg = load_config(DEFAULT, ["finetune.stages.2.where={category: [no-such-category]}"])
    with pytest.raises(RagloraError, match=r"stages\[subdomain\].*selects no training rows.*category values: "):
        datasets_from_config(cfg, tmp_path)


def test_where_on_a_field_the_data_lacks_is_a_clear_error(tmp_path):
    cfg = load_config(DEFAULT, ["finetune.stages.2.where={colour: [red]}"])
    with pytest.raises(RagloraError, match=r"stages\[subdomain\]: `where` on field 'colour', which no row"):
        datasets_from_config(cfg, tmp_path)
