"""`raglora data`: materialise the knowledge base and the per-stage train/validation/test splits.

Sources ship inside PyPI packages (no downloads): the construction FAQ (`zaragoza-construction-faq`,
CC BY 4.0) and general conversations (`chatterbot-corpus`, BSD). Splits are seeded and stratified by
FAQ category, so the same config always writes byte-identical files, and held-out FAQ questions are
never in any training split.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path

import yaml

from retriever.errors import RagloraError
from retriever.files import atomic_write_text

DATASET_VERSION = "1"
SPLITS = ("train", "validation", "test")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def split_stratified(
    rows: list[dict], *, key: str, seed: int, test_fraction: float, validation_fraction: float
) -> dict[str, list[dict]]:
    """Seeded split within each group of `key`, so every category is represented in every split.

    A group of n rows gives round(n * fraction) test rows (at least 1 when n >= 3) and likewise for
    validation (at least 1 when n >= 5); the rest is train.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row[key])].append(row)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda r: r["id"])
        random.Random(f"{seed}:{group}").shuffle(members)
        n = len(members)
        n_test = max(round(n * test_fraction), 1 if n >= 3 else 0)
        n_val = max(round(n * validation_fraction), 1 if n >= 5 else 0)
        out["test"] += members[:n_test]
        out["validation"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    for split in SPLITS:
        out[split].sort(key=lambda r: r["id"])
    return out


def load_faq(lang: str) -> list[dict]:
    """FAQ rows as {id, category, question, answer, sources}, sorted by id."""
    import zaragoza_construction_faq

    rows = []
    for r in zaragoza_construction_faq.load(lang=lang):
        question, answer = str(r.get("q", "")).strip(), str(r.get("a", "")).strip()
        if not question or not answer:
            continue
        rows.append(
            {
                "id": r["id"],
                "category": r["category"],
                "question": question,
                "answer": answer,
                "sources": str(r.get("sources", "")),
            }
        )
    return sorted(rows, key=lambda r: r["id"])


def load_general_conversations() -> list[dict]:
    """chatterbot-corpus English conversations as OpenAI-style `messages` rows.

    Each corpus conversation alternates speakers; the first speaks as the user. A trailing user turn
    with no reply is dropped, since there is no answer to train on.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise RagloraError("package chatterbot-corpus is not installed (run `make setup`)")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    rows = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, convo in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in convo if str(t).strip()]
            if len(turns) % 2:
                turns = turns[:-1]
            if not turns:
                continue
            messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            rows.append({"id": f"{path.stem}-{i:04d}", "category": path.stem, "messages": messages})
    return rows


# Questions a construction company's bot must decline (it should say so and offer a human). Written
# by hand so the set is fixed and reviewable; general-knowledge questions are added from the general
# test split at build time.
OTHER_COMPANY_QUESTIONS = [
    "How do I reset the password for my online bank account?",
    "What time does the nearest pharmacy close today?",
    "Can you book me a table at a restaurant in Helsingborg tonight?",
    "How do I change the tyres on my Volvo XC60?",
    "What is the baggage allowance on a flight to London?",
    "How do I cancel my mobile phone subscription?",
    "Which streaming service has the best films this month?",
    "How much does a Netflix subscription cost in Sweden?",
    "Can you recommend a good dentist near me?",
    "How do I apply for a Swedish passport?",
    "What is the weather forecast for Stockholm tomorrow?",
    "How do I return a sofa I bought from IKEA?",
    "What are the train times from Malmö to Copenhagen?",
    "How do I file a complaint about my electricity bill with my energy supplier?",
    "Which vaccines does my dog need before travelling abroad?",
    "How do I set up two-factor authentication on my e-mail?",
    "What is the best diet to lose weight quickly?",
    "Can you help me write a cover letter for a nursing job?",
    "How do I transfer my pension to another fund manager?",
    "What is the interest rate on a savings account at my bank?",
]
GENERAL_KNOWLEDGE_CATEGORIES = ("trivia", "science", "history", "literature", "movies", "sports", "food", "politics")


def out_of_kb_questions(general_test: list[dict], *, seed: int, n_general: int = 30) -> list[dict]:
    """Questions outside the knowledge base: fixed other-company ones plus seeded general-knowledge ones."""
    pool = sorted(
        {
            r["messages"][0]["content"]
            for r in general_test
            if r["category"] in GENERAL_KNOWLEDGE_CATEGORIES and r["messages"][0]["content"].endswith("?")
        }
    )
    general = random.Random(f"{seed}:out-of-kb").sample(pool, min(n_general, len(pool)))
    rows = [
        {"id": f"other-company-{i:03d}", "kind": "other-company", "question": q}
        for i, q in enumerate(OTHER_COMPANY_QUESTIONS)
    ]
    rows += [
        {"id": f"general-knowledge-{i:03d}", "kind": "general-knowledge", "question": q}
        for i, q in enumerate(sorted(general))
    ]
    return rows


def _move_duplicate_questions_to_train(splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The FAQ repeats a few questions under two ids; a held-out copy of a trained question would leak."""
    trained = {" ".join(r["question"].lower().split()) for r in splits["train"]}
    out = {"train": list(splits["train"])}
    for split in ("validation", "test"):
        keep = [r for r in splits[split] if " ".join(r["question"].lower().split()) not in trained]
        out["train"] += [r for r in splits[split] if r not in keep]
        out[split] = keep
    out["train"].sort(key=lambda r: r["id"])
    return out


def _faq_example(row: dict) -> dict:
    return {
        "id": row["id"],
        "faq_id": row["id"],
        "category": row["category"],
        "question": row["question"],
        "answer": row["answer"],
        "messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ],
    }


def build_datasets(
    *, seed: int, faq_lang: str, test_fraction: float, validation_fraction: float, subdomain_categories: list[str]
) -> dict[str, list[dict]]:
    """All dataset files as {relative path: rows}; pure apart from reading the packaged sources."""
    faq = load_faq(faq_lang)
    known = {r["category"] for r in faq}
    unknown = sorted(set(subdomain_categories) - known)
    if unknown:
        raise RagloraError(
            f"data.subdomain_categories: unknown FAQ categories {unknown}; known: {', '.join(sorted(known))}"
        )
    faq_splits = split_stratified(
        faq, key="category", seed=seed, test_fraction=test_fraction, validation_fraction=validation_fraction
    )
    general = split_stratified(
        load_general_conversations(),
        key="category",
        seed=seed,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
    )
    faq_splits = _move_duplicate_questions_to_train(faq_splits)
    sub = set(subdomain_categories)
    files: dict[str, list[dict]] = {"kb/faq.jsonl": faq}
    for split in SPLITS:
        files[f"general/{split}.jsonl"] = general[split]
        # domain trains on the whole FAQ; its validation/test keep the subdomain rows out so that
        # the domain and subdomain held-out figures are measured on disjoint questions.
        files[f"domain/{split}.jsonl"] = [
            _faq_example(r) for r in faq_splits[split] if split == "train" or r["category"] not in sub
        ]
        files[f"subdomain/{split}.jsonl"] = [_faq_example(r) for r in faq_splits[split] if r["category"] in sub]
    files["eval/out_of_kb.jsonl"] = out_of_kb_questions(general["test"], seed=seed)
    return files


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_datasets(out_dir: str | Path, files: dict[str, list[dict]], *, settings: dict) -> dict:
    """Write every file atomically plus `manifest.json` (version, sources, settings, counts, hashes)."""
    out = Path(out_dir)
    entries = {}
    for rel, rows in sorted(files.items()):
        text = _jsonl(rows)
        atomic_write_text(out / rel, text)
        entries[rel] = {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    manifest = {
        "dataset_version": DATASET_VERSION,
        "sources": {
            "zaragoza-construction-faq": {
                "version": _package_version("zaragoza-construction-faq"),
                "license": "CC BY 4.0",
            },
            "chatterbot-corpus": {"version": _package_version("chatterbot-corpus"), "license": "BSD-3-Clause"},
        },
        "settings": settings,
        "files": entries,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
