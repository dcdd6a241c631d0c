"""Offline evaluation metrics: answer overlap, groundedness, citations, refusals, bootstrap CIs.

Retrieval metrics (hit@k, reciprocal rank) live in `retriever.evaluate`, their one home.

Everything here is a pure function of strings, vectors or numbers, so the harness (`pipeline.evaluate`)
can score every arm on CPU without a paid LLM judge, and each metric can be tested against hand-computed
values. Per-question values are kept (not only means) so that `bootstrap_ci` / `paired_bootstrap_diff`
can put a 95% interval on every number the report shows. Embedding is done by the caller: functions that
need vectors take an `embed(texts) -> np.ndarray` callable (e.g. a SentenceTransformer's `encode` with
`normalize_embeddings=True`), so this module never loads a model.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer

Embed = Callable[[list[str]], np.ndarray]

# What each metric means, shown verbatim in the report's methodology section.
METRIC_DEFINITIONS: dict[str, str] = {
    "trust_score": "Mean of grounded_refusal_f1, answer correctness (token_f1 of the answered answerable questions; 0 "
    "when the arm answered none) and citation_f1, as in Trust-Score (Song et al., ICLR 2025); n/a when a part is.",
    "grounded_refusal_f1": "Macro average of the F1 of the 'hand over' class (positives: the unanswerable "
    "questions) and the F1 of the 'answer' class (positives: the answerable questions) over both kinds together "
    "(Trust-Score's F1_GR); the CI resamples questions.",
    "token_f1": "SQuAD token F1 between answer and reference after normalisation (lowercase, no punctuation, "
    "no articles), on the answerable questions the arm answered (a hand-over is not scored here).",
    "rouge_l": "ROUGE-L F-measure (longest common subsequence of tokens), no stemming, Unicode-aware tokens; on "
    "answered questions.",
    "semantic_similarity": "Cosine similarity of the answer and reference sentence embeddings (the index's embedder), "
    "on answered questions.",
    "groundedness": "Share of the shown answer's sentences that some retrieved passage supports (the judge).",
    "citation_rate": "Share of answered answerable questions whose shown answer cites at least one prompt passage "
    "with an [n] marker.",
    "citation_precision": "Share of (sentence, cited passage) pairs of the shown answer where the judge says the "
    "passage supports the sentence (a number that is not a prompt passage is unsupported); answers without "
    "citations are left out.",
    "citation_recall": "Share of the shown answer's content sentences supported by at least one passage they cite "
    "(an uncited sentence is not supported).",
    "citation_f1": "Harmonic mean of the arm's citation precision and recall (0 when it never cites); the CI "
    "resamples questions.",
    "model_citation_rate": "citation_rate of the model's raw answer, before serving verified its markers.",
    "model_citation_precision": "citation_precision of the model's raw markers, before verification.",
    "model_citation_recall": "citation_recall of the model's raw markers, before verification.",
    "model_citation_f1": "citation_f1 of the model's raw markers, before verification.",
    "citation_gold_precision": "Share of the passages the shown answer cites that are gold passages of the question "
    "(questions without a defined gold passage are left out).",
    "refusal_rate": "Share of the set's questions the bot hands over (says it cannot answer or offers a human).",
    "refusal_gold_removed": "Share of gold-removed questions (asked with their gold passages removed from "
    "retrieval) the bot hands over. Higher is better.",
    "refusal_near_domain": "Share of near-domain questions (in-domain-sounding, no document answers them) the bot "
    "hands over. Higher is better.",
    "refusal_in_domain_unanswerable": "Share of gold-removed and near-domain questions together that the bot hands "
    "over. Higher is better.",
    "refusal_off_topic": "Share of off-topic (out-of-knowledge-base) questions the bot hands over. Higher is better.",
    "false_refusal_rate": "Share of answerable questions the bot hands over. Lower is better.",
    "mrr": "Mean reciprocal rank of the first gold passage among the retrieved passages (0 when none was retrieved; "
    "questions without a defined gold passage are left out).",
}
_HIT_AT = re.compile(r"^hit@(\d+)$")


def metric_definition(name: str) -> str | None:
    """What a metric computes, for the report; hit@k is defined for whatever k was retrieved."""
    if m := _HIT_AT.match(name):
        k = int(m.group(1))
        where = "the top retrieved passage" if k == 1 else f"the top {k} retrieved passages"
        return (
            f"Share of questions with a gold passage among {where} (questions without a defined gold passage are "
            "left out)."
        )
    return METRIC_DEFINITIONS.get(name)


# ---------------------------------------------------------------------------------------------- text overlap

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NOT_WORD = re.compile(r"[^\w\s]|_")
_WORD = re.compile(r"[^\W_]+")
_ROUGE_MAX_TOKENS = 1024  # the LCS is O(n*m) pure Python; model answers are far shorter than this


def normalize_text(s: str) -> str:
    """SQuAD normalisation (lowercase, drop punctuation and articles, collapse spaces), Unicode-aware.

    NFKC first so that full-width or ligature forms compare equal to their plain spelling; punctuation and
    symbols of any script are removed (as SQuAD removes ASCII punctuation), letters of any script are kept.
    """
    s = unicodedata.normalize("NFKC", s or "").lower()
    s = _NOT_WORD.sub("", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall on normalised bags of words."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


class _UnicodeTokenizer:
    """rouge_score's default tokenizer keeps only [a-z0-9], mangling å/ä/ö/é; this keeps letters of any script."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(unicodedata.normalize("NFKC", text or "").lower())[:_ROUGE_MAX_TOKENS]


