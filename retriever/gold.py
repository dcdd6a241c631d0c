"""Which indexed chunks are the gold passages of a Q/A row: used by evaluation (hit@k, citations, the oracle arm)
and by RAFT training (gold context, and keeping held-out rows' gold out of the distractors).

In this order:
  1. chunks whose `source` is the row's `source` or `id` (a Q/A knowledge base indexes each row under its id;
     a ticket may name the page that answers it: a path, a file name, a file stem or a section title);
  2. otherwise the chunks that best contain the reference answer, judged on its *distinctive* words (three or more
     letters, in at most 5 % of the chunks, or two chunks in a small corpus): the answer needs at least
     `MIN_DISTINCTIVE` of them, and the chunk must hold `min_overlap` of them. Short or generic answers ("Yes.",
     "I am not sure about that") therefore have no gold by content instead of matching half the corpus
     (tests/retriever/test_gold.py pins examples on both sides).
No match means "no defined gold": metrics that need one read n/a, not 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import PurePosixPath

#: Share of the reference answer's distinctive words a chunk must contain to count as its gold passage.
MIN_OVERLAP = 0.6
#: Fewer distinctive words than this: the answer is too generic to pin to a passage.
MIN_DISTINCTIVE = 4
#: A word in more than this share of the chunks is common, not evidence (at least 2 chunks in a small corpus).
COMMON_SHARE = 0.05
_WORD = re.compile(r"\w+", re.UNICODE)


def content_words(text: str) -> set[str]:
    """Lower-cased words of three or more characters (drops most function words in any language)."""
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3}


def _norm(value) -> str:
    return str(value or "").strip().lower()


def _file_keys(source: str) -> list[str]:
    """A path's file name and stem ("/kb/heat-pumps.md#e4" -> "heat-pumps.md", "heat-pumps"), in that order."""
    path = PurePosixPath(_norm(source).split("#", 1)[0])
    return [k for k in (path.name, path.stem) if k]


class GoldFinder:
    """Built once over an index's chunks; `find(row)` returns the gold chunk ids of a row (may be empty)."""

    def __init__(self, chunks: Iterable, *, min_overlap: float = MIN_OVERLAP):
        self.min_overlap = min_overlap
        self._exact: dict[str, list[str]] = defaultdict(list)  # the chunk's whole source (a Q/A row's id)
        self._file: dict[str, list[str]] = defaultdict(list)  # file name or stem of a document chunk
        self._title: dict[str, list[str]] = defaultdict(list)  # section title of a document chunk
        self._postings: dict[str, list[str]] = defaultdict(list)
        self.n_chunks = 0
        for chunk in chunks:
            self.n_chunks += 1
            self._exact[_norm(chunk.source)].append(chunk.chunk_id)
            if (getattr(chunk, "metadata", None) or {}).get("kind") != "faq":  # Q/A chunks are titled by category
                for key in _file_keys(str(chunk.source)):
                    self._file[key].append(chunk.chunk_id)
                if _norm(getattr(chunk, "title", "")):
                    self._title[_norm(chunk.title)].append(chunk.chunk_id)
            for w in content_words(chunk.text):
                self._postings[w].append(chunk.chunk_id)

    def by_id(self, row_id) -> list[str]:
        """Chunks whose whole source is this id: a Q/A knowledge base indexes each row under its id."""
        return list(self._exact.get(_norm(row_id), ())) if _norm(row_id) else []

    def by_source(self, row: dict) -> list[str]:
        """Chunks named by the row, in a fixed order: its id as a chunk source, its `source` as a whole source,
        as a file name, as a file stem, as a section title."""
        found = self.by_id(row.get("id"))
        source = _norm(row.get("source"))
        if found or not source:
            return found
        for table, key in [
            (self._exact, source),
            *((self._file, k) for k in _file_keys(source)),
            (self._title, source),
        ]:
            if table.get(key):
                return list(dict.fromkeys(table[key]))
        return []

    def by_content(self, answer: str | None) -> list[str]:
        """Chunks holding at least `min_overlap` of the answer's distinctive words, best first (ties: all kept)."""
        limit = max(2.0, COMMON_SHARE * self.n_chunks)
        words = {w for w in content_words(answer or "") if len(self._postings.get(w, ())) <= limit}
        if len(words) < MIN_DISTINCTIVE:
            return []
        hits: dict[str, int] = defaultdict(int)
        for w in words:
            for chunk_id in self._postings.get(w, ()):
                hits[chunk_id] += 1
        if not hits:
            return []
        best = max(hits.values())
        if best / len(words) < self.min_overlap:
            return []
        return [c for c, n in hits.items() if n == best]

    def find(self, row: dict) -> list[str]:
        return self.by_source(row) or self.by_content(row.get("answer"))

    def all_gold(self, row: dict) -> list[str]:
        """Every chunk that holds the row's answer: named by the row and found by content, together. What a
        "gold removed" question must not retrieve (evaluation's set, the gate's negatives, RAFT's distractor-only
        rows), so that a near-duplicate answer elsewhere in the knowledge base is removed too."""
        return list(dict.fromkeys([*self.by_source(row), *self.by_content(row.get("answer"))]))
