"""Data sources: a company's Q/A and conversation files (JSONL, JSON, CSV) or a packaged source, read into one
row shape that every later step uses:

    {"id", "source_name", "question", "answer", "category", "source", "messages", "meta"}

question/answer are set for single-turn rows and None for multi-turn conversations (which train on every
assistant turn); `source` names the document or section that supports the answer, when the data says so; `meta`
keeps the file's other scalar columns for stage filters.

Formats are detected per file and can be forced in config: `qa` (a question and an answer column, found by common
names or given as `question_field`/`answer_field`/...), `alpaca`, `sharegpt` and OpenAI `messages`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raglora.errors import RagloraError
from raglora.files import read_jsonl

# Column names we recognise, most specific first; compared after lower-casing and dropping '_', '-' and spaces.
FIELD_CANDIDATES = {
    "question": [
        "question",
        "q",
        "subject",
        "title",
        "prompt",
        "instruction",
        "query",
        "customerquestion",
        "customermessage",
        "issue",
        "problem",
        "request",
        "input",
    ],  # fmt: skip
    "answer": [
        "answer",
        "a",
        "resolution",
        "response",
        "reply",
        "output",
        "solution",
        "agentresponse",
        "agentreply",
        "completion",
        "body",
    ],  # fmt: skip
    "id": ["id", "ticketid", "faqid", "questionid", "uid", "uuid", "key", "ticket", "number", "ref"],
    "category": ["category", "topic", "product", "queue", "type", "section", "group", "label"],
    "source": ["source", "document", "doc", "article", "page", "url", "link", "reference", "kbarticle"],
}
# Second pass, for headers such as "Customer wrote" or "Agent resolution": a word of the header names the role.
FIELD_WORDS = {
    "question": {"question", "questions", "subject", "title", "prompt", "query", "wrote", "message", "issue",
                 "problem", "request", "inquiry", "enquiry", "ask", "asked",
                 # the same in a few other languages (sv, da, no, de, es, it, nl, fi)
                 "fråga", "spørgsmål", "spørsmål", "frage", "pregunta", "domanda", "vraag", "kysymys"},
    "answer": {"answer", "answers", "resolution", "response", "reply", "solution", "output", "resolved", "fix",
               "svar", "antwort", "réponse", "respuesta", "risposta", "antwoord", "vastaus", "lösning", "løsning"},
    "id": {"id", "no", "nr", "number", "ref", "key", "uuid"},
    "category": {"category", "categories", "topic", "product", "queue", "type", "section", "group", "label", "area",
                 "kategori", "kategorie", "catégorie", "categoría", "categoria", "categorie", "ämne", "thema"},
    "source": {"source", "document", "doc", "article", "page", "url", "link", "reference", "kb",
               "källa", "kilde", "quelle", "fuente", "fonte", "bron", "artikel", "dokument"},
}  # fmt: skip
# Headers with these words describe something else (who, when, how to reach them), never a role above.
NOT_A_FIELD = {"name", "email", "mail", "phone", "date", "time", "created", "updated", "status", "priority"}
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
SAMPLE_BYTES = 64 * 1024  # csv.Sniffer looks at this much of a CSV file
DELIMITERS = ",;\t|"


@dataclass
class SourceReport:
    """What reading one source understood: shown by `raglora init` and kept in the data manifest."""

    name: str
    path: str
    format: str
    fields: dict[str, str | None] = field(default_factory=dict)
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # "row 7: empty answer", at most a few
    n_skipped: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)  # of a qa file: what stage filters (`where`) can name
    sha256: str | None = None
    package: str | None = None  # for packaged sources: "name==version"
    license: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


def stable_id(prefix: str, *parts: str) -> str:
    """A content hash id for rows without one: the same text always gets the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}"


