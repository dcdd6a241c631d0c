"""`raglora data`: turn the configured sources into per-stage train/validation/test splits, knowledge-base files and
the out-of-knowledge-base question set, all byte-reproducible, with a manifest.

Leak-free by construction:
  * duplicate questions (the same text once case, whitespace and punctuation are folded) are collapsed first,
    across all sources, so one question cannot sit on both sides of a split;
  * every source is split once (seeded, stratified by category), before any stage filter, so a held-out row is
    held out for every stage that selects it;
  * the manifest records a check that no held-out question is in any training row.
RAFT contexts are made leak-free at fine-tuning time (held-out rows' gold passages are never distractors).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from pipeline.sources import (
    GENERAL_KNOWLEDGE_CATEGORIES,
    GENERAL_SOURCE,
    OTHER_DOMAIN_SOURCE,
    OUT_OF_KB_FILE,
    SourceReport,
    detect_fields,
    load_source,
    normalise_question,
    read_records,
    stable_id,
)
from raglora.errors import RagloraError
from raglora.files import atomic_write_text, jsonl_text

DATASET_VERSION = "2"
SPLITS = ("train", "validation", "test")
KB_DIR = "kb"


def split_stratified(
    rows: list[dict], *, key: str, seed: int, test_fraction: float, validation_fraction: float
) -> dict[str, list[dict]]:
    """Seeded split within each group of `key` (rows without one form one group), so every category is
    represented in every split.

    A group of n rows gives round(n * fraction) test rows (at least 1 when n >= 3) and likewise for
    validation (at least 1 when n >= 5); the rest is train.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row.get(key) or "")].append(row)
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


def question_key(row: dict) -> str:
    """What makes two rows the same question: the normalised user turns."""
    return " | ".join(normalise_question(m["content"]) for m in row["messages"] if m["role"] == "user")


def user_turn_keys(row: dict) -> set[str]:
    return {normalise_question(m["content"]) for m in row["messages"] if m["role"] == "user"}