_ROUGE_TOKENIZER = _UnicodeTokenizer()
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_ROUGE_TOKENIZER)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge_score, no stemmer, so no nltk data is needed); both empty -> 1.0 like token_f1."""
    if not _ROUGE_TOKENIZER.tokenize(prediction) and not _ROUGE_TOKENIZER.tokenize(reference):
        return 1.0
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Row-normalise defensively (zero rows stay zero) so cosine is a plain dot product."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def semantic_similarity(pred_vecs: np.ndarray, ref_vecs: np.ndarray) -> np.ndarray:
    """Cosine similarity of row-paired vectors (row i of predictions against row i of references)."""
    p, r = _unit_rows(pred_vecs), _unit_rows(ref_vecs)
    if p.shape != r.shape:
        raise ValueError(f"prediction and reference vectors must pair up row by row, got {p.shape} vs {r.shape}")
    return np.einsum("ij,ij->i", p, r)


# ------------------------------------------------------------------------------------------------- sentences

_CITATION = re.compile(r"\[\s*\d{1,3}(?:\s*[,;]\s*\d{1,3})*\s*\]")
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*")
_SPACES = re.compile(r"[^\S\r\n\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_OPENERS = frozenset("\"'(\u201c\u2018\u00bf\u00a1")


def split_sentences(text: str) -> list[str]:
    """Split on line breaks and on . ! ? followed by space and a capital (not before digits: "PBL 9 kap. 4 §").

    Citation markers like [1] or [2, 3] are removed first so they never become sentences of their own;
    fragments without a letter or digit are dropped. No pattern here can backtrack, so the cost stays linear
    on adversarial input (long runs of dots or spaces).
    """
    text = _SPACES.sub(" ", _CONTROL.sub(" ", _CITATION.sub("", text or "")))
    sentences: list[str] = []
    for line in re.split(r"[\r\n\u2028\u2029]+", text):
        start = 0
        for m in _SENTENCE_END.finditer(line):
            end = m.end()
            if line[end : end + 1] == " " and (
                line[end + 1 : end + 2].isupper() or line[end + 1 : end + 2] in _OPENERS
            ):
                sentences.append(line[start:end])
                start = end
        sentences.append(line[start:])
    cleaned = (s.strip().replace(" .", ".").replace(" !", "!").replace(" ?", "?") for s in sentences)
    return [s for s in cleaned if _WORD.search(s)]


# ---------------------------------------------------------------------------------------------- groundedness

# Function words in English and Swedish (the packaged demo ships both); trigrams of what is left carry the facts.
_STOP_EN = """a an the and or but if then so of to in on at by for with from as is are was were be been being it its
this that these those there here i you he she we they me him her us them my your our their his what which who whom
whose when where why how all any both each few more most other some such no nor not only own same than too very can
will just do does did doing have has had having should would could may might must shall about into over under again
further once also up down out off s t dont doesnt isnt arent cant wont"""
_STOP_SV = """och att det som en ett är på för med har inte av till den de om kan ska jag du vi ni man så men eller var
vara blir också när där här sig sin sitt sina han hon dem detta denna dessa"""
STOPWORDS = frozenset(_STOP_EN.split() + _STOP_SV.split())


def _content_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Content-word n-grams; a text shorter than n content words yields one shorter gram (so it can still match)."""
    words = [w for w in normalize_text(text).split() if w not in STOPWORDS]
    if not words:
        return set()
    n = min(n, len(words))
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_support(sentence: str, contexts: Sequence[str], *, ngram: int = 3) -> float:
    """Share of the sentence's content-word n-grams that occur in any one context (nan if it has none)."""
    grams = _content_ngrams(sentence, ngram)
    if not grams:
        return math.nan
    n = len(next(iter(grams)))
    ctx: set[tuple[str, ...]] = set()
    for c in contexts:
        ctx |= _content_ngrams(c, n)
    return len(grams & ctx) / len(grams)