def normalise_question(text: str) -> str:
    """Case, whitespace and punctuation folded: two questions that differ only there are the same question."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# ---------------------------------------------------------------------------------------------- reading files


def read_records(path: str | Path) -> list[dict]:
    """Raw records of a JSONL, JSON (a list, or an object holding one list) or CSV/TSV file."""
    p = Path(path)
    if not p.is_file():
        raise RagloraError(f"data file not found: {p}")
    if p.suffix.lower() not in SUFFIXES:
        raise RagloraError(f"{p}: unsupported data file type {p.suffix or '(none)'} (use {', '.join(SUFFIXES)})")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RagloraError(f"{p}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    if not text.strip():
        raise RagloraError(f"{p}: the file is empty; give a file with at least one question and answer")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return [row for _, row in read_jsonl(p)]
    if suffix == ".json":
        return _json_records(text, p)
    return _csv_records(text, p)


def _json_records(text: str, p: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise RagloraError(f"{p}: not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(lists) != 1:
            raise RagloraError(f"{p}: expected a JSON list of rows (or an object holding exactly one such list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RagloraError(f"{p}: expected a JSON list of objects, one per question")
    return data


def _csv_records(text: str, p: Path) -> list[dict]:
    dialect = csv_dialect(text)
    header = text.lstrip().split("\n", 1)[0]
    if dialect is None and not any(d in header for d in DELIMITERS):
        # one column, e.g. a list of questions: csv.reader still handles quoting and blank lines
        rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0].strip()]
        return [{rows[0][0]: r[0]} for r in rows[1:]] if len(rows) > 1 else []
    if dialect is None:
        raise RagloraError(
            f"{p}: cannot find the CSV delimiter (tried , ; tab |); check that the file has a header row and "
            "one row per question, or convert it to JSONL"
        )
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    try:
        rows = [{k: v for k, v in r.items() if k is not None} for r in reader]
    except csv.Error as exc:
        raise RagloraError(f"{p}: malformed CSV at line {reader.line_num}: {exc}") from None
    return rows


def csv_dialect(text: str):
    """The dialect `csv.Sniffer` finds, checked: the header must have two or more columns and most rows as many.
    Sniffer can pick a wrong delimiter on prose-heavy rows (a comma inside answers), so when its choice fails
    the check, each common delimiter is tried and the most consistent one wins. None: no delimiter fits."""
    sample = text[:SAMPLE_BYTES]
    if len(text) > SAMPLE_BYTES and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # whole rows only
    candidates = []
    with contextlib.suppress(csv.Error):
        candidates.append(csv.Sniffer().sniff(sample, delimiters=DELIMITERS))
    candidates += [type("Guess", (csv.excel,), {"delimiter": d}) for d in DELIMITERS]
    scores = [_consistency(sample, dialect) for dialect in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], i == 0))  # ties go to the sniffed dialect
    return candidates[best] if scores[best] >= 0.5 else None


def _consistency(sample: str, dialect) -> float:
    """Share of rows with as many fields as a header of two or more columns (0 when none)."""
    try:
        rows = [r for r in csv.reader(io.StringIO(sample), dialect=dialect) if any(c.strip() for c in r)]
    except csv.Error:
        return 0.0
    if len(rows) < 2 or len(rows[0]) < 2:
        return 0.0
    return sum(len(r) == len(rows[0]) for r in rows[1:]) / (len(rows) - 1)


# ---------------------------------------------------------------------------------------------- detecting


def detect_format(records: list[dict], forced: str = "auto") -> str:
    """The format of a file from its first rows: a forced one, else messages/sharegpt/alpaca/qa."""
    if forced != "auto":
        return forced
    keys = set().union(*(r.keys() for r in records[:50])) if records else set()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return "qa"


def detect_fields(columns: list[str], given: dict[str, str | None]) -> dict[str, str | None]:
    """{role: column} for question/answer/id/category/source: given names win, else the first common name."""
    by_norm = {_norm_name(c): c for c in columns}
    out: dict[str, str | None] = {role: given.get(role) or None for role in FIELD_CANDIDATES}
    for role, candidates in FIELD_CANDIDATES.items():
        if out[role] is None:
            out[role] = next((by_norm[c] for c in candidates if c in by_norm and by_norm[c] not in out.values()), None)
    for role, words in FIELD_WORDS.items():
        if out[role] is None:
            for col in columns:
                tokens = set(re.findall(r"[^\W\d_]+", col.lower()))
                if col not in out.values() and tokens & words and not tokens & NOT_A_FIELD:
                    out[role] = col
                    break
    return out


def _cell(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _last_turn_qa(messages: list[dict]) -> tuple[str | None, str | None]:
    convo = [m for m in messages if m["role"] != "system"]
    if len(convo) == 2 and convo[0]["role"] == "user" and convo[1]["role"] == "assistant":
        return convo[0]["content"].strip(), convo[1]["content"].strip()
    return None, None


def rows_from_records(
    records: list[dict], *, name: str, path: str, fmt: str, given: dict[str, str | None]
) -> tuple[list[dict], SourceReport]:
    """Normalised rows of one file plus a report; a file with no usable row is an error naming why."""
    fmt = detect_format(records, fmt)
    columns = list(dict.fromkeys(k for r in records[:200] for k in r))
    fields = detect_fields(columns, given)
    report = SourceReport(name=name, path=path, format=fmt, columns=columns if fmt == "qa" else [])
    if fmt == "qa":
        missing = [role for role in ("question", "answer") if not fields[role]]
        if missing:
            raise RagloraError(
                f"{path}: no {' and no '.join(missing)} column found (columns: {', '.join(columns[:12])}); "
                f"name them with --{missing[0]}-field (or {missing[0]}_field: in the source's config)"
            )
        absent = [
            f"{role}_field {col!r}" for role, col in fields.items() if col and given.get(role) and col not in columns
        ]
        if absent:
            raise RagloraError(f"{path}: {', '.join(absent)} is not a column (columns: {', '.join(columns[:12])})")
        report.fields = fields
    rows = []
    for n, rec in enumerate(records, start=1):
        where = f"{path}: row {n}"
        try:
            row = _row(rec, fmt, fields, where)
        except RagloraError as exc:
            report.n_skipped += 1
            if len(report.skipped) < 5:
                report.skipped.append(str(exc).removeprefix(f"{path}: "))
            continue
        row["id"] = row["id"] or stable_id(name, json.dumps(row["messages"], ensure_ascii=False))
        row["source_name"] = name
        rows.append(row)
    if not rows:
        first = f": {report.skipped[0]}" if report.skipped else ""
        raise RagloraError(f"{path}: no usable question/answer rows ({report.n_skipped} skipped{first})")
    report.rows = len(rows)
    for r in rows:
        if r["category"]:
            report.categories[r["category"]] = report.categories.get(r["category"], 0) + 1
    return rows, report


def _row(rec: dict, fmt: str, fields: dict[str, str | None], where: str) -> dict:
    if fmt == "qa":
        question, answer = _cell(rec.get(fields["question"])), _cell(rec.get(fields["answer"]))
        if not question or not answer:
            raise RagloraError(f"{where}: empty {'question' if not question else 'answer'}")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    else:
        from finetune.data import to_messages  # imports torch: only for conversation formats

        messages = to_messages(rec, where)
        question, answer = _last_turn_qa(messages)

    def get(role: str) -> str | None:
        col = fields.get(role)
        return _cell(rec.get(col)) if col else _cell(rec.get(role))

    mapped = {c for c in fields.values() if c} | {"messages", "conversations", "instruction", "input", "output"}
    # Other scalar columns stay available to stage filters (`where: {product: [boilers]}`).
    meta = {k: _cell(v) for k, v in rec.items() if k not in mapped and isinstance(v, (str, int, float, bool))}
    return {
        "id": get("id"),
        "question": question,
        "answer": answer,
        "category": get("category"),
        "source": get("source"),
        "messages": messages,
        "meta": {k: v for k, v in meta.items() if v is not None},
    }


# ---------------------------------------------------------------------------------------------- packaged


def _construction_faq(language: str) -> tuple[list[dict], str]:
    """The Swedish Construction FAQ (Zaragoza AB, CC BY 4.0) in English or Swedish."""
    import zaragoza_construction_faq

    lang = language if language in ("en", "sv") else "en"
    records = [
        {"id": r["id"], "category": r["category"], "question": r.get("q"), "answer": r.get("a")}
        for r in zaragoza_construction_faq.load(lang=lang)
    ]
    return records, "zaragoza-construction-faq"


def _chatterbot_corpus(language: str) -> tuple[list[dict], str]:
    """chatterbot-corpus conversations: speakers alternate, the first as the user; an unanswered last turn is
    dropped. English unless the corpus has the project's language."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise RagloraError("package chatterbot-corpus is not installed (run `make setup`)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    names = {"sv": "swedish", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "pt": "portuguese"}
    folder = data / names.get(language, "english")
    folder = folder if folder.is_dir() else data / "english"
    records = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, convo in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in convo if str(t).strip()]
            turns = turns[: len(turns) - len(turns) % 2]
            if turns:
                msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
                records.append({"id": f"{path.stem}-{i:04d}", "category": path.stem, "messages": msgs})
    return records, "chatterbot-corpus"


