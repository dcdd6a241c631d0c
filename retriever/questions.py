"""Hypothetical-question indexing (index.doc_questions): questions a chunk answers, embedded and keyword-indexed
with it, so that a customer's question is matched against questions and not only against answer prose
(doc2query, Nogueira et al. 2019; the question-in-chunk index of the FAQ scores hit@5 1.00 for this reason).

Two sources:
  - "headings": question-shaped lines of the chunk's own section: its title, its markdown headings and its
    sentences that end in a question mark (any script). Never an FAQ row's own question field.
  - "generate": the project's generator writes `per_chunk` short customer questions per chunk at build time,
    all prompts submitted at once so the generator batches them.
`add_questions_fn` returns the callable `build_index(add_questions=...)` takes; questions of an unchanged chunk
(same content hash in the previous index) are reused, so a rebuild generates only for new or changed chunks.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from functools import partial

from raglora.errors import RagloraError
from retriever.chunking import Chunk

log = logging.getLogger("raglora.questions")

MODES = ("off", "headings", "generate")
#: A longer line is a paragraph or a rambling generation, not a question a customer types.
MAX_QUESTION_CHARS = 200
MIN_QUESTION_CHARS = 8

#: Chat prompts (system + user message lists) -> one completion text per prompt, in order.
Writer = Callable[[list[list[dict]]], list[str]]
AddQuestions = Callable[[list[Chunk], dict[str, list[str]]], None]

# The one prompt of "generate": instructions plus one worked example. Without the example a small instruct model
# (SmolLM2-135M) mostly restates the text or asks about "the project"; the example shows the shape wanted.
SYSTEM_PROMPT = "You write the questions customers send to a company's support team."
USER_PROMPT = (
    "Write {n} short, different questions that a customer might ask and that the text below answers. "
    "Write them the way a customer would, in the language of the text. One question per line, nothing else.\n\n"
    "Text:\n{text}"
)
EXAMPLE_TEXT = (
    "The boiler should be serviced once a year by a certified technician. A service costs about 1,500 SEK and "
    "takes two hours."
)
EXAMPLE_QUESTIONS = (
    "How often does my boiler need a service?\nWho is allowed to service a boiler?\nWhat does a boiler service cost?"
)

_QUESTION_MARKS = "?？؟"  # Latin, full-width (CJK) and Arabic question marks
_SENTENCE = re.compile(r"[^.!?。！？؟\n]*[?？؟]")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]+\s*|(?:\(?\d{1,2}[.):]|[A-Za-z][.)]|Q\d*[:.])\s+)", re.IGNORECASE)
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


def _fold(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _clean(line: str) -> str:
    """A candidate line without list numbering, markdown emphasis or surrounding quotes."""
    line = _LIST_MARK.sub("", line.strip()).strip()
    return line.strip("*_`\"'“”‘’ ").strip()


def keep_questions(candidates: Sequence[str], limit: int, *, exclude: Sequence[str] = ()) -> list[str]:
    """The first `limit` usable candidates: cleaned, with letters, not overlong, no duplicates (case and
    punctuation folded), none equal to an `exclude` text."""
    seen = {_fold(e) for e in exclude if e}
    out: list[str] = []
    for raw in candidates:
        q = _clean(raw)
        key = _fold(q)
        if not key or key in seen or not _LETTER.search(q):
            continue
        if not MIN_QUESTION_CHARS <= len(q) <= MAX_QUESTION_CHARS:
            continue
        seen.add(key)
        out.append(q)
        if len(out) == limit:
            break
    return out


def _own_question(chunk: Chunk) -> list[str]:
    """An FAQ row's question field: held-out questions must never reach the index through it."""
    q = (chunk.metadata or {}).get("question")
    return [q] if isinstance(q, str) else []


def heading_questions(chunk: Chunk, limit: int) -> list[str]:
    """Question-shaped title, markdown headings and ?-sentences of the chunk, in that order (at most `limit`).

    An FAQ chunk's title is its category or, without one, its question, so it is never used.
    """
    candidates: list[str] = []
    if (chunk.metadata or {}).get("kind") != "faq" and chunk.title:
        candidates.append(chunk.title)
    lines = chunk.text.splitlines()
    candidates += [m.group(1) for line in lines if (m := _HEADING.match(line))]
    for line in lines:
        m = _HEADING.match(line)
        candidates += _SENTENCE.findall(m.group(1) if m else line)
    shaped = [c.strip() for c in candidates if c.strip().endswith(tuple(_QUESTION_MARKS))]
    return keep_questions(shaped, limit, exclude=_own_question(chunk))


