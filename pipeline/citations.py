"""Verified citations: every answer sentence is attributed to the prompt passages that support it.

The model's own `[n]` markers are a claim, not a fact: a small model cites [1] out of habit, cites a passage that
says something else, or writes a confident sentence that no passage backs. `verify_answer` asks the calibrated
groundedness judge (`pipeline.metrics.Judge`, the same one evaluation uses) which passages support each sentence
and rewrites the markers to exactly those, in the spirit of Trust-Score's citation precision/recall (Song et al.,
ICLR 2025):
- a sentence gets `[n]` for every passage n that supports it, written before its end punctuation;
- a marker the model wrote that the judge rejects is removed and listed in `rejected`;
- a sentence that no passage supports gets no marker and is listed in `unsupported`;
- the policy then keeps it ("keep"), removes it ("drop"), or asks for a hand-over when too much of the answer
  is unsupported ("handover").

`[n]`-like text that is not a marker of an existing passage ("[7]" with three passages, "[2019]") is text, not a
citation: it stays where the model wrote it and never maps to a passage.

Serving (`AnswerService.verify` / `finish`) and evaluation call this, so evaluation scores what serving shows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pipeline.metrics import STOPWORDS, Judge, cited_sentences, normalize_text

POLICIES = ("keep", "drop", "handover")

# The marker syntax of pipeline.metrics (`[1]`, `[2, 3]`, `[1; 2]`): one run of numbers in brackets.
_MARKER = re.compile(r"\[\s*(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\s*\]")
# A stand-in for "[" in bracketed text that is not a marker of an existing passage, so that cited_sentences
# keeps it in the sentence as text; put back when the answer is rendered. U+2060 (word joiner) is invisible and
# never written by the models or found in documents we serve (it is stripped from input first).
_SHIELD = "\u2060"
_SPACES = re.compile(r"[^\S\r\n\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*$")


@dataclass
class Verified:
    text: str  # the answer as shown (markers rewritten to the verified ones; policy applied)
    citations: list[dict]  # passages cited in `text`: {"n","source","title","chunk_id","text","score","relevance"}
    unsupported: list[str]  # answer sentences no passage supports
    rejected: list[int]  # markers the model wrote that the judge rejected (not shown as citations)
    supported_share: float  # share of content sentences with support (nan if none)
    handover: bool  # the policy says hand over (too much unsupported)
    sentences: list[dict] = field(default_factory=list)  # per sentence: {"text", "cited", "supported_by"}


def _has_content(sentence: str) -> bool:
    """A sentence with at least one content word; "Sure!" or "Thanks." are neither supported nor unsupported."""
    return any(w not in STOPWORDS for w in normalize_text(sentence).split())


def _shield_foreign_markers(text: str, n_passages: int) -> str:
    """Hide brackets that are not markers of a passage 1..n_passages from the marker parser (they stay text)."""

    def shield(m: re.Match) -> str:
        numbers = [int(x) for x in re.split(r"\s*[,;]\s*", m.group(1))]
        if any(1 <= n <= n_passages for n in numbers):
            return m.group(0)  # a real marker (numbers outside the range in it are dropped with it)
        return "[" + _SHIELD + m.group(0)[1:]

    return _MARKER.sub(shield, text)


def _normalised(text: str) -> str:
    """The answer with markers removed and spacing normalised the way pipeline.metrics.split_sentences does, so
    the parsed sentences can be found in it again (and the answer's line breaks kept)."""
    text = _SPACES.sub(" ", _CONTROL.sub(" ", _MARKER.sub("", text)))
    text = "\n".join(line.strip() for line in text.splitlines())
    return text.replace(" .", ".").replace(" !", "!").replace(" ?", "?").replace(" ,", ",")


def _with_markers(sentence: str, numbers: list[int]) -> str:
    """`An extension needs a permit [1][2].`: the markers go before the sentence's end punctuation."""
    if not numbers:
        return sentence
    marks = "".join(f"[{n}]" for n in numbers)
    end = _END.search(sentence)
    if end is None:
        return f"{sentence} {marks}"
    return f"{sentence[: end.start()].rstrip()} {marks}{end.group(0)}"


def _render(text: str, parts: list[tuple[str, str | None]]) -> str:
    """Replace each sentence (in order) by its rendering (None: removed) inside the normalised text, keeping what
    lies between sentences (spaces, line breaks, list bullets). Falls back to joining the renderings with spaces
    when a sentence cannot be found (it never should: both come from the same normalisation)."""
    out: list[str] = []
    cursor = 0
    line_removed = False  # the previous sentence was removed and was alone on its line
    for sentence, rendered in parts:
        at = text.find(sentence, cursor)
        if at < 0:
            return " ".join(r for _, r in parts if r)
        gap = text[cursor:at]
        if line_removed and gap.startswith("\n"):
            gap = gap[1:]
        line_removed = False
        if rendered is None:
            after = text[at + len(sentence) : at + len(sentence) + 1]
            line_removed = (not gap.strip(" ") or gap.endswith("\n")) and after in ("\n", "")
            gap = gap if "\n" in gap else ""  # drop the space before a removed sentence, keep line breaks
        out.append(gap)
        if rendered is not None:
            out.append(rendered)
        cursor = at + len(sentence)
    tail = text[cursor:]
    out.append(tail[1:] if line_removed and tail.startswith("\n") else tail)
    result = "".join(out)
    return "\n".join(line.rstrip() for line in result.splitlines()).strip()


_ECHOED_HEADER = re.compile(r"^\s*\[(\d{1,3})\]\s*\(([^()\n]{0,200})\)\s*")


def _strip_echoed_header(text: str, passages: list[dict]) -> str:
    """Drop a "[n] (title) " that opens the answer when it repeats passage n's line header from the prompt (a small
    model that copies a passage copies its header too); the passage's support is then judged like any other."""
    m = _ECHOED_HEADER.match(text)
    if m and 1 <= int(m.group(1)) <= len(passages):
        title = " ".join(str(passages[int(m.group(1)) - 1].get("title") or "").split())
        if title and " ".join(m.group(2).split()) == title:
            return text[m.end() :]
    return text


def verify_answer(
    text: str, passages: list[dict], judge: Judge, *, policy: str = "keep", max_unsupported: float = 0.5
) -> Verified:
    """Attribute each sentence of `text` to the passages that support it, per `judge`.

    Args:
        text: the model's answer, with or without `[n]` markers.
        passages: the prompt's passages in order (n = index + 1): dicts with "text" and optionally "title",
            "source", "chunk_id", "score", "relevance" (or "dense_score").
        judge: the calibrated groundedness judge.
        policy: "keep" (unsupported sentences stay, listed), "drop" (removed from the text; an answer with nothing
            left asks for a hand-over), "handover" (handover=True when the unsupported share > max_unsupported).
        max_unsupported: the largest share of unsupported content sentences the "handover" policy accepts.

    Returns:
        Verified; `citations` lists only the passages cited in the returned text, in number order.
    """
    if policy not in POLICIES:
        raise ValueError(f"citation policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    text = _strip_echoed_header((text or "").replace(_SHIELD, ""), passages)
    shielded = _shield_foreign_markers(text, len(passages))
    parsed = cited_sentences(shielded)
    content = [_has_content(s) for s, _ in parsed]
    checked = [s for (s, _), c in zip(parsed, content, strict=True) if c]
    support = judge.support(checked, [str(p.get("text") or "") for p in passages]) if checked and passages else None

    rows: list[dict] = []
    rejected: dict[int, None] = {}
    unsupported: list[str] = []
    k = 0
    for (sentence, written), has_content in zip(parsed, content, strict=True):
        by = []
        if has_content and support is not None:
            by = [n for n in range(1, len(passages) + 1) if support[k, n - 1]]
        k += has_content
        for n in written:
            if 1 <= n <= len(passages) and n not in by:
                rejected.setdefault(n, None)
        if has_content and not by:
            unsupported.append(sentence.replace(_SHIELD, ""))
        rows.append(
            {"text": sentence.replace(_SHIELD, ""), "cited": by, "written": list(written), "content": has_content}
        )

    n_content = sum(content)
    share = math.nan if n_content == 0 else (n_content - len(unsupported)) / n_content
    parts = []
    for (sentence, _), row in zip(parsed, rows, strict=True):
        drop = policy == "drop" and row["content"] and not row["cited"]
        parts.append((sentence, None if drop else _with_markers(sentence, row["cited"])))
    shown = _render(_normalised(shielded), parts).replace(_SHIELD, "")

    handover = False
    if policy == "handover" and n_content:
        handover = len(unsupported) / n_content > max_unsupported
    elif policy == "drop" and n_content and len(unsupported) == n_content:
        handover = True  # nothing supported is left to show

    cited = sorted({n for row in rows for n in row["cited"]})  # dropped sentences cite nothing
    citations = [passage_citation(n, passages[n - 1]) for n in cited]
    sentences = [{"text": r["text"], "cited": r["cited"], "written": r["written"]} for r in rows]
    return Verified(shown, citations, unsupported, list(rejected), share, handover, sentences)


def passage_citation(n: int, passage: dict) -> dict:
    """The citation of passage n as shown to a person: its title and text, so the answer can be checked."""
    return {
        "n": n,
        "source": passage.get("source"),
        "title": passage.get("title"),
        "question": passage.get("question") or (passage.get("metadata") or {}).get("question"),
        "chunk_id": passage.get("chunk_id"),
        "text": passage.get("text"),
        "score": passage.get("score"),
        "relevance": passage.get("relevance", passage.get("dense_score")),
    }
