"""Cheap language rules around an answer: "the user asks for a person" and "this is a follow-up question".

Patterns live per language (ISO 639-1 code, the `index.language` config); a project in language L uses L's
rules plus English (customers often switch to English). A language without rules of its own gets English only.
The reply texts here are only defaults: a project's own come from `project.handoff_reply` and
`project.no_answer_reply` (see pipeline.service.build_service).
"""

from __future__ import annotations

import re

# The default replies live with the prompts; a project sets project.handoff_reply / no_answer_reply.
from finetune.prompt import HANDOFF_REPLY  # noqa: F401
from finetune.prompt import REFUSAL_ANSWER as LOW_SCORE_REPLY  # noqa: F401

DEFAULT_LANGUAGE = "en"

ASKED_FOR_PERSON = "user asked for a person"

#: Requests for a person, per language.
HANDOFF_PATTERNS: dict[str, tuple[str, ...]] = {
    "en": (
        r"\b(human|real person|live person|live agent|human agent|customer service agent|representative|operator)s?\b",
        r"\b(talk|speak|chat|connect|transfer|put)\b[^.?!]{0,30}\b(someone|somebody|person|agent|staff|people|colleague)\b",
        r"^\s*(an?\s+)?(agent|person|someone)[\s.!?]*(please)?[\s.!?]*$",
    ),
    "sv": (r"\b(prata|tala|snacka)\s+med\s+(en\s+)?(människa|person|handläggare|någon|kundtjänst)\b",),
    "da": (r"\b(tale|snakke)\s+med\s+(en\s+)?(person|menneske|medarbejder|nogen|kundeservice)\b",),
    "no": (r"\b(snakke|prate)\s+med\s+(en\s+)?(person|menneske|saksbehandler|noen|kundeservice)\b",),
    "de": (
        r"\b(sprechen|reden)\b[^.?!]{0,30}\bmit\s+(einem\s+|einer\s+)?(mensch(en)?|person|mitarbeiter(in)?|jemandem)\b",
        r"\bmit\s+(einem\s+|einer\s+)?(mensch(en)?|person|mitarbeiter(in)?|jemandem|dem kundendienst)\b[^.?!]{0,20}"
        r"\b(sprechen|reden)\b",
    ),
    "fr": (r"\b(parler|discuter)\s+(à|avec)\s+((un|une)\s+)?(humain|personne|conseill(er|ère)|agent|quelqu'un)\b",),
    "es": (r"\b(hablar|comunicarme)\s+con\s+((un|una)\s+)?(humano|persona|agente|asesor|alguien)\b",),
}
HANDOFF_PATTERNS["nb"] = HANDOFF_PATTERNS["nn"] = HANDOFF_PATTERNS["no"]

#: Pronouns and the like that make a question lean on the previous turn, per language.
FOLLOWUP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        [
            "it",
            "its",
            "that",
            "this",
            "those",
            "these",
            "they",
            "them",
            "their",
            "there",
            "one",
            "ones",
            "he",
            "she",
            "such",
            "same",
        ]
    ),
    "sv": frozenset(["det", "den", "dem", "dom", "detta", "dessa", "där", "samma"]),
}
#: Openers of a follow-up ("and what about ..."), per language (lower case, matched at the start).
FOLLOWUP_OPENERS: dict[str, tuple[str, ...]] = {
    "en": ("and ", "what about", "how about", "also", "and what", "but ", "same for", "then "),
    "sv": ("och ", "men ", "vad gäller", "samma för", "då "),
}


def _languages(language: str | None) -> tuple[str, ...]:
    code = (language or DEFAULT_LANGUAGE).lower()
    return (DEFAULT_LANGUAGE,) if code == DEFAULT_LANGUAGE else (DEFAULT_LANGUAGE, code)


_COMPILED: dict[str, list[re.Pattern]] = {}


def _handoff_patterns(language: str | None) -> list[re.Pattern]:
    key = ",".join(_languages(language))
    if key not in _COMPILED:
        _COMPILED[key] = [
            re.compile(p, re.IGNORECASE) for lang in _languages(language) for p in HANDOFF_PATTERNS.get(lang, ())
        ]
    return _COMPILED[key]


def wants_human(text: str, language: str | None = DEFAULT_LANGUAGE) -> bool:
    """True when the user explicitly asks for a person (in `language` or English)."""
    return any(p.search(text) for p in _handoff_patterns(language))


def condense_query(question: str, history: list[dict] | None, language: str | None = DEFAULT_LANGUAGE) -> str:
    """Make a follow-up standalone for retrieval: short questions, ones with pronouns or follow-up openers get
    the previous user turn prepended ("How much does it cost?" → "<previous question> How much does it cost?")."""
    previous = next((m["content"] for m in reversed(history or []) if m.get("role") == "user"), None)
    if not previous:
        return question
    q = question.strip()
    langs = _languages(language)
    words = re.findall(r"\w+", q.lower())
    pronouns = frozenset().union(*(FOLLOWUP_WORDS.get(lang, frozenset()) for lang in langs))
    openers = tuple(o for lang in langs for o in FOLLOWUP_OPENERS.get(lang, ()))
    if len(words) <= 4 or any(w in pronouns for w in words) or q.lower().startswith(openers):
        return f"{previous.strip()} {q}"
    return q
