import json
from pathlib import Path

import pytest

from pipeline.datasets import build_datasets, split_stratified, write_datasets
from retriever.errors import RagloraError

SETTINGS = dict(
    seed=13,
    faq_lang="en",
    test_fraction=0.15,
    validation_fraction=0.1,
    subdomain_categories=["bygglov", "bbr-pbl", "marklov-rivningslov", "attefallshus-friggebod", "tillbyggnad"],
)


@pytest.fixture(scope="module")
def files():
    return build_datasets(**SETTINGS)


def _ids(rows):
    return {r["id"] for r in rows}


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


def test_held_out_faq_questions_never_enter_any_training_split(files):
    train = (
        _ids(files["general/train.jsonl"]) | _ids(files["domain/train.jsonl"]) | _ids(files["subdomain/train.jsonl"])
    )
    for stage in ("domain", "subdomain"):
        for split in ("validation", "test"):
            assert not (_ids(files[f"{stage}/{split}.jsonl"]) & train), f"{stage}/{split} leaks into training"
    trained_questions = {r["question"] for r in files["domain/train.jsonl"]}
    assert not trained_questions & {r["question"] for r in files["domain/test.jsonl"]}


def test_subdomain_holds_only_configured_categories_and_domain_eval_excludes_them(files):
    sub = set(SETTINGS["subdomain_categories"])
    for split in ("train", "validation", "test"):
        assert {r["category"] for r in files[f"subdomain/{split}.jsonl"]} == sub
    assert not {r["category"] for r in files["domain/test.jsonl"]} & sub
    assert len(files["kb/faq.jsonl"]) == 503
    assert {r["kind"] for r in files["eval/out_of_kb.jsonl"]} == {"other-company", "general-knowledge"}


def test_every_example_is_a_user_assistant_conversation(files):
    for rel, rows in files.items():
        if rel.startswith(("kb/", "eval/")):
            continue
        assert rows, rel
        for r in rows:
            roles = [m["role"] for m in r["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
            assert all(m["content"].strip() for m in r["messages"])


def test_unknown_subdomain_category_is_a_clear_error():
    with pytest.raises(RagloraError, match="unknown FAQ categories.*'no-such-category'"):
        build_datasets(**{**SETTINGS, "subdomain_categories": ["no-such-category"]})


def test_written_files_match_manifest_hashes_and_are_reproducible(tmp_path, files):
    m1 = write_datasets(tmp_path / "a", files, settings=SETTINGS)
    m2 = write_datasets(tmp_path / "b", build_datasets(**SETTINGS), settings=SETTINGS)
    assert m1 == m2
    first = (tmp_path / "a" / "domain/train.jsonl").read_text().splitlines()[0]
    assert json.loads(first)["messages"][0]["role"] == "user"
    assert not list((tmp_path / "a").rglob(".*.tmp-*"))  # no temp files left behind


def test_committed_data_folder_is_what_raglora_data_writes(files):
    """data/ is versioned in git; this fails if the code or the source packages drift from it."""
    manifest_path = Path(__file__).resolve().parents[2] / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["settings"] == SETTINGS
    import hashlib

    for rel, rows in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        assert manifest["files"][rel]["sha256"] == hashlib.sha256(text.encode()).hexdigest(), rel