@dataclass(frozen=True)
class Judge:
    """The calibrated groundedness judge: a passage supports a sentence when the sentence's best cosine similarity
    to one of the passage's sentences reaches `threshold`, or when >= `overlap` of its content-word n-grams occur in it.

    One judge scores groundedness, citation precision/recall (evaluation) and attributes citations (serving), so
    what serving shows and what evaluation scores are judged alike. `calibrate_judge` picks the threshold.
    """

    embed: Embed | None  # embed(texts) -> np.ndarray (normalised rows); None: n-gram rule only
    threshold: float = 0.6
    ngram: int = 3
    overlap: float = 0.5  # > 1 switches the n-gram rule off (embedding rule only)

    def support(self, sentences: list[str], passages: list[str]) -> np.ndarray:
        """bool [len(sentences), len(passages)]: whether passage j supports sentence i (one batched embed call)."""
        out = np.zeros((len(sentences), len(passages)), dtype=bool)
        if not sentences or not passages:
            return out
        if self.overlap <= 1:
            grams = [_content_ngrams(s, self.ngram) for s in sentences]
            passage_grams: dict[int, list[set]] = {}  # n -> grams of every passage (short sentences use n < ngram)
            for i, g in enumerate(grams):
                if not g:
                    continue
                n = len(next(iter(g)))
                if n not in passage_grams:
                    passage_grams[n] = [_content_ngrams(p, n) for p in passages]
                out[i] = [len(g & pg) / len(g) >= self.overlap for pg in passage_grams[n]]
        if self.embed is not None:
            per_passage = [split_sentences(p) for p in passages]
            texts = list(dict.fromkeys([*sentences, *(x for ps in per_passage for x in ps)]))
            if any(per_passage):
                vecs = dict(zip(texts, _unit_rows(self.embed(texts)), strict=True))
                left = np.stack([vecs[s] for s in sentences])  # (S, d)
                for j, ps in enumerate(per_passage):
                    if ps:
                        best = (left @ np.stack([vecs[x] for x in ps]).T).max(axis=1)  # (S,)
                        out[:, j] |= best >= self.threshold
        return out


def _content_sentences(answer: str) -> list[str]:
    """Answer sentences that carry content words; "Sure!" or "[1]" alone is neither grounded nor ungrounded."""
    return [s for s in split_sentences(answer) if _content_ngrams(s, 1)]


def groundedness(
    answer: str,
    contexts: Sequence[str],
    *,
    embed: Embed | None = None,
    threshold: float = 0.6,
    ngram: int = 3,
    overlap: float = 0.5,
    method: str = "either",
) -> float:
    """Share of answer sentences some retrieved passage supports (the `Judge`); nan when there is nothing to check.

    `method` is "embedding", "ngram" or "either" (the judge: OR of both rules; n-grams alone when no `embed` is
    given). Sentences without content words ("Sure!") are not counted either way.
    """
    if method not in ("embedding", "ngram", "either"):
        raise ValueError(f"method must be 'embedding', 'ngram' or 'either', got {method!r}")
    if method == "embedding" and embed is None:
        raise ValueError("method='embedding' needs an embed function")
    judge = Judge(
        embed=None if method == "ngram" else embed,
        threshold=threshold,
        ngram=ngram,
        overlap=math.inf if method == "embedding" else overlap,
    )
    sentences = _content_sentences(answer)
    if not sentences:
        return math.nan
    return float(judge.support(sentences, list(contexts)).any(axis=1).mean())