def question_prompt(chunk: Chunk, n: int) -> list[dict]:
    """The chat prompt that asks for `n` questions about one chunk (its text only, never its metadata)."""
    example = "\n".join(EXAMPLE_QUESTIONS.splitlines()[:n] or EXAMPLE_QUESTIONS.splitlines())
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_PROMPT.format(n=min(n, 3), text=EXAMPLE_TEXT)},
        {"role": "assistant", "content": example},
        {"role": "user", "content": USER_PROMPT.format(n=n, text=chunk.text.strip())},
    ]


def parse_questions(completion: str, limit: int, chunk: Chunk | None = None) -> list[str]:
    """One question per line of a completion; numbering stripped, lines that are not questions (a small model
    restates the text) and empty/duplicate/overlong ones dropped."""
    exclude = _own_question(chunk) if chunk is not None else []
    lines = [line for line in (completion or "").splitlines() if _clean(line).endswith(tuple(_QUESTION_MARKS))]
    return keep_questions(lines, limit, exclude=exclude)


def generator_writer(generator, encode: Callable[[list[dict]], list[int]], params=None) -> Writer:
    """A Writer over the serving Generator (pipeline.generate): every prompt is submitted before any result is
    awaited, so the generator's batcher fills its batches. `encode` renders a chat prompt to token ids
    (finetune.prompt.chat_ids with add_generation_prompt=True); `params` its SamplingParams (greedy by default)."""

    def write(prompts: list[list[dict]]) -> list[str]:
        handles = [generator.submit(encode(p), params=params) for p in prompts]
        return [h.result().text for h in handles]

    return write


def _fill(chunks: list[Chunk], previous: dict[str, list[str]], make: Callable[[list[Chunk]], list[list[str]]]):
    """Set every chunk's questions: from `previous` by content hash, else from `make` (once per distinct text)."""
    todo: dict[str, Chunk] = {}
    for chunk in chunks:
        if chunk.content_hash in previous:
            chunk.questions = list(previous[chunk.content_hash])
        else:
            todo.setdefault(chunk.content_hash, chunk)
    if not todo:
        return
    made = dict(zip(todo, make(list(todo.values())), strict=True))
    for chunk in chunks:
        if chunk.content_hash in made:
            chunk.questions = list(made[chunk.content_hash])


def add_questions_fn(
    mode: str, per_chunk: int, *, generator_factory: Callable[[], Writer] | None = None
) -> AddQuestions | None:
    """The `add_questions` callable for build_index, or None for mode "off".

    Args:
        mode: "off", "headings" or "generate" (index.doc_questions).
        per_chunk: most questions per chunk (index.doc_questions_per_chunk).
        generator_factory: for "generate", called once and only when some chunk needs new questions (so an
            unchanged corpus never loads a model); returns a Writer (see `generator_writer`).
    """
    if mode not in MODES:
        raise RagloraError(f"unknown doc_questions mode {mode!r} (use one of: {', '.join(MODES)})")
    if not isinstance(per_chunk, int) or per_chunk <= 0:
        raise RagloraError(f"doc_questions_per_chunk must be a positive integer, got {per_chunk!r}")
    if mode == "off":
        return None
    if mode == "headings":
        fill = partial(_fill, make=lambda todo: [heading_questions(c, per_chunk) for c in todo])
        return _with_settings(fill, mode, per_chunk)
    if generator_factory is None:
        raise RagloraError("doc_questions: generate needs the project's generator (model.base), none was given")

    def generate(todo: list[Chunk]) -> list[list[str]]:
        log.info("writing questions for %d chunk(s)", len(todo))
        texts = generator_factory()([question_prompt(c, per_chunk) for c in todo])
        if len(texts) != len(todo):
            raise RagloraError(f"doc_questions: the generator returned {len(texts)} texts for {len(todo)} prompts")
        return [parse_questions(t, per_chunk, c) for t, c in zip(texts, todo, strict=True)]

    return _with_settings(partial(_fill, make=generate), mode, per_chunk)


def _with_settings(fill, mode: str, per_chunk: int) -> AddQuestions:
    """Tag the callable with what its questions depend on (`.settings`): questions of an index built with other
    settings must not be passed back as `previous`. Record them in the manifest and compare."""
    fill.settings = {"doc_questions": mode, "per_chunk": per_chunk}
    if mode == "generate":
        prompt = "\x00".join([SYSTEM_PROMPT, USER_PROMPT, EXAMPLE_TEXT, EXAMPLE_QUESTIONS])
        fill.settings["prompt"] = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
    return fill