PACKAGED = {"construction-faq": _construction_faq, "chatterbot-corpus": _chatterbot_corpus}
#: The packaged general conversation: a stage trained only on it is measured for forgetting, closed book, and its
#: held-out general-knowledge questions feed the generic out-of-knowledge-base set.
GENERAL_SOURCE = "packaged:chatterbot-corpus"
#: Its general-knowledge categories: questions no company's documents answer.
GENERAL_KNOWLEDGE_CATEGORIES = ("trivia", "science", "history", "literature", "movies", "sports", "food", "politics")
#: Where `raglora data` writes the out-of-knowledge-base questions (under the data folder); `eval.sets` calls
#: it `out_of_kb`.
OUT_OF_KB_FILE = "eval/out_of_kb.jsonl"
#: A packaged domain of its own, whose questions no other project's documents answer (unless the project uses it).
OTHER_DOMAIN_SOURCE = "packaged:construction-faq"
LICENSES = {"zaragoza-construction-faq": "CC BY 4.0", "chatterbot-corpus": "BSD-3-Clause"}


def _package_version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_source(
    *,
    name: str,
    path: str,
    fmt: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    category_field: str | None = None,
    source_field: str | None = None,
    language: str = "en",
) -> tuple[list[dict], SourceReport]:
    """Rows and report of one configured source (`path` a file or `packaged:<name>`)."""
    given = {"question": question_field, "answer": answer_field, "id": id_field,
             "category": category_field, "source": source_field}  # fmt: skip
    if path.startswith("packaged:"):
        key = path.split(":", 1)[1]
        if key not in PACKAGED:
            raise RagloraError(f"source {name}: unknown packaged source {key!r} (known: {', '.join(PACKAGED)})")
        records, dist = PACKAGED[key](language)
        rows, report = rows_from_records(records, name=name, path=path, fmt=fmt, given=given)
        report.package, report.license = f"{dist}=={_package_version(dist)}", LICENSES[dist]
        return rows, report
    records = read_records(path)
    rows, report = rows_from_records(records, name=name, path=path, fmt=fmt, given=given)
    report.sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return rows, report
