"""`raglora eval`: what does retrieval buy, what does each fine-tuning stage buy, and what do both buy together?

Arms (rows of every table): `base`, `rag`, `lora-<stage>` and `rag+lora-<stage>` for each trained stage, in the
order of the trained manifests' parent chain, and `oracle` (the deepest stage given the question's gold passages
from the index as its only context: the upper bound for generation).

Test sets come from `eval.sets` (`pipeline.config.resolve_eval_sets`), each of one kind:
  - `kb`: answerable from the documents: answer quality, false refusals, citations, and with retrieval
    groundedness and hit@k against the gold passages (`retriever.gold.GoldFinder`; no gold -> n/a, never 0);
  - `gold_removed`: held-out Q/A rows asked with every gold chunk (by source/id and by content) removed from
    retrieval: the passages look relevant but hold no answer, so the right reply is a hand-over (RAG arms only);
  - `near_domain`: a file of in-domain-sounding questions that no document answers: the right reply is a hand-over;
  - `out_of_kb` (off topic): the right reply is a hand-over; a file set whose rows have no answers is one;
  - `general`: general conversation without documents: closed-book arms only, to measure forgetting.

Per arm, as in Trust-Score (Song et al., ICLR 2025): grounded-refusal F1 over answerable + unanswerable items,
answer correctness (token F1) on the answerable items the arm answered, citation precision/recall/F1 judged by
the calibrated groundedness judge (`pipeline.metrics.Judge`), and their mean, the trust score. RAG answers are
scored as serving shows them (`AnswerService.verify`: verified citations, hand-over when the policy says so);
the model's own raw markers are scored too, as `model_citation_*`.

The report shows each stage's paired gain over its parent on the stage's own held-out set (closed book and with
retrieval) and forgetting measured on answers (token F1 on every `general` set) beside the validation-loss figure
of the stage manifests.

Generation is batched through the serving `Generator` (left padding, KV cache, greedy), with prompts sorted by
length so a batch wastes little on padding. Every metric gets a 95% bootstrap interval (pipeline.metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import metrics as M
from pipeline.config import EvalConfig, EvalSet, resolve_eval_sets
from pipeline.routing import LORA_MODES, RAG_MODES
from pipeline.sources import detect_fields, read_records
from raglora.errors import RagloraError
from raglora.files import read_jsonl
from retriever.evaluate import hit_ks, retrieval_hits

KIND_DESCRIPTIONS = {
    "kb": "answerable from the knowledge base",
    "gold_removed": "asked with their gold passages removed from retrieval: the passages look relevant but hold no "
    "answer, so the right reply is a hand-over (refusal rate; retrieval arms only)",
    "near_domain": "questions a customer could ask that no document answers: the right reply is a hand-over "
    "(refusal rate)",
    "out_of_kb": "off topic, outside the knowledge base: the right reply is a hand-over (refusal rate)",
    "general": "general conversation without documents: closed-book arms only, measures forgetting",
}
#: The headline refusal-rate metric of each unanswerable kind ("out_of_kb" reads "off topic" in the report).
REFUSAL_METRIC = {
    "gold_removed": "refusal_gold_removed",
    "near_domain": "refusal_near_domain",
    "out_of_kb": "refusal_off_topic",
}
HARD_UNANSWERABLE = ("gold_removed", "near_domain")  # in-domain-sounding: pooled as refusal_in_domain_unanswerable
QUALITY = ("token_f1", "rouge_l", "semantic_similarity")
CITATION = ("citation_rate", "citation_precision", "citation_recall")
MODEL_CITATION = ("model_citation_rate", "model_citation_precision", "model_citation_recall")
GAIN_METRIC = "token_f1"
KNOWN_ARMS = ("base", "rag", "lora", "rag+lora", "oracle")


# -- data ---------------------------------------------------------------------------------------------------


@dataclass
class TestSet:
    """One loaded evaluation set: rows {id, question, history, reference, source, gold} scored as `kind`."""

    name: str
    kind: str
    path: str
    rows: list[dict]
    held_out_of: str | None = None  # the stage whose held-out split this is (held_out:/gold_removed:<stage>)
    notes: list[str] = field(default_factory=list)
    limit: int | None = None  # gold_removed: applied once rows without gold are dropped (`assign_gold`)


def map_columns(records: list[dict]) -> list[dict]:
    """A user's eval file may name its columns as its Q/A file does ("Subject", "Resolution", ...): rows without
    `question`/`messages` get question/answer/id/source from the same column detection `raglora data` uses."""
    if not records or any("question" in r or "messages" in r for r in records[:50]):
        return records
    fields = detect_fields(list(dict.fromkeys(k for r in records[:200] for k in r)), {})
    return [{**r, **{role: r.get(col) for role, col in fields.items() if col}} for r in records]


def parse_row(row: dict) -> dict:
    """{id, question, history, reference, source} of a test row.

    Single-turn rows carry `question`/`answer`. A conversation (`messages`) is asked at its last user turn before
    the final assistant turn, with the earlier turns as history; that assistant turn is the reference.
    """
    question, reference, history = row.get("question"), row.get("answer"), []
    if not question and isinstance(row.get("messages"), list):
        turns = [m for m in row["messages"] if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
        last_answer = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
        before = turns if last_answer is None else turns[:last_answer]
        last_user = max((i for i, m in enumerate(before) if m["role"] == "user"), default=None)
        if last_user is not None:
            question = before[last_user].get("content")
            history = [{"role": m["role"], "content": str(m.get("content") or "")} for m in before[:last_user]]
            reference = turns[last_answer].get("content") if last_answer is not None else None
    question = str(question).strip() if question else None
    reference = str(reference).strip() if reference is not None and str(reference).strip() else None
    row_id = row.get("id")
    if row_id is None or not str(row_id).strip():
        row_id = "q-" + hashlib.sha256((question or "").encode("utf-8")).hexdigest()[:12]
    source = row.get("source")
    return {
        "id": str(row_id),
        "question": question,
        "history": history,
        "reference": reference,
        "source": str(source) if source else None,
    }


def check_near_domain_rows(records: list[dict], path: Path, name: str) -> None:
    """A near-domain file holds questions only: a row without a question, with an answer, or with an id an
    earlier row has is an error naming the row (its line in a JSONL file)."""
    numbers = [n for n, _ in read_jsonl(path)] if path.suffix.lower() == ".jsonl" else range(1, len(records) + 1)
    where = "line" if path.suffix.lower() == ".jsonl" else "row"
    seen: dict[str, int] = {}
    for n, r in zip(numbers, records, strict=True):
        at = f"eval set {name!r}: {path} {where} {n}"
        question = r.get("question")
        if not isinstance(question, str) or not question.strip():
            got = "missing" if question is None else f"{type(question).__name__} {str(question)[:40]!r}"
            raise RagloraError(f'{at}: a near-domain row needs a non-empty text "question" (got {got})')
        answer = r.get("answer")
        if answer is not None and str(answer).strip():
            raise RagloraError(
                f"{at}: has an answer, but near-domain questions are ones no document answers "
                "(put answerable questions in a set of kind kb)"
            )
        row_id = r.get("id")
        if row_id is not None and str(row_id).strip():
            if str(row_id) in seen:
                raise RagloraError(f"{at}: id {str(row_id)!r} repeats {where} {seen[str(row_id)]}")
            seen[str(row_id)] = n


def load_test_set(spec: EvalSet, *, held_out_of: str | None = None) -> TestSet:
    """Read and parse one resolved set, capped at its limit; a kb/general set whose rows have no answers is
    out_of_kb. A near-domain file is checked row by row; a gold_removed set keeps every row until `assign_gold`
    knows which have gold."""
    path = Path(spec.path)
    fix = "run `raglora data`" + (f" (or fix eval.sets.{spec.name})" if held_out_of is None else "")
    if not path.is_file():
        raise RagloraError(f"eval set {spec.name!r}: {path} is missing: {fix}")
    records = map_columns(read_records(path) if path.read_bytes().strip() else [])
    if spec.kind == "near_domain":
        check_near_domain_rows(records, path, spec.name)
    rows = [r for r in (parse_row(r) for r in records) if r["question"]]
    if not rows:
        raise RagloraError(f"eval set {spec.name!r}: {path} has no questions: {fix}")
    kind, notes = spec.kind, []
    if kind in ("kb", "general") and not any(r["reference"] for r in rows):
        kind = "out_of_kb"
        notes.append(f"{spec.name}: no row of {path.name} has an answer, so it is scored as out_of_kb (refusals)")
    if kind in ("out_of_kb", "near_domain"):
        for r in rows:
            r["reference"] = None
    elif kind != "gold_removed":  # gold_removed keeps rows without an answer: their id or source may name gold
        missing = [r["id"] for r in rows if r["reference"] is None]
        if missing:
            notes.append(f"{spec.name}: {len(missing)} row(s) without an answer skipped (e.g. {missing[0]})")
        rows = [r for r in rows if r["reference"] is not None]
    if kind == "gold_removed":
        return TestSet(spec.name, kind, str(path), rows, held_out_of, notes, limit=spec.limit)
    return TestSet(spec.name, kind, str(path), rows[: spec.limit], held_out_of, notes)


def load_test_sets(cfg, limit: int | None = None) -> list[TestSet]:
    """Every set of `eval.sets`, each capped at its limit (and at `limit`, the CLI's --limit)."""
    specs = resolve_eval_sets(cfg, limit)
    if not specs:
        raise RagloraError("no evaluation sets: add eval.sets to the config (or finetune.stages, then `raglora data`)")
    return [load_test_set(s, held_out_of=s.stage) for s in specs]


def assign_gold(sets: list[TestSet], index) -> None:
    """Gold chunk ids of every kb row (empty: no defined gold, so its retrieval metrics read n/a) and of every
    gold_removed row: there every chunk found by source/id AND by content, so that near-duplicate answers elsewhere
    in the knowledge base are removed too. gold_removed rows without any gold are dropped (with a note), then the
    set is capped at its limit."""
    from retriever.gold import GoldFinder

    finder = GoldFinder(index.chunks) if index is not None else None
    for ts in sets:
        for r in ts.rows:
            row = {"id": r["id"], "source": r["source"], "answer": r["reference"]}
            if finder is None or ts.kind not in ("kb", "gold_removed"):
                r["gold"] = []
            elif ts.kind == "kb":
                r["gold"] = finder.find(row)
            else:
                r["gold"] = finder.all_gold(row)
        if ts.kind == "gold_removed":
            kept = [r for r in ts.rows if r["gold"]]
            if len(kept) < len(ts.rows):
                why = "there is no index" if finder is None else "no chunk matches their id, source or answer"
                ts.notes.append(
                    f"{ts.name}: {len(ts.rows) - len(kept)} of {len(ts.rows)} row(s) dropped: no gold passage to "
                    f"remove ({why})"
                )
            ts.rows = kept[: ts.limit]


# -- arms ---------------------------------------------------------------------------------------------------


def plan_arms(
    requested: list[str],
    stages: list[str],
    *,
    has_index: bool,
    oracle_ok: bool | None = None,
    deepest: str | None = None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Expand arm names into {name: {mode, stage, oracle}} plus {name: reason} for the arms that cannot run.

    `deepest` (default: the last of `stages`) is the stage the oracle arm uses: the end of the longest chain."""
    oracle_ok = has_index if oracle_ok is None else oracle_ok
    deepest = deepest or (stages[-1] if stages else None)
    arms: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    no_index = "no index: run `raglora index`"
    no_adapters = "no trained stage adapters: run `raglora finetune`"
    for arm in requested:
        if arm in ("base", "rag"):
            if arm == "rag" and not has_index:
                skipped[arm] = no_index
            else:
                arms[arm] = {"mode": arm, "stage": None, "oracle": False}
        elif arm in LORA_MODES:
            if not stages:
                skipped[arm] = no_adapters
            for stage in stages:
                if arm == "rag+lora" and not has_index:
                    skipped[f"{arm}-{stage}"] = no_index
                else:
                    arms[f"{arm}-{stage}"] = {"mode": arm, "stage": stage, "oracle": False}
        elif arm == "oracle":
            if not oracle_ok:
                skipped[arm] = "needs the index (the gold passages come from it): run `raglora index`"
            else:
                # Deepest stage when there is one: the best generator we have, given perfect retrieval.
                arms[arm] = {"mode": "rag+lora" if stages else "rag", "stage": deepest}
                arms[arm]["oracle"] = True
        else:
            raise RagloraError(f"eval.arms: unknown arm {arm!r} (known: {', '.join(KNOWN_ARMS)})")
    return arms, skipped


def arm_kinds(arm: dict) -> tuple[str, ...]:
    """Which kinds of set an arm answers: general sets have no documents, so only closed-book arms take them;
    gold_removed needs retrieval to remove from, so only retrieval arms take it; the oracle answers kb only."""
    if arm["oracle"]:
        return ("kb",)
    if arm["mode"] in ("base", "lora"):
        return ("kb", "near_domain", "out_of_kb", "general")
    return ("kb", "gold_removed", "near_domain", "out_of_kb")


# -- generation -----------------------------------------------------------------------------------------------


def answer_all(
    service, arm: dict, questions: list[dict], params, *, k: int, desc: str, remove_gold: bool = False
) -> tuple[list[dict], float]:
    """Prepare every prompt, generate them in length-sorted batches, and check each RAG answer as serving does.

    `remove_gold`: retrieve without the question's gold chunks (a gold_removed set). A RAG answer is shown as
    `service.verify` returns it (verified markers; the citation policy's hand-over counts as a hand-over); the
    model's own text stays in `raw_answer`. Returns (one record per question, wall seconds of the generation).
    """
    from pipeline.answer import Prepared

    chunks = {c.chunk_id: c for c in service.index.chunks} if service.index is not None else {}
    prepared: list[Prepared] = []
    for q in questions:
        if arm["oracle"]:
            gold = [chunks[c] for c in q["gold"] if c in chunks][:k]
            gold_ctx = [{"text": c.text, "title": c.title, "source": c.source, "chunk_id": c.chunk_id} for c in gold]
            messages, ids, dropped, used = service.build_prompt(
                q["question"], gold_ctx, list(q["history"]), service.rag_system_prompt, params.max_new_tokens
            )
            citations = [{**c, "n": n, "score": 1.0} for n, c in enumerate(used or [], start=1)]
            prepared.append(
                Prepared(
                    mode=arm["mode"],
                    stage=arm["stage"],
                    question=q["question"],
                    messages=messages,
                    prompt_ids=ids,
                    citations=citations,
                    retrieval_query=None,
                    handoff_reason=None,
                    dropped_history=dropped,
                    retrieval_ms=0.0,
                )
            )
        else:
            prepared.append(
                service.prepare(
                    q["question"],
                    list(q["history"]),
                    mode=arm["mode"],
                    stage=arm["stage"],
                    max_new_tokens=params.max_new_tokens,
                    exclude_chunks=q["gold"] if remove_gold else (),
                )
            )
    rag = arm["mode"] in RAG_MODES
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].prompt_ids))
    t0 = time.perf_counter()
    handles = {}
    for i in order:
        if prepared[i].handoff_reason is None:
            handles[i] = service.generator.submit(prepared[i].prompt_ids, stage=arm["stage"], params=params)
    results = {i: h.result() for i, h in handles.items()}
    seconds = time.perf_counter() - t0 if handles else 0.0
    records = []
    for i, q in enumerate(tqdm(questions, desc=desc, unit="q", leave=False)):
        p = prepared[i]
        record = {
            "id": q["id"],
            "question": q["question"],
            "reference": q["reference"],
            "gold": q.get("gold") or [],
            "gold_removed": bool(remove_gold),
            "prompt": service.tokenizer.decode(p.prompt_ids),
            "contexts": [
                c.get("text") or (chunks[c["chunk_id"]].text if c.get("chunk_id") in chunks else "")
                for c in p.citations
            ],
            "citations": p.citations,  # the prompt's passages, [n] = n-th
            "handoff": p.handoff_reason is not None,
            "handoff_reason": p.handoff_reason,
            "completion_tokens": results[i].completion_tokens if i in results else 0,
        }
        if i not in results:
            record.update(answer=p.handoff_text or "", raw_answer=None, shown_citations=[])
        else:
            raw = results[i].text.strip()
            record.update(answer=raw, raw_answer=raw, shown_citations=[])
            if rag:
                v = service.verify(p, raw)
                record.update(
                    answer=v.text,
                    shown_citations=v.citations,
                    unsupported=v.unsupported,
                    rejected_citations=v.rejected,
                    supported_share=v.supported_share,
                )
                if v.handover:
                    record.update(
                        answer=service.no_answer_reply,
                        shown_citations=[],
                        handoff=True,
                        handoff_reason=f"citation policy {service.citation_policy!r}: "
                        f"{len(v.unsupported)} unsupported sentence(s)",
                    )
        records.append(record)
    return records, seconds


# -- scoring ------------------------------------------------------------------------------------------------


def score_records(
    records: list[dict],
    kind: str,
    *,
    rag: bool,
    embed,
    judge: M.Judge,
    ks: tuple[int, ...] = (1, 3),
    refusal_replies: tuple[str, ...] = (),
) -> None:
    """Add `scores` to every record in place (one value per metric; nan where it does not apply).

    An answer refuses when it was handed over, reads as a refusal, or contains one of `refusal_replies` (the
    project's own texts). Answer quality and citations are scored on the answerable questions the arm answered.
    Citations count only markers of the prompt's passages (a closed-book answer has none: it cannot cite);
    `model_citation_*` score the model's raw text, the plain names what was shown. hit@k, MRR and
    citation_gold_precision are nan for a question without a defined gold passage.
    """
    answerable = kind in ("kb", "general")
    refused_of = {id(r): bool(r["handoff"] or M.is_refusal(r["answer"], refusal_replies)) for r in records}
    answered = [r for r in records if answerable and r["reference"] is not None and not refused_of[id(r)]]
    if answered and embed is not None:
        sims = M.semantic_similarity(
            embed([r["answer"] or " " for r in answered]), embed([r["reference"] for r in answered])
        )
    else:
        sims = [math.nan] * len(answered)
    sim_of = {id(r): float(x) for r, x in zip(answered, sims, strict=True)}
    for r in records:
        refused = refused_of[id(r)]
        s: dict[str, float] = {}
        if not answerable:
            s["refusal_rate"] = float(refused)
        if answerable and r["reference"] is not None:
            s["token_f1"] = math.nan if refused else M.token_f1(r["answer"], r["reference"])
            s["rouge_l"] = math.nan if refused else M.rouge_l(r["answer"], r["reference"])
            s["semantic_similarity"] = sim_of.get(id(r), math.nan)
        if kind == "kb":
            s["false_refusal_rate"] = float(refused)
            passages = {c["n"]: str(c.get("text") or ctx) for c, ctx in zip(r["citations"], r["contexts"], strict=True)}
            shown = _citation_scores(r["answer"], passages, judge, refused)
            s.update({f"citation_{m}": v for m, v in shown.items()})
            if rag:
                raw = r.get("raw_answer") if r.get("raw_answer") is not None else r["answer"]
                s.update({f"model_citation_{m}": v for m, v in _citation_scores(raw, passages, judge, refused).items()})
                s["groundedness"] = (
                    math.nan
                    if refused
                    else M.groundedness(r["answer"], r["contexts"], embed=judge.embed, threshold=judge.threshold)
                )
                by_number = {c["n"]: c.get("chunk_id") for c in r["citations"]}
                s["citation_gold_precision"] = M.citation_precision(r["answer"], by_number, r["gold"])
                s.update(retrieval_hits([c.get("chunk_id") for c in r["citations"]], r["gold"], ks=ks))
        r["refused"] = refused
        r["scores"] = s


def _citation_scores(answer: str, passages: dict[int, str], judge: M.Judge, refused: bool) -> dict[str, float]:
    """rate / precision / recall of one answer's citations of the prompt's passages (all nan for a refusal)."""
    if refused:
        return {"rate": math.nan, "precision": math.nan, "recall": math.nan}
    cited = {n for _, ns in M.cited_sentences(answer) for n in ns}
    return {"rate": float(bool(cited & set(passages))), **M.citation_scores(answer, passages, judge)}


def rag_metrics(ks: tuple[int, ...]) -> tuple[str, ...]:
    return (*MODEL_CITATION, "groundedness", "citation_gold_precision", *(f"hit@{k}" for k in ks), "mrr")


def cached_embed(embed):
    """`embed` with a per-text cache: the same passages and answers are judged for many arms."""
    cache: dict[str, np.ndarray] = {}

    def cached(texts):
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            cache.update(zip(missing, np.asarray(embed(missing)), strict=True))
        return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, 0))

    return cached


#: The citation-policy settings the trade-off table shows: hand over when more than this share of an answer's
#: sentences is unsupported (0.0: any unsupported sentence), None = keep (never hand over for it).
POLICY_SHARES = (0.0, 0.25, 0.5, 0.75, None)


def citation_policy_tradeoff(records: list[dict], kind_of: dict[str, str], replies: tuple[str, ...]) -> list[dict]:
    """Hand-over rates per kind of question under other `serve.citations` settings, from the same answers (each
    generated answer's supported share was measured once), so a project can pick its setting without rerunning.

    Hand-overs before generation (gate, asked for a person) and answers the model wrote as a hand-over stay
    hand-overs under every setting."""
    rows = []
    for share in POLICY_SHARES:
        by_kind: dict[str, list[float]] = {}
        for r in records:
            kind = "answerable" if kind_of[r["test_set"]] == "kb" else kind_of[r["test_set"]]
            raw = r.get("raw_answer")
            if raw is None or M.is_refusal(raw, replies):
                refused = bool(r["handoff"] or M.is_refusal(r["answer"], replies))
            else:
                supported = r.get("supported_share", math.nan)
                refused = share is not None and not math.isnan(supported) and 1 - supported > share
            by_kind.setdefault(kind, []).append(float(refused))
        row = {"policy": "keep" if share is None else f"handover > {share:.0%} unsupported"}
        row.update({k: float(np.mean(v)) for k, v in by_kind.items()})
        unanswerable = [x for k in ("gold_removed", "near_domain") for x in by_kind.get(k, [])]
        if unanswerable:
            row["gold_removed+near_domain"] = float(np.mean(unanswerable))
        rows.append(row)
    return rows


def arm_metrics(records: list[dict], kind_of: dict[str, str], *, rag: bool, ks: tuple[int, ...], n: int) -> dict:
    """The headline metrics of one arm (95% CIs): trust score and its parts over answerable (kb) + unanswerable
    items, answer quality, citations and refusals on the kb sets, the refusal rate of each unanswerable kind."""
    kb = [r for r in records if kind_of[r["test_set"]] == "kb"]
    unanswerable = [r for r in records if kind_of[r["test_set"]] in REFUSAL_METRIC]
    out: dict[str, dict] = {}
    if kb or unanswerable:
        items = [
            {
                "answerable": kind_of[r["test_set"]] == "kb",
                "refused": r["refused"],
                "correctness": r["scores"].get("token_f1"),
                "citation_precision": r["scores"].get("citation_precision"),
                "citation_recall": r["scores"].get("citation_recall"),
            }
            for r in kb + unanswerable
        ]
        trust = M.trust_metrics(items, n_resamples=n)
        out.update({k: trust[k] for k in ("trust_score", "grounded_refusal_f1", "citation_f1")})
        if rag:
            for it, r in zip(items, kb + unanswerable, strict=True):
                it["citation_precision"] = r["scores"].get("model_citation_precision")
                it["citation_recall"] = r["scores"].get("model_citation_recall")
            out["model_citation_f1"] = M.trust_metrics(items, n_resamples=n)["citation_f1"]
    if kb:
        names = [*QUALITY, "false_refusal_rate", *CITATION, *(rag_metrics(ks) if rag else ())]
        out.update(M.summarize(kb, names, n_resamples=n))
    for kind, metric in REFUSAL_METRIC.items():
        rows = [r for r in records if kind_of[r["test_set"]] == kind]
        if rows:
            out[metric] = M.summarize(rows, ["refusal_rate"], n_resamples=n)["refusal_rate"]
    hard = [r for r in records if kind_of[r["test_set"]] in HARD_UNANSWERABLE]
    if hard:
        out["refusal_in_domain_unanswerable"] = M.summarize(hard, ["refusal_rate"], n_resamples=n)["refusal_rate"]
    return out


# -- the run ------------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _stage_summaries(adapters_dir: str | Path, stages: list[str]) -> dict:
    from finetune.model import read_manifest, stage_dir

    out = {}
    for stage in stages:
        m = read_manifest(adapters_dir, stage)
        metrics = dict(m.get("metrics", {}))
        log = stage_dir(adapters_dir, stage) / "train_log.jsonl"
        curve = []
        if log.is_file():
            for line in log.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                if "loss" in row and "step" in row:
                    curve.append([row["step"], row["loss"]])
        if isinstance(metrics.get("validation_loss"), dict) and "val_loss" not in metrics:
            metrics["val_loss"] = metrics["validation_loss"].get(stage)
        out[stage] = {
            "train_loss_curve": curve,
            "raft": bool((m.get("stage_config") or {}).get("raft", False)),
            "parents": list(m.get("parents") or []),
            **metrics,
        }
    return out


def stage_parents(service, stages: list[str]) -> dict[str, str | None]:
    """{stage: the stage it was trained after (the last of its parents, or the stage its adapter was initialised
    from with continue_previous_adapter), None = the base model}."""
    infos = getattr(service.models, "stages", {}) or {}
    out = {}
    for stage in stages:
        after = tuple(getattr(infos.get(stage), "after", ()) or ())
        out[stage] = after[-1] if after else None
    return out


def measure_speedup(service, questions: list[dict], params, *, desc: str = "speed-up") -> dict:
    """The same prompts answered one at a time and as one batch: outputs must match; returns timings."""
    ids = [
        service.prepare(q["question"], [], mode="base", max_new_tokens=params.max_new_tokens).prompt_ids
        for q in questions
    ]
    t0 = time.perf_counter()
    single = [service.generator.submit(p, params=params).result().text for p in tqdm(ids, desc=desc, leave=False)]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    handles = [service.generator.submit(p, params=params) for p in ids]
    batched = [h.result().text for h in handles]
    t_batched = time.perf_counter() - t0
    return {
        "questions": len(ids),
        "one_at_a_time_s": round(t_single, 3),
        "batched_s": round(t_batched, 3),
        "speedup": round(t_single / t_batched, 2) if t_batched > 0 else None,
        "seconds_per_answer_alone": round(t_single / len(ids), 3) if ids else None,  # one answer's own latency
        "identical_outputs": single == batched,
    }


def _retrieval_k(service, cfg) -> int:
    rc = getattr(service, "retrieval", None)
    k = rc.get("k") if isinstance(rc, dict) else getattr(rc, "k", None)
    return int(k or cfg.retrieval.k)


def _retrieval_mode(service, cfg) -> str:
    rc = getattr(service, "retrieval", None)
    mode = rc.get("mode") if isinstance(rc, dict) else getattr(rc, "mode", None)
    return str(mode or cfg.retrieval.mode)


def run_evaluation(cfg, *, out_dir: str | Path | None = None, service=None, limit: int | None = None) -> Path:
    """Run every arm on every applicable test set and write reports/<run>/ (results.json, report.md/.html).

    `limit` caps every test set (the CLI's --limit, for smoke runs).
    """
    from pipeline.answer import build_service
    from pipeline.api.settings import ServeConfig
    from pipeline.generate import SamplingParams
    from pipeline.report import write_report

    ec: EvalConfig = cfg.eval
    sets = load_test_sets(cfg, limit)
    if service is None:
        serve = ServeConfig(
            **{**cfg.serve.model_dump(), "batching": True, "max_batch_size": ec.batch_size, "batch_wait_ms": 50}
        )
        service = build_service(cfg, serve=serve, with_store=False)
    has_index = service.index is not None
    assign_gold(sets, service.index)
    notes = [n for ts in sets for n in ts.notes]
    for ts in sets:
        if ts.kind == "kb" and has_index:
            missing = sum(1 for r in ts.rows if not r["gold"])
            if missing:
                notes.append(
                    f"{ts.name}: {missing} of {len(ts.rows)} question(s) have no gold passage in the index (neither a "
                    "matching source nor enough answer overlap): hit@k, MRR and citation precision leave them out"
                )
    trained = service.models.stage_names  # chain order (parents first), from the manifests
    stages = [s for s in trained if ec.stages is None or s in ec.stages]
    for s in ec.stages or []:
        if s not in trained:
            notes.append(f"stage {s!r} has no trained adapter under {cfg.paths.adapters_dir}: run `raglora finetune`")
    parents = stage_parents(service, stages)
    deepest = service.models.deepest_stage if service.models.deepest_stage in stages else None
    arms, skipped = plan_arms(ec.arms, stages, has_index=has_index, deepest=deepest)
    embedder = service.index.embedder if has_index else None
    if embedder is None:
        from retriever.embedder import load_embedder

        embedder = load_embedder(cfg.index.embedder)

    embed = cached_embed(lambda texts: embedder.encode(list(texts), batch_size=64))
    k = _retrieval_k(service, cfg)
    ks = hit_ks(k)
    # One judge verifies what serving shows and scores it: serving's own when it has one (same embedder), with the
    # calibration build_service computed or cached for it (calibrated here only when the service has none).
    served = service.judge
    texts = [c.text for c in service.index.chunks] if has_index else []
    if served is not None and served.embed is not None:
        judge = dataclasses.replace(served, embed=cached_embed(served.embed))
        calibration = dict(getattr(service, "judge_calibration", None) or {}) or M.calibrate_judge(
            texts, embed, cfg.serve.judge_calibration_pairs
        )
        if not math.isclose(judge.threshold, calibration["threshold"], abs_tol=1e-9):
            notes.append(
                f"the citation judge is serving's (threshold {judge.threshold:.3f}), not this run's calibration "
                f"({calibration['threshold']:.3f}), so that evaluation scores what serving shows"
            )
            calibration["threshold_used"] = judge.threshold
    else:
        calibration = M.calibrate_judge(texts, embed, ec.calibration_pairs)
        judge = M.Judge(embed=embed, threshold=float(calibration.get("threshold", 0.6)))
    service.judge = judge
    params = SamplingParams(max_new_tokens=ec.max_new_tokens)
    replies = (cfg.project.no_answer_reply, cfg.project.handoff_reply)
    kind_of = {ts.name: ts.kind for ts in sets}
    kb_sets = {ts.name for ts in sets if ts.kind == "kb"}
    results_arms: dict[str, dict] = {name: {"skipped": why} for name, why in skipped.items()}
    t_start = time.perf_counter()
    for name, arm in arms.items():
        rag = arm["mode"] in RAG_MODES
        records: list[dict] = []
        gen_s = 0.0
        t0 = time.perf_counter()
        for ts in sets:
            if ts.kind not in arm_kinds(arm):
                continue
            rows = [r for r in ts.rows if r["gold"]] if arm["oracle"] else ts.rows
            if not rows:
                continue
            recs, seconds = answer_all(
                service, arm, rows, params, k=k, desc=f"{name}/{ts.name}", remove_gold=ts.kind == "gold_removed"
            )
            gen_s += seconds
            for r in recs:
                r["test_set"] = ts.name
            score_records(recs, ts.kind, rag=rag, embed=embed, judge=judge, ks=ks, refusal_replies=replies)
            records += recs
        if not records:
            results_arms[name] = {"skipped": "no test set applies to this arm"}
            continue
        by_set = {}
        for test_set in dict.fromkeys(r["test_set"] for r in records):
            rows = [r for r in records if r["test_set"] == test_set]
            names = sorted({m for r in rows for m in r["scores"]})
            by_set[test_set] = M.summarize(rows, names, n_resamples=ec.bootstrap_resamples)
        generated = sum(1 for r in records if r["raw_answer"] is not None)
        tokens = sum(r["completion_tokens"] for r in records)
        results_arms[name] = {
            "description": _describe(name, arm),
            "metrics": arm_metrics(records, kind_of, rag=rag, ks=ks, n=ec.bootstrap_resamples),
            "by_test_set": by_set,
            # Answers are generated in batches of up to eval.batch_size, so one answer's own latency is not
            # observable here: this is the batched generation's wall time divided by the answers it generated.
            "batch_s_per_answer": gen_s / generated if generated else math.nan,
            "generated": generated,
            "batch_size": ec.batch_size,
            "tokens_per_s": tokens / gen_s if gen_s > 0 else math.nan,
            "wall_s": time.perf_counter() - t0,
            "answers": records,
        }
    n = ec.bootstrap_resamples
    served = f"rag+lora-{deepest}" if deepest and f"rag+lora-{deepest}" in arms else "rag"
    policy_tradeoff = {}
    if "answers" in results_arms.get(served, {}):
        policy_tradeoff = {
            "arm": served,
            "configured": f"{service.citation_policy}, max_unsupported_share {service.max_unsupported_share}",
            "rows": citation_policy_tradeoff(results_arms[served]["answers"], kind_of, replies),
        }
    comparisons = _comparisons(results_arms, deepest or (stages[-1] if stages else None), kb_sets, n)
    speed = {}
    first = next((ts for ts in sets if ts.kind == "kb"), sets[0])
    if ec.speedup_questions and first.rows:
        speed = measure_speedup(service, first.rows[: ec.speedup_questions], params)
        notes.append(
            f"batched generation: {speed['questions']} questions in {speed['batched_s']}s vs {speed['one_at_a_time_s']}s "
            f"one at a time (x{speed['speedup']}); identical outputs: {speed['identical_outputs']}"
        )
    stage_info = _stage_summaries(cfg.paths.adapters_dir, stages) if stages else {}
    own_sets: dict[str, list[str]] = {}
    for ts in sets:
        if ts.held_out_of and ts.kind in ("kb", "general"):  # not gold_removed: its right reply is a hand-over
            own_sets.setdefault(ts.held_out_of, []).append(ts.name)
    gains = stage_gains(results_arms, stages, parents, own_sets, n)
    forgetting = forgetting_on_answers(results_arms, stages, parents, sets, stage_info, n)
    retrieval = {}
    for name, arm in results_arms.items():
        if "metrics" in arm and f"hit@{k}" in arm["metrics"] and name != "oracle":
            label = f"{_retrieval_mode(service, cfg)}, k={k}"
            retrieval[label] = {m: arm["metrics"][m] for m in (*(f"hit@{x}" for x in ks), "mrr")}
            break  # every RAG arm retrieves the same passages: one row says it
    now = datetime.now(timezone.utc)
    run_name = now.strftime("%Y%m%d-%H%M%S")
    data_manifest = Path(cfg.paths.data_dir) / "manifest.json"
    data_version = None
    if data_manifest.is_file():
        data_version = json.loads(data_manifest.read_text(encoding="utf-8")).get("dataset_version")
    results = {
        "run": {
            "name": run_name,
            "created": now.isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "project": cfg.project.name,
            "model": cfg.model.base,
            "data_version": data_version,
            "config": cfg.model_dump(mode="json", by_alias=True),
            "limit": limit,
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "bootstrap": {"n_resamples": n, "confidence": 0.95, "seed": 0},
        "test_sets": {ts.name: _describe_set(ts) for ts in sets},
        "headline": {
            "kb_sets": [ts.name for ts in sets if ts.kind == "kb"],
            "out_of_kb_sets": [ts.name for ts in sets if ts.kind == "out_of_kb"],
            "unanswerable_sets": {kind: [ts.name for ts in sets if ts.kind == kind] for kind in REFUSAL_METRIC},
            # the bot as served by default: retrieval + the deepest stage (serving's default), else retrieval alone
            "served_arm": next(
                (a for a in (f"rag+lora-{deepest}", "rag") if "metrics" in results_arms.get(a, {})), None
            ),
        },
        "judge": {"threshold": judge.threshold, "ngram": judge.ngram, "overlap": judge.overlap},
        "citation_policy": service.citation_policy,
        "stage_order": stages,
        "arms": results_arms,
        "comparisons": comparisons,
        "stage_gains": gains,
        "citation_policy_tradeoff": policy_tradeoff,
        "stages": stage_info,
        "forgetting": forgetting,
        "retrieval": retrieval,
        "groundedness_calibration": calibration,
        "generation_speedup": speed,
        "notes": notes,
    }
    out = Path(out_dir) if out_dir else Path(cfg.paths.reports_dir) / run_name
    write_report(results, out)
    return out


def _describe_set(ts: TestSet) -> dict:
    origin = f"held-out questions of stage {ts.held_out_of}" if ts.held_out_of else f"file {Path(ts.path).name}"
    return {
        "description": f"{origin}; {KIND_DESCRIPTIONS[ts.kind]}",
        "kind": ts.kind,
        "held_out_of": ts.held_out_of,
        "path": ts.path,
        "n": len(ts.rows),
    }


def _describe(name: str, arm: dict) -> str:
    if arm["oracle"]:
        return f"gold passages from the index as the only context, {arm['stage'] or 'base'} model (upper bound)"
    parts = {
        "base": "base model, no retrieval",
        "rag": "retrieval + base model",
        "lora": "stage adapter, no retrieval",
        "rag+lora": "retrieval + stage adapter",
    }
    return parts[arm["mode"]] + (f" ({arm['stage']})" if arm["stage"] else "")


def _paired(arms: dict, a: str, b: str, test_sets: set[str], metric: str) -> tuple[list[float], list[float]]:
    """Per-question scores of arms a and b on the questions both answered in `test_sets`."""
    if "answers" not in arms.get(a, {}) or "answers" not in arms.get(b, {}):
        return [], []
    key = lambda r: (r["test_set"], r["id"])  # noqa: E731
    bs = {key(r): r["scores"].get(metric, math.nan) for r in arms[b]["answers"] if r["test_set"] in test_sets}
    pairs = [(r["scores"].get(metric, math.nan), bs[key(r)]) for r in arms[a]["answers"] if key(r) in bs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _diff(arms: dict, a: str, b: str, test_sets: set[str], metric: str, n_resamples: int) -> dict | None:
    xa, xb = _paired(arms, a, b, test_sets, metric)
    if not xa:
        return None
    diff, low, high = M.paired_bootstrap_diff(xa, xb, n_resamples=n_resamples)
    keep = [not (math.isnan(x) or math.isnan(y)) for x, y in zip(xa, xb, strict=True)]
    mean = lambda xs: float(np.mean([x for x, k in zip(xs, keep, strict=True) if k])) if any(keep) else math.nan  # noqa: E731
    return {"diff": diff, "low": low, "high": high, "n": sum(keep), "a_mean": mean(xa), "b_mean": mean(xb)}


def _comparisons(arms: dict, deepest: str | None, kb_sets: set[str], n_resamples: int) -> list[dict]:
    """Paired differences on token F1 over the kb sets: what retrieval, fine-tuning, and both buy (with the
    deepest stage)."""
    pairs = [("rag", "base")]
    if deepest:
        pairs += [
            (f"lora-{deepest}", "base"),
            (f"rag+lora-{deepest}", "rag"),
            (f"rag+lora-{deepest}", f"lora-{deepest}"),
        ]
    out = []
    for a, b in pairs:
        d = _diff(arms, a, b, kb_sets, GAIN_METRIC, n_resamples)
        if d is not None:
            out.append({"a": a, "b": b, "metric": GAIN_METRIC, **d})
    return out


def stage_gains(
    arms: dict,
    stages: list[str],
    parents: dict[str, str | None],
    own_sets: dict[str, list[str]],
    n_resamples: int,
    metric: str = GAIN_METRIC,
) -> list[dict]:
    """What each stage buys: its paired gain over its parent on its own held-out set, closed book and with
    retrieval (lora-<stage> vs lora-<parent> or base; rag+lora-<stage> vs rag+lora-<parent> or rag)."""
    out = []
    for stage in stages:
        parent = parents.get(stage)
        sets = set(own_sets.get(stage, []))
        for setting, a, b in (
            ("closed book", f"lora-{stage}", f"lora-{parent}" if parent else "base"),
            ("with retrieval", f"rag+lora-{stage}", f"rag+lora-{parent}" if parent else "rag"),
        ):
            row = {
                "stage": stage,
                "parent": parent or "base",
                "setting": setting,
                "a": a,
                "b": b,
                "test_set": ", ".join(sorted(sets)) or None,
                "metric": metric,
            }
            d = _diff(arms, a, b, sets, metric, n_resamples) if sets else None
            if d is not None:
                row.update(d)
            elif not sets:
                row["note"] = f"no held-out set of stage {stage} in eval.sets"
            else:
                row["note"] = f"{a} and {b} did not both answer {row['test_set']}"
            out.append(row)
    return out


def forgetting_on_answers(
    arms: dict,
    stages: list[str],
    parents: dict[str, str | None],
    sets: list[TestSet],
    stage_info: dict,
    n_resamples: int,
) -> dict:
    """{general set: {"held_out_of", "after": {after stage: row}}}: token F1 of the closed-book arm after each stage
    (base first), its paired change over the parent's arm, and the stage manifest's validation loss on that
    stage's validation split with its change since the stage that trained on it (the loss-based figure)."""
    out = {}
    for ts in sets:
        if ts.kind != "general":
            continue
        g = ts.held_out_of
        rows = {}
        for after in ["base", *stages]:
            arm = "base" if after == "base" else f"lora-{after}"
            stats = arms.get(arm, {}).get("by_test_set", {}).get(ts.name, {}).get(GAIN_METRIC)
            if stats is None:
                continue
            row: dict = {"arm": arm, GAIN_METRIC: stats}
            if after != "base":
                parent = parents.get(after)
                before = f"lora-{parent}" if parent else "base"
                d = _diff(arms, arm, before, {ts.name}, GAIN_METRIC, n_resamples)
                if d is not None:
                    row["change"] = {"mean": d["diff"], "low": d["low"], "high": d["high"], "n": d["n"]}
                    row["change_vs"] = before
            loss = _manifest_loss(stage_info, after, g)
            row.update(loss)
            rows[after] = row
        if rows:
            out[ts.name] = {"held_out_of": g, "after": rows}
    return out


def _manifest_loss(stage_info: dict, after: str, g: str | None) -> dict:
    """Validation loss on stage g's split after stage `after` (from `after`'s manifest metrics.forgetting), and
    its relative change since g's own stage; {} when the manifests do not say."""
    if g is None:
        return {}
    if after == "base":  # the loss before the first stage is the base model's
        info = stage_info.get(g, {})
        first = (info.get("forgetting") or {}).get(g) or {}
        return {"val_loss": first.get("before_this_stage")} if not info.get("parents") else {}
    f = ((stage_info.get(after, {}).get("forgetting")) or {}).get(g) or {}
    if not f:
        return {}
    row = {"val_loss": f.get("after_this_stage")}
    own, now = f.get("after_own_stage"), f.get("after_this_stage")
    if isinstance(own, int | float) and isinstance(now, int | float) and own:
        row["val_loss_change_pct"] = 100.0 * (now - own) / own
    return row