def collapse_duplicates(per_source: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Keep the first row of each question (sources in config order, rows by id); count what was dropped.

    The same id on two different rows is an error: ids name gold passages and must be unambiguous.
    """
    seen_q: set[str] = set()
    owner: dict[str, tuple[str, str]] = {}  # id -> (source, question key)
    out, dropped = {}, {}
    for name, rows in per_source.items():
        kept = []
        for row in sorted(rows, key=lambda r: r["id"]):
            key = question_key(row)
            prev = owner.get(row["id"])
            if prev is not None and prev[1] != key:
                where = f"source {name}" if prev[0] == name else f"sources {prev[0]} and {name}"
                raise RagloraError(
                    f"{where}: id {row['id']!r} is used by two different rows; ids must be unique "
                    "(fix the id column, or drop id_field to use content-hash ids)"
                )
            owner[row["id"]] = (name, key)
            if key in seen_q:
                continue
            seen_q.add(key)
            kept.append(row)
        out[name] = kept
        dropped[name] = len(rows) - len(kept)
    return out, dropped


def move_shared_turns_to_train(splits: dict[str, dict[str, list[dict]]]) -> int:
    """Conversations differ as a whole but can share a turn ("Hi"); a held-out row with a user turn that some
    training row also has moves to train (repeated until none is left), so no question is on both sides."""
    moved = 0
    while True:
        trained = set().union(*(user_turn_keys(r) for sp in splits.values() for r in sp["train"]))
        changed = False
        for sp in splits.values():
            for split in ("validation", "test"):
                keep = [r for r in sp[split] if not user_turn_keys(r) & trained]
                if len(keep) != len(sp[split]):
                    ids = {r["id"] for r in keep}
                    sp["train"] = sorted(
                        sp["train"] + [r for r in sp[split] if r["id"] not in ids], key=lambda r: r["id"]
                    )
                    moved += len(sp[split]) - len(keep)
                    sp[split] = keep
                    changed = True
        if not changed:
            return moved


def field_value(row: dict, name: str):
    """A row's value for a stage filter: a standard field, or one of the file's other columns."""
    if name in row and name not in ("messages", "meta"):
        return row[name]
    return (row.get("meta") or {}).get(name)


def select_rows(stage, rows: list[dict], all_rows: list[dict]) -> list[dict]:
    """The rows a stage's `where` / `where_not` keep; `all_rows` (the stage's sources, every split) names what
    values exist when a filter is wrong."""
    for field, _ in [*stage.where.items(), *stage.where_not.items()]:
        if not any(field_value(r, field) is not None for r in all_rows):
            raise RagloraError(
                f"finetune.stages[{stage.name}]: `where` on field {field!r}, which no row of source(s) "
                f"{', '.join(stage.sources)} has (fields: id, question, answer, category, source"
                f"{', ' + ', '.join(sorted({k for r in all_rows for k in r.get('meta') or {}})) if any(r.get('meta') for r in all_rows) else ''})"
            )

    def keep(row: dict) -> bool:
        ok = all(str(field_value(row, f)) in vals for f, vals in stage.where.items())
        return ok and not any(str(field_value(row, f)) in vals for f, vals in stage.where_not.items())

    return [r for r in rows if keep(r)]


def _stage_row(row: dict) -> dict:
    return {k: row.get(k) for k in ("id", "source_name", "question", "answer", "category", "source", "messages")}


def text_stage_rows(docs: list[str], *, exclude: Path, chunk_size: int, chunk_overlap: int) -> list[dict]:
    """Document chunks for continued pre-training. The data step's own knowledge-base folder is left out: it holds
    Q/A answers, held-out ones included."""
    from retriever.chunking import chunk_documents
    from retriever.documents import load_documents

    paths = [d for d in docs if Path(d).resolve() != exclude.resolve()]
    if not paths:
        return []
    documents, _ = load_documents(paths)
    chunks = chunk_documents(documents, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    return [{"id": c.chunk_id, "text": c.text, "source": c.source, "title": c.title} for c in chunks]


def generic_out_of_kb(
    project: dict[str, list[dict]],
    held_out_general: list[dict] | None,
    *,
    uses_other_domain: bool,
    seed: int,
    language: str,
) -> list[dict]:
    """Questions this project's documents do not answer, built from packaged data only:
    general-knowledge questions of GENERAL_SOURCE and questions of another domain (OTHER_DOMAIN_SOURCE, when the
    project does not use it). Candidates sharing half their content words with a project question are dropped.
    """
    from retriever.gold import content_words

    postings: dict[str, list[int]] = defaultdict(list)  # word -> project questions holding it
    for i, row in enumerate(r for rows in project.values() for r in rows):
        for w in content_words(row["question"] or ""):
            postings[w].append(i)

    def unrelated(question: str) -> bool:
        words = content_words(question)
        shared: dict[int, int] = defaultdict(int)
        for w in words:
            for i in postings.get(w, ()):
                shared[i] += 1
        return bool(words) and max(shared.values(), default=0) / len(words) < 0.5

    general_rows = held_out_general
    if general_rows is None:
        general_rows, _ = load_source(name="general", path=GENERAL_SOURCE, language=language)
    pool = sorted(
        {
            r["messages"][0]["content"].strip()
            for r in general_rows
            if r.get("category") in GENERAL_KNOWLEDGE_CATEGORIES and r["messages"][0]["content"].strip().endswith("?")
        }
    )
    rng = random.Random(f"{seed}:out-of-kb")
    candidates = [q for q in pool if unrelated(q)]
    general = rng.sample(candidates, min(30, len(candidates)))
    rows = [
        {"id": f"general-knowledge-{i:03d}", "kind": "general-knowledge", "question": q}
        for i, q in enumerate(sorted(general))
    ]
    if not uses_other_domain:
        faq, _ = load_source(name="other-domain", path=OTHER_DOMAIN_SOURCE, language=language)
        other = sorted({r["question"] for r in faq if unrelated(r["question"])})
        picked = rng.sample(other, min(20, len(other)))
        rows += [
            {"id": f"other-domain-{i:03d}", "kind": "other-domain", "question": q} for i, q in enumerate(sorted(picked))
        ]
    return rows


def user_out_of_kb(path: str) -> list[dict]:
    """A user's unanswerable-question file: any format `read_records` reads, with a question-like column."""
    records = read_records(path)
    columns = list(dict.fromkeys(k for r in records[:200] for k in r))
    fields = detect_fields(columns, {})
    if not fields["question"]:
        raise RagloraError(f"{path}: no question column found (columns: {', '.join(columns[:12])})")
    rows = []
    for rec in records:
        question = str(rec.get(fields["question"]) or "").strip()
        if question:
            row_id = str(rec.get(fields["id"]) or "").strip() if fields["id"] else ""
            rows.append({"id": row_id or stable_id("out-of-kb", question), "kind": "user", "question": question})
    if not rows:
        raise RagloraError(f"{path}: no questions found")
    return sorted(rows, key=lambda r: r["id"])


