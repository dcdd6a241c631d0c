"""Load files and folders into Documents: markdown/text sections, HTML sections, PDF pages and FAQ rows.

Bad files are skipped with a warning (a knowledge base with one broken file should still index); a
missing path or a corpus with nothing usable in it is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raglora.errors import RagloraError

TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
FAQ_SUFFIXES = {".jsonl", ".json"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES | FAQ_SUFFIXES

# (text field) or (question field, answer field): the row shapes we accept, first match wins.
FAQ_FIELD_PAIRS = [("question", "answer"), ("q", "a"), ("instruction", "output")]

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class Document:
    """One retrievable unit before chunking: a section, a page or an FAQ row."""

    text: str
    source: str
    title: str
    metadata: dict = field(default_factory=dict)


def load_documents(paths: list[str | Path], *, faq_include_question: bool = False) -> tuple[list[Document], list[str]]:
    """Load every supported file under `paths` (folders walked recursively, sorted). Returns (documents, warnings)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise RagloraError("no document paths given: set index.docs or pass --docs")
    docs: list[Document] = []
    warnings: list[str] = []
    n_files = 0
    for file in _iter_files(paths, warnings):
        n_files += 1
        loaded = _load_file(file, faq_include_question=faq_include_question, warnings=warnings)
        for doc in loaded:
            if doc.text.strip():
                docs.append(doc)
    if not docs:
        where = ", ".join(str(p) for p in paths)
        if n_files == 0:
            raise RagloraError(
                f"no supported documents found in {where} (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})"
            )
        first = f"; first problem: {warnings[0]}" if warnings else ""
        raise RagloraError(f"all {n_files} document file(s) in {where} are empty or unreadable{first}")
    return docs, warnings


def _iter_files(paths: list[str | Path], warnings: list[str]) -> Iterator[Path]:
    """Yield files in a deterministic order; hidden files and folders are skipped in walks."""
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise RagloraError(f"document path does not exist: {path}")
        if path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                warnings.append(f"{path}: unsupported file type {path.suffix or '(none)'}, skipped")
                continue
            candidates = [path]
        else:
            candidates = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in SUPPORTED_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        for p in candidates:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                yield p


def _load_file(path: Path, *, faq_include_question: bool, warnings: list[str]) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return _load_pdf(path, warnings)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        warnings.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}), skipped")
        return []
    except OSError as exc:
        warnings.append(f"{path}: unreadable ({exc.strerror or exc}), skipped")
        return []
    text = text.removeprefix("\ufeff")
    if not text.strip():
        warnings.append(f"{path}: empty file, skipped")
        return []
    if suffix in TEXT_SUFFIXES:
        return markdown_sections(text, source=path.as_posix(), default_title=path.stem, kind="text")
    if suffix in HTML_SUFFIXES:
        return _load_html(text, path)
    if suffix == ".jsonl":
        return _load_jsonl(text, path, faq_include_question, warnings)
    return _load_json(text, path, faq_include_question, warnings)


def markdown_sections(text: str, *, source: str, default_title: str, kind: str) -> list[Document]:
    """Split markdown at headings (outside code fences); each section keeps its heading line and is titled by it."""
    sections: list[tuple[str, int, list[str]]] = []  # (title, level, lines)
    title, level, lines = default_title, 0, []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m:
            sections.append((title, level, lines))
            title, level, lines = m.group(2).strip(), len(m.group(1)), [line]
        else:
            lines.append(line)
    sections.append((title, level, lines))
    docs = []
    for i, (sec_title, sec_level, sec_lines) in enumerate(sections):
        body = sec_lines[1:] if sec_level else sec_lines
        if not "\n".join(body).strip():  # a heading with nothing under it, or blank preamble
            continue
        section_text = "\n".join(sec_lines).strip()
        docs.append(
            Document(
                text=section_text,
                source=source,
                title=sec_title,
                metadata={"kind": kind, "section": i},
            )
        )
    return docs