def calibrate_groundedness_threshold(
    supported_pairs: Sequence[tuple[str, str]],
    unsupported_pairs: Sequence[tuple[str, str]],
    embed: Embed,
    *,
    ngram: int = 3,
    overlap: float = 0.5,
) -> dict:
    """Pick the similarity threshold that best separates supported from unsupported (sentence, context) pairs.

    The threshold maximises balanced accuracy (mean of true-positive and true-negative rates) over midpoints
    between observed scores, so it does not depend on class sizes. The result also reports how the n-gram
    rule and the OR of both rules do on the same pairs, so the report can justify the groundedness method.
    """
    pairs = list(supported_pairs) + list(unsupported_pairs)
    labels = np.array([True] * len(supported_pairs) + [False] * len(unsupported_pairs))
    if not len(supported_pairs) or not len(unsupported_pairs):
        raise ValueError("calibration needs at least one supported and one unsupported pair")
    ctx_sentences = [split_sentences(c) for _, c in pairs]
    texts = list(dict.fromkeys([s for s, _ in pairs] + [x for cs in ctx_sentences for x in cs]))
    vecs = dict(zip(texts, _unit_rows(embed(texts)), strict=True))  # one batched call, not one per pair
    scores = np.array(
        [max((vecs[s] @ vecs[x] for x in cs), default=0.0) for (s, _), cs in zip(pairs, ctx_sentences, strict=True)]
    )
    uniq = np.unique(scores)
    candidates = np.concatenate([[uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2, [uniq[-1] + 1e-6]])
    pos, neg = scores[labels], scores[~labels]
    tpr = (pos[None, :] >= candidates[:, None]).mean(axis=1)
    tnr = (neg[None, :] < candidates[:, None]).mean(axis=1)
    best = int(np.argmax((tpr + tnr) / 2))
    threshold = float(candidates[best])

    def balanced(pred: np.ndarray) -> float:
        return float((pred[labels].mean() + (~pred[~labels]).mean()) / 2)

    by_ngram = np.array([ngram_support(s, [c], ngram=ngram) >= overlap for s, c in pairs])
    return {
        "threshold": threshold,
        "balanced_accuracy": float((tpr[best] + tnr[best]) / 2),
        "true_positive_rate": float(tpr[best]),
        "true_negative_rate": float(tnr[best]),
        "ngram_balanced_accuracy": balanced(by_ngram),
        "either_balanced_accuracy": balanced(by_ngram | (scores >= threshold)),
        "supported_score_mean": float(pos.mean()),
        "unsupported_score_mean": float(neg.mean()),
        "n_supported": int(len(pos)),
        "n_unsupported": int(len(neg)),
        "ngram": ngram,
        "overlap": overlap,
    }


#: Names how `calibrate_judge` labels its pairs; a cached calibration of another method is stale.
JUDGE_CALIBRATION_METHOD = "reworded sentence vs own / near passage v3"


def _reword(sentence: str, rng: np.random.Generator, drop: float = 0.3) -> str:
    """The sentence with about `drop` of its words left out (order kept): an answer that restates a passage
    sentence loosely, as a model's does."""
    words = sentence.split()
    keep = [w for w in words if rng.random() >= drop]
    return " ".join(keep if len(keep) >= max(3, len(words) // 2) else words[: max(3, len(words) // 2)])


def calibrate_judge(texts: list[str], embed: Embed, n_pairs: int, seed: int = 0, *, neighbours: int = 10) -> dict:
    """Calibrate the judge's threshold on pairs labelled from the knowledge base itself (index chunks or KB
    answers, any domain). A passage sentence restated loosely (`_reword`: about a third of its words left out) is
    supported by its own passage, and not by a *topically close* other passage (among the `neighbours* most similar
    passages, the first that does not repeat its content words).

    Easier labels calibrate the wrong question: against a random other passage as the negative, any in-domain
    sentence passes as supported by any in-domain passage (the made-up answer the judge must catch); with "the rest
    of its own passage" as the positive, support means "on the same topic". Returns
    `calibrate_groundedness_threshold`'s dict plus "method"; the default 0.6 without pairs."""
    rng = np.random.default_rng(seed)
    passages = [t for t in dict.fromkeys(texts) if len(split_sentences(t)) >= 2]
    if n_pairs <= 0 or len(passages) < 3:
        return {"threshold": 0.6, "method": "default threshold 0.6 (no calibration pairs)"}
    picks = rng.choice(len(passages), size=min(n_pairs, len(passages)), replace=False)
    vecs = _unit_rows(embed(passages))
    supported, unsupported = [], []
    for i in picks:
        sentences = split_sentences(passages[i])
        sentence = _reword(sentences[int(rng.integers(len(sentences)))], rng)
        sims = vecs @ vecs[i]
        sims[i] = -np.inf
        close = [int(x) for x in np.argsort(-sims)[:neighbours]]
        other = next((passages[x] for x in close if ngram_support(sentence, [passages[x]]) < 0.5), None)
        if other is None:  # every close passage repeats the sentence (duplicates): a random one
            other = passages[int((i + 1 + rng.integers(len(passages) - 1)) % len(passages))]
        supported.append((sentence, passages[i]))
        unsupported.append((sentence, other))
    result = calibrate_groundedness_threshold(supported, unsupported, embed)
    result["method"] = (
        "a passage supports an answer sentence when the sentence's best cosine similarity to one of its sentences "
        "reaches the threshold, or when half its content-word trigrams occur in it; the threshold maximises balanced "
        f"accuracy on {len(supported)} supported (a passage sentence with about a third of its words left out, vs "
        f"its own passage) and {len(unsupported)} unsupported (the same sentence vs the most similar of the "
        f"{neighbours} nearest other passages that does not repeat it) pairs from the knowledge base"
    )
    result["calibration_method"] = JUDGE_CALIBRATION_METHOD
    return result


# ------------------------------------------------------------------------------------------------- citations

_MARKER = re.compile(r"\[\s*(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\s*\]")


def citation_markers(answer: str) -> list[int]:
    """Source numbers cited as [1], [2, 3] or [1][2], unique, in order of first appearance."""
    seen: dict[int, None] = {}
    for m in _MARKER.finditer(answer or ""):
        for num in re.split(r"\s*[,;]\s*", m.group(1)):
            seen.setdefault(int(num), None)
    return list(seen)


def has_citation(answer: str) -> bool:
    """Whether the answer cites any source with a [n] marker."""
    return bool(_MARKER.search(answer or ""))


def citation_precision(
    answer: str, cited_sources_by_number: dict[int, str], gold: str | Collection[str] | None
) -> float:
    """Share of distinct cited numbers whose passage is gold (one id or a set of ids); nan when nothing is cited
    or when the question has no defined gold (then precision is unknown, not 0).

    A number that was not in the prompt (a hallucinated citation) counts as a wrong citation.
    """
    targets = {gold} if isinstance(gold, str) else set(gold or ())
    targets.discard("")
    cited = citation_markers(answer)
    if not cited or not targets:
        return math.nan
    return sum(cited_sources_by_number.get(n) in targets for n in cited) / len(cited)


_MARKERS_RUN = rf"(?:{_MARKER.pattern}[ \t]*)*{_MARKER.pattern}"
# The lookbehinds start a match only at the beginning of a run of spaces / end punctuation: linear on "....." x 1e5.
_MARKERS_AFTER_SPACE = re.compile(rf"(?<!\s)\s+({_MARKERS_RUN})")
_MARKERS_AFTER_END = re.compile(rf"(?<![.!?\u2026\u3002\uff01\uff1f])({_SENTENCE_END.pattern}) ?({_MARKERS_RUN})")
_SLOT = re.compile("\ue000([\ue100-\uf0ff])\ue001")  # a marker's placeholder: private-use characters, no \\w


def cited_sentences(answer: str) -> list[tuple[str, list[int]]]:
    """The answer's sentences (markers removed, as `split_sentences` gives them) with the [n] numbers of each.

    A marker inside a sentence or right after its end punctuation ("... permit [1]." / "... permit. [1][2]", also
    on the next line) belongs to that sentence. Numbers are kept as written: whether passage n exists is the
    caller's question (a "[3]" without a passage 3 never maps to one).
    """
    text = _MARKERS_AFTER_SPACE.sub(lambda m: " " + m.group(1), answer or "")  # "Yes.\n[1]" -> "Yes. [1]"
    text = _MARKERS_AFTER_END.sub(lambda m: " " + m.group(2) + m.group(1), text)  # "Yes. [1]" -> "Yes [1]."
    found: list[list[int]] = []

    def slot(m: re.Match) -> str:
        found.append([int(x) for x in re.split(r"\s*[,;]\s*", m.group(1))])
        return f" \ue000{chr(0xE100 + min(len(found) - 1, 0xFFF))}\ue001 "

    text = _MARKER.sub(slot, text)
    out = []
    for sentence in split_sentences(text):
        numbers = [n for m in _SLOT.finditer(sentence) for n in found[ord(m.group(1)) - 0xE100]]
        clean = " ".join(_SLOT.sub(" ", sentence).split())
        clean = clean.replace(" .", ".").replace(" !", "!").replace(" ?", "?").replace(" ,", ",")
        out.append((clean, list(dict.fromkeys(numbers))))
    return out


def citation_scores(answer: str, passages: dict[int, str], judge: Judge) -> dict:
    """Citation precision and recall of one answer (Trust-Score / ALCE style, judged by `judge`), nan when n/a.

    precision: share of (sentence, cited n) pairs whose passage n supports the sentence (n not in `passages`, the
    prompt's passages by number, counts as unsupported); nan when nothing is cited.
    recall: share of content sentences supported by at least one passage they cite (an uncited sentence is not
    supported); nan when the answer has no content sentence.
    """
    cited = [(s, ns) for s, ns in cited_sentences(answer) if _content_ngrams(s, 1)]
    if not cited:
        return {"precision": math.nan, "recall": math.nan}
    numbers = sorted({n for _, ns in cited for n in ns if n in passages})
    column = {n: j for j, n in enumerate(numbers)}
    sentences = [s for s, ns in cited if any(n in column for n in ns)]
    row = {s: i for i, s in enumerate(dict.fromkeys(sentences))}
    support = judge.support(list(row), [passages[n] for n in numbers])
    pairs = [(s, n) for s, ns in cited for n in ns]
    ok = [n in column and bool(support[row[s], column[n]]) for s, n in pairs]
    recalled = [any(n in column and support[row[s], column[n]] for n in ns) for s, ns in cited]
    return {
        "precision": float(np.mean(ok)) if pairs else math.nan,
        "recall": float(np.mean(recalled)),
    }


# -------------------------------------------------------------------------------------------------- refusals

# High-precision phrases only: a real answer such as "you cannot build without a permit" must not match.
# English first, then Swedish; other languages: the project's own hand-over replies (is_refusal's `replies`).
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bi (?:do not|don'?t|really don'?t) know\b",
    r"\b(?:i|we)(?: cannot| can'?t| can not| am unable to|'m unable to| are unable to| am not able to|'m not able to"
    r"| am not equipped to|'m not equipped to)"
    r" (?:answer|help (?:you )?with th|find|provide|say|tell|give)",
    r"\b(?:i|we) (?:do not|don'?t) have (?:any |enough |that |this |the |sufficient |specific )?"
    r"(?:information|details|data|answer|knowledge)",
    r"\b(?:i|we) have no (?:information|details|data|answer|knowledge)",
    r"\bnot (?:in|covered (?:in|by)|mentioned in|found in|included in|part of|available in) (?:the|my|our|this)"
    r" (?:provided )?(?:context|documents?|sources?|knowledge base|faq|information)",
    r"\b(?:context|documents?|sources?|knowledge base|faq|information provided)"
    r" (?:does not|doesn'?t|do not|don'?t) (?:contain|mention|cover|say|include|provide|address)",
    r"\b(?:outside|beyond) (?:the scope of |of )?(?:my|what i) (?:knowledge|can answer|scope)",
    r"\b(?:i|we) (?:could not|couldn'?t|was unable to|were unable to) find (?:an|any|the) (?:answer|information)",
    r"\b(?:connect|transfer|put|forward|refer|pass|hand|escalat)\w*\b[^.?!]{0,40}?\b(?:to|with)"
    r" (?:a|an|one of (?:our|my)|our|my) (?:human|colleague|(?:customer[- ]service |support )?(?:agent|representative)"
    r"|person|staff member|team member|customer[- ]service|support team)",
    r"\b(?:speak|talk|chat) (?:to|with) (?:a|an|one of (?:our|my)|our|my) (?:human|colleague|person|agent|representative)",
    r"\bjag vet inte\b",
    r"\bjag (?:kan inte|kan tyvärr inte) (?:svara|hjälpa)",
    r"\b(?:har|finns) (?:ingen|inte någon|tyvärr ingen) information",
    r"\b(?:koppla|kopplar|hänvisa|hänvisar|skicka|skickar|lämna|lämnar|överlämna|prata|tala)\b[^.?!]{0,40}?"
    r"\b(?:kollega|handläggare|medarbetare|människa|kundtjänst)",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)


def is_refusal(answer: str, replies: Iterable[str] = ()) -> bool:
    """Whether the answer declines ("I don't know", "not in the context") or hands over to a human colleague.

    `replies` are the project's own hand-over texts (project.no_answer_reply / handoff_reply, in any language):
    an answer containing the first sentence of one counts as a refusal too.
    """
    text = " ".join(unicodedata.normalize("NFKC", answer or "").replace("\u2019", "'").split())
    if _REFUSAL.search(text):
        return True
    norm = normalize_text(text)
    for reply in replies:
        first = normalize_text((split_sentences(reply) or [""])[0])
        if first and first in norm:
            return True
    return False


# ------------------------------------------------------------------------------------------------- bootstrap


def _apply_stat(stat: Callable, samples: np.ndarray) -> np.ndarray:
    """Apply `stat` to every resample row: vectorised when it takes `axis` (np.mean, np.median), else per row."""
    try:
        return np.asarray(stat(samples, axis=1), dtype=np.float64)
    except TypeError:
        return np.array([stat(row) for row in samples], dtype=np.float64)


def _finite(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    return arr[~np.isnan(arr)]


def bootstrap_ci(
    values: Iterable[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stat: Callable = np.mean,
) -> tuple[float, float, float]:
    """Percentile-bootstrap (point, low, high) of `stat` over the non-nan values; (nan, nan, nan) when empty.

    nans mean "not applicable" (e.g. citation precision of an answer without citations), so they are dropped
    rather than counted as zero. All resamples are drawn in one array, so 1000 x 100 takes about a millisecond.
    """
    arr = _finite(values)
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    boot = _apply_stat(stat, arr[rng.integers(0, arr.size, size=(n_resamples, arr.size))])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return (float(stat(arr)), float(low), float(high))


def paired_bootstrap_diff(
    a: Iterable[float],
    b: Iterable[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stat: Callable = np.mean,
) -> tuple[float, float, float]:
    """(stat(a) - stat(b), low, high) resampling questions jointly, for two arms scored on the same questions.

    Pairing removes the between-question variance that two independent CIs would double count. Pairs where
    either side is nan are dropped.
    """
    a_arr, b_arr = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired arms must score the same questions, got {a_arr.size} vs {b_arr.size} values")
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    if a_arr.size == 0:
        return (math.nan, math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, a_arr.size, size=(n_resamples, a_arr.size))
    boot = _apply_stat(stat, a_arr[idx]) - _apply_stat(stat, b_arr[idx])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return (float(stat(a_arr) - stat(b_arr)), float(low), float(high))


# ------------------------------------------------------------------------------------------------ trust score
# Trust-Score (Song et al., ICLR 2025): grounded refusals, answer correctness and grounded citations, each scored
# over a mix of answerable and unanswerable questions, averaged into one number.


def _f1(positive: np.ndarray, predicted: np.ndarray) -> float:
    tp = int((positive & predicted).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / int(predicted.sum()), tp / int(positive.sum())
    return 2 * precision * recall / (precision + recall)


def grounded_refusal_f1(answerable: Sequence[bool], refused: Sequence[bool]) -> float:
    """Macro F1 of the answer-or-refuse decision (Trust-Score's F1_GR): the mean of the F1 of the "refuse" class
    (positives: unanswerable items) and the F1 of the "answer" class (positives: answerable items). nan unless
    both kinds of item are present; a class never predicted has F1 0."""
    a, r = np.asarray(answerable, dtype=bool), np.asarray(refused, dtype=bool)
    if a.shape != r.shape:
        raise ValueError(f"answerable and refused must pair up item by item, got {a.size} vs {r.size}")
    if a.all() or not a.any():
        return math.nan
    return (_f1(~a, r) + _f1(a, ~r)) / 2


def citation_f1(precision: float, recall: float) -> float:
    """Harmonic mean of citation precision and recall; an arm that never cites (precision n/a) scores 0, and
    nan only when there was nothing to cite (recall n/a)."""
    if math.isnan(recall):
        return math.nan
    if math.isnan(precision) or precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _mean_or_nan(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def trust_components(
    answerable: Sequence[bool],
    refused: Sequence[bool],
    correctness: Sequence[float],
    citation_precision: Sequence[float],
    citation_recall: Sequence[float],
) -> dict[str, float]:
    """Trust-Score's parts over items (one entry each; nan where a value does not apply):
    grounded_refusal_f1; answer_correctness, the mean `correctness` (token F1) of the answerable items answered
    (0 when none was answered); citation_f1 from the mean citation precision and recall of those answers (an
    answer without a checkable sentence counts as recall 0);
    trust_score, their mean (nan when a part is)."""
    a, r = np.asarray(answerable, dtype=bool), np.asarray(refused, dtype=bool)
    answered = a & ~r
    c, p, rec = (np.asarray(x, dtype=np.float64) for x in (correctness, citation_precision, citation_recall))
    if not a.any():
        correct = cp = cr = math.nan
    elif not answered.any():  # refusing every answerable question earns no correctness and no citations
        correct, cp, cr = 0.0, math.nan, 0.0
    else:
        # an answer with no checkable sentence (recall n/a, e.g. an empty one) supported nothing by citing: 0
        correct, cp = _mean_or_nan(c[answered]), _mean_or_nan(p[answered])
        cr = float(np.nan_to_num(rec[answered], nan=0.0).mean())
    parts = {
        "grounded_refusal_f1": grounded_refusal_f1(a, r),
        "answer_correctness": correct,
        "citation_f1": citation_f1(cp, cr),
    }
    values = list(parts.values())
    parts["trust_score"] = math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))
    return parts


def bootstrap_items(
    n_items: int,
    stat: Callable[[np.ndarray], dict[str, float]],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """{name: {"mean", "low", "high", "n"}} of a statistic of a whole set of items (an F1, a ratio of means):
    `stat(indices)` is computed on the items and on `n_resamples` resamples of them (items drawn with
    replacement); resamples where a value is nan (e.g. no unanswerable item drawn) are left out of its interval."""
    point = stat(np.arange(n_items))
    out = {k: {"mean": float(v), "low": math.nan, "high": math.nan, "n": n_items} for k, v in point.items()}
    if n_items == 0:
        return out
    rng = np.random.default_rng(seed)
    boots = [stat(idx) for idx in rng.integers(0, n_items, size=(n_resamples, n_items))]
    alpha = (1 - confidence) / 2
    for k in point:
        vals = _finite([b[k] for b in boots])
        if vals.size and not math.isnan(point[k]):
            out[k]["low"], out[k]["high"] = (float(v) for v in np.quantile(vals, [alpha, 1 - alpha]))
    return out


def trust_metrics(items: Sequence[dict], **bootstrap_kwargs) -> dict[str, dict]:
    """`trust_components` with bootstrap CIs over items {"answerable", "refused", "correctness",
    "citation_precision", "citation_recall"} (missing values: nan)."""
    cols = {
        k: np.array([float(nan_if_none(it.get(k))) for it in items], dtype=np.float64)
        for k in ("correctness", "citation_precision", "citation_recall")
    }
    a = np.array([bool(it["answerable"]) for it in items], dtype=bool)
    r = np.array([bool(it["refused"]) for it in items], dtype=bool)

    def stat(idx: np.ndarray) -> dict[str, float]:
        return trust_components(
            a[idx], r[idx], cols["correctness"][idx], cols["citation_precision"][idx], cols["citation_recall"][idx]
        )

    return bootstrap_items(len(items), stat, **bootstrap_kwargs)


def nan_if_none(x) -> float:
    return math.nan if x is None else float(x)


def summarize(per_question: Sequence[dict], metric_names: Iterable[str], **bootstrap_kwargs) -> dict[str, dict]:
    """{metric: {"mean", "low", "high", "n"}} over per-question rows; n counts the non-nan values.

    A row holds a metric at top level or under "scores" (the shape of an answer record); missing means nan.
    """
    out: dict[str, dict] = {}
    for name in metric_names:
        vals = [row.get(name, row.get("scores", {}).get(name, math.nan)) for row in per_question]
        vals = [math.nan if v is None else float(v) for v in vals]
        mean, low, high = bootstrap_ci(vals, **bootstrap_kwargs)
        out[name] = {"mean": mean, "low": low, "high": high, "n": int(_finite(vals).size)}
    return out