def build_datasets(
    *,
    sources: list,
    stages: list,
    seed: int,
    test_fraction: float,
    validation_fraction: float,
    language: str,
    out_of_kb_file: str | None,
    data_dir: str | Path,
    docs: list[str],
    chunk_size: int,
    chunk_overlap: int,
) -> tuple[dict[str, list[dict]], dict]:
    """All dataset files as {relative path: rows} plus manifest facts; reads the sources, writes nothing.

    `sources` / `stages` are `data.sources` / `finetune.stages` entries. Every user-fixable problem raises
    before anything is written.
    """
    used = {name for st in stages for name in st.sources}
    per_source: dict[str, list[dict]] = {}
    reports: dict[str, SourceReport] = {}
    for src in sources:
        rows, report = load_source(
            name=src.name, path=src.path, fmt=src.format, question_field=src.question_field,
            answer_field=src.answer_field, id_field=src.id_field, category_field=src.category_field,
            source_field=src.source_field, language=language,
        )  # fmt: skip
        per_source[src.name], reports[src.name] = rows, report
    per_source, dropped = collapse_duplicates(per_source)
    splits = {
        name: split_stratified(
            rows, key="category", seed=seed, test_fraction=test_fraction, validation_fraction=validation_fraction
        )
        for name, rows in per_source.items()
    }
    moved = move_shared_turns_to_train(splits)
    files: dict[str, list[dict]] = {}
    warnings: list[str] = []
    for stage in stages:
        if stage.kind == "text":
            chunks = text_stage_rows(
                docs, exclude=Path(data_dir) / KB_DIR, chunk_size=chunk_size, chunk_overlap=chunk_overlap
            )
            if not chunks:
                raise RagloraError(
                    f"finetune.stages[{stage.name}]: a text stage trains on the documents in index.docs, but there "
                    "are none besides the data step's own kb/ folder; add document folders to index.docs"
                )
            shuffled = sorted(chunks, key=lambda r: r["id"])
            random.Random(f"{seed}:{stage.name}").shuffle(shuffled)
            n_val = max(round(len(shuffled) * validation_fraction), 1 if len(shuffled) >= 5 else 0)
            files[f"{stage.name}/validation.jsonl"] = sorted(shuffled[:n_val], key=lambda r: r["id"])
            files[f"{stage.name}/train.jsonl"] = sorted(shuffled[n_val:], key=lambda r: r["id"])
            continue
        if not stage.sources:
            continue  # a stage with explicit train_file / validation_file of its own
        everything = [r for name in stage.sources for split in SPLITS for r in splits[name][split]]
        for split in SPLITS:
            rows = [r for name in stage.sources for r in splits[name][split]]
            selected = sorted((_stage_row(r) for r in select_rows(stage, rows, everything)), key=lambda r: r["id"])
            files[f"{stage.name}/{split}.jsonl"] = selected
        if not files[f"{stage.name}/train.jsonl"]:
            raise RagloraError(
                f"finetune.stages[{stage.name}]: the filter selects no training rows of source(s) "
                f"{', '.join(stage.sources)}; check `where`/`where_not` against the values in the data"
                + _values_hint(stage, everything)
            )
        for f, vals in stage.where.items():
            seen = {str(field_value(r, f)) for r in everything}
            missing = [v for v in vals if v not in seen]
            if missing:
                warnings.append(f"stage {stage.name}: where {f} value(s) {missing} match no row")
        if not files[f"{stage.name}/test.jsonl"]:
            warnings.append(f"stage {stage.name}: no held-out test rows (too few rows); its eval set will be empty")
    for src in sources:
        if src.kb:
            files[f"{KB_DIR}/{src.name}.jsonl"] = [
                {k: r[k] for k in ("id", "category", "question", "answer", "source")}
                for r in sorted(per_source[src.name], key=lambda r: r["id"])
                if r["question"] and r["answer"]
            ]
    unused = [s.name for s in sources if s.name not in used and not s.kb]
    if unused:
        warnings.append(f"source(s) {', '.join(unused)} are used by no stage and not indexed (kb: false)")
    if out_of_kb_file:
        files[OUT_OF_KB_FILE] = user_out_of_kb(out_of_kb_file)
    else:
        general_sources = [s.name for s in sources if s.path == GENERAL_SOURCE]
        # validation rows only: the test rows are the general eval set, where an answer is expected
        held_general = [r for n in general_sources for r in splits[n]["validation"]]
        files[OUT_OF_KB_FILE] = generic_out_of_kb(
            {s.name: per_source[s.name] for s in sources if s.name not in general_sources},
            held_general if general_sources else None,
            uses_other_domain=any(s.path == OTHER_DOMAIN_SOURCE for s in sources),
            seed=seed,
            language=language,
        )
    leak = leak_check(files, stages)
    if leak["held_out_in_training"]:
        raise RagloraError(f"internal error: {leak['held_out_in_training']} held-out questions are in training rows")
    info = {
        "sources": {
            # the file name, not the path: the manifest must not depend on where the project lives
            name: {
                **r.to_dict(),
                "path": r.path if r.package else Path(r.path).name,
                "duplicates_collapsed": dropped[name],
            }
            for name, r in reports.items()
        },
        "leak_check": {**leak, "held_out_moved_to_train_for_shared_turns": moved},
        "warnings": warnings,
    }
    return files, info