def _load_html(text: str, path: Path) -> list[Document]:
    """HTML → markdown-like text (headings become `#` lines) → the markdown section splitter."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    page_title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for h in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"]):
        heading = " ".join(h.get_text(" ", strip=True).split())
        h.replace_with(f"\n\n{'#' * int(h.name[1])} {heading}\n\n" if heading else "\n")
    raw = soup.get_text("\n")
    lines = [" ".join(line.split()) for line in raw.splitlines()]
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return markdown_sections(cleaned, source=path.as_posix(), default_title=page_title or path.stem, kind="html")


def _load_pdf(path: Path, warnings: list[str]) -> list[Document]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # pypdf raises many types for damaged or encrypted files
        warnings.append(f"{path}: unreadable PDF ({type(exc).__name__}: {exc}), skipped")
        return []
    docs = []
    for n, page_text in enumerate(pages, start=1):
        page_text = page_text.strip()
        if page_text:
            docs.append(
                Document(
                    text=page_text,
                    source=path.as_posix(),
                    title=f"{path.stem} p.{n}",
                    metadata={"kind": "pdf", "page": n},
                )
            )
    if not docs:
        warnings.append(f"{path}: PDF has no extractable text (scanned?), skipped")
    return docs


def _load_jsonl(text: str, path: Path, faq_include_question: bool, warnings: list[str]) -> list[Document]:
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            warnings.append(f"{path}:{n}: bad JSON ({exc.msg}), line skipped")
            continue
        except (ValueError, RecursionError) as exc:  # a number over Python's digit limit; nesting too deep
            warnings.append(f"{path}:{n}: unreadable JSON ({_json_problem(exc)}), line skipped")
            continue
        doc = faq_row_document(row, where=f"{path.as_posix()}#{n}", faq_include_question=faq_include_question)
        if isinstance(doc, str):
            warnings.append(f"{path}:{n}: {doc}, line skipped")
        else:
            docs.append(doc)
    return docs


def _load_json(text: str, path: Path, faq_include_question: bool, warnings: list[str]) -> list[Document]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        warnings.append(f"{path}: bad JSON ({exc.msg} at line {exc.lineno}), skipped")
        return []
    except (ValueError, RecursionError) as exc:  # a number over Python's digit limit; nesting too deep
        warnings.append(f"{path}: unreadable JSON ({_json_problem(exc)}), skipped")
        return []
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        rows = lists[0] if len(lists) == 1 and not _row_fields(data) else [data]
    elif isinstance(data, list):
        rows = data
    else:
        warnings.append(f"{path}: expected a JSON list of rows or an object, got {type(data).__name__}, skipped")
        return []
    docs = []
    for n, row in enumerate(rows, start=1):
        doc = faq_row_document(row, where=f"{path.as_posix()}#{n}", faq_include_question=faq_include_question)
        if isinstance(doc, str):
            warnings.append(f"{path}: row {n}: {doc}, skipped")
        else:
            docs.append(doc)
    return docs


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]


def _has_surrogate(value: object) -> bool:
    """A JSON `\\ud800` escape decodes to a lone surrogate, which cannot be hashed or written as UTF-8."""
    stack = [value]  # iterative: rows may nest as deep as the JSON parser allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _row_fields(row: dict) -> tuple[str, ...] | None:
    if isinstance(row.get("text"), str):
        return ("text",)
    for q, a in FAQ_FIELD_PAIRS:
        if isinstance(row.get(q), str) and isinstance(row.get(a), str):
            return (q, a)
    return None


def faq_row_document(row: object, *, where: str, faq_include_question: bool) -> Document | str:
    """One JSON row → one Document, or a string saying why the row is unusable."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if _has_surrogate(row):
        return "invalid Unicode (an unpaired surrogate escape such as \\ud800)"
    fields = _row_fields(row)
    if fields is None:
        return "row has no 'text' and no question/answer pair (question+answer, q+a or instruction+output)"
    question = row[fields[0]].strip() if len(fields) == 2 else ""
    answer = row[fields[-1]].strip()
    text = f"{question}\n\n{answer}" if faq_include_question and question else answer
    if not text.strip():
        return "empty text"
    row_id = row.get("id")
    source = str(row_id) if isinstance(row_id, (str, int)) and str(row_id).strip() else where
    title = next(
        (str(row[key]).strip() for key in ("title", "category") if isinstance(row.get(key), str) and row[key].strip()),
        question or source,
    )
    metadata: dict = {}
    for key, value in row.items():
        if key in fields:
            continue
        if _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value)):
            metadata[key] = value
    if question:
        metadata["question"] = question
    metadata["kind"] = "faq"  # the chunker keeps FAQ rows whole
    return Document(text=text, source=source, title=title, metadata=metadata)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