def datasets_from_config(cfg, data_dir: str | Path | None = None) -> tuple[dict[str, list[dict]], dict, dict]:
    """`build_datasets` with its arguments taken from the root config; also returns the settings for the manifest."""
    files, info = build_datasets(
        sources=cfg.data.sources,
        stages=cfg.finetune.stages,
        seed=cfg.data.seed,
        test_fraction=cfg.data.test_fraction,
        validation_fraction=cfg.data.validation_fraction,
        language=cfg.index.language,
        out_of_kb_file=cfg.data.out_of_kb_file,
        data_dir=data_dir or cfg.paths.data_dir,
        docs=cfg.index.docs,
        chunk_size=cfg.index.chunk_size,
        chunk_overlap=cfg.index.chunk_overlap,
    )
    data = cfg.data.model_dump(mode="json")
    for src in data["sources"]:  # file paths as the config names them would make the manifest machine-specific
        src["path"] = src["path"] if src["path"].startswith("packaged:") else Path(src["path"]).name
    settings = {
        "data": data,
        "stages": {
            s.name: {"kind": s.kind, "sources": s.sources, "where": s.where, "where_not": s.where_not}
            for s in cfg.finetune.stages
        },  # fmt: skip
        "language": cfg.index.language,
    }
    return files, info, settings


def _values_hint(stage, rows: list[dict]) -> str:
    fields = list(stage.where) or list(stage.where_not)
    if not fields:
        return ""
    values = sorted({str(field_value(r, fields[0])) for r in rows})
    return f" ({fields[0]} values: {', '.join(values[:15])}{' …' if len(values) > 15 else ''})"


def leak_check(files: dict[str, list[dict]], stages: list) -> dict:
    """Held-out (validation + test of every chat stage) questions found in any stage's training rows."""
    held, trained = set(), set()
    for stage in stages:
        for split in SPLITS:
            for row in files.get(f"{stage.name}/{split}.jsonl", []):
                if "messages" in row:
                    (trained if split == "train" else held).update(user_turn_keys(row))
    return {"held_out_questions": len(held), "held_out_in_training": len(held & trained), "checked": "user turns"}


def write_datasets(out_dir: str | Path, files: dict[str, list[dict]], *, settings: dict, info: dict) -> dict:
    """Write every file atomically plus `manifest.json` (version, sources, settings, counts, hashes, leak check)."""
    out = Path(out_dir)
    old = out / "manifest.json"
    stale = set(json.loads(old.read_text(encoding="utf-8")).get("files", {})) - set(files) if old.is_file() else set()
    entries = {}
    for rel, rows in sorted(files.items()):
        text = jsonl_text(rows)
        atomic_write_text(out / rel, text)
        entries[rel] = {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    manifest = {
        "dataset_version": DATASET_VERSION,
        "sources": info["sources"],
        "settings": settings,
        "files": entries,
        "leak_check": info["leak_check"],
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    for rel in sorted(stale):  # written by an earlier config (a renamed stage, a source no longer kb: true)
        (out / rel).unlink(missing_ok=True)
    return manifest
