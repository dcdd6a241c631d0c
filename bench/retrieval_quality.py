"""Retrieval quality on the project's knowledge base: does each held-out question retrieve its gold passage?

Every variant (embedder × doc_questions) builds one throwaway index of `index.docs` with Q/A rows as answers
only (the honest figure), and is scored for dense, BM25 and hybrid search (× the reranker with --reranker) on:
  - faq: the held-out FAQ questions (the kb-kind eval sets' validation and test files);
  - customer: hand-written customer-style paraphrases of held-out rows (data/eval/customer_questions.jsonl);
  - followups: two-turn conversations whose last question needs the first (data/eval/followups.jsonl), asked
    raw, condensed (pipeline.handoff.condense_query, as serving does) and with the whole history prepended.
Validation and test are reported apart. The winner is the variant with the best pooled hit@5 (then MRR) on the
faq + customer *validation* questions; its test figures are the ones to quote. A question + answer index with the
first embedder is kept as a reference (trivially high: a held-out question matches itself).

    .venv/bin/python bench/retrieval_quality.py [--config configs/default.yaml]
        [--embedders packaged:all-MiniLM-L6-v2,packaged:all-mpnet-base-v2] [--doc-questions off,headings,generate]
        [--reranker PATH] [--out-dir reports]

generate runs the project's base model over every chunk (minutes on CPU); its questions are cached in
<out-dir>/retrieval_quality_questions.json, so a rerun reuses them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from pipeline.doc_questions import base_model_writer
from raglora.errors import RagloraError
from raglora.files import atomic_write_text
from retriever.evaluate import retrieval_metrics
from retriever.gold import GoldFinder
from retriever.index import build_index, load_index
from retriever.questions import add_questions_fn

SEARCH_MODES = ("dense", "bm25", "hybrid")
KS = (1, 5, 10)
WINNER_SETS = ("faq", "customer")  # what the winner is chosen on (validation split, raw questions)
CUSTOMER_FILE = "data/eval/customer_questions.jsonl"
FOLLOWUPS_FILE = "data/eval/followups.jsonl"
QUESTIONS_CACHE = "retrieval_quality_questions.json"
CACHE_EVERY = 64  # chunks per generation call between cache saves


@dataclasses.dataclass
class QuestionSet:
    """Rows {id, question, and gold_ids, or answer/source for GoldFinder; history for follow-ups} of one split."""

    name: str
    split: str
    rows: list[dict]


def faq_sets(cfg) -> list[QuestionSet]:
    """The held-out FAQ questions of every kb-kind eval set: its test file and the validation file beside it."""
    from pipeline.config import resolve_eval_sets
    from pipeline.evaluate import load_test_set

    out: dict[str, list[dict]] = {"validation": [], "test": []}
    for spec in resolve_eval_sets(cfg):
        if spec.kind != "kb":
            continue
        paths = {"test": Path(spec.path)}
        if paths["test"].name == "test.jsonl":
            paths["validation"] = paths["test"].with_name("validation.jsonl")
        for split, path in paths.items():
            every_row = spec.model_copy(update={"path": str(path), "limit": sys.maxsize})
            for r in load_test_set(every_row).rows:
                out[split].append(
                    {"id": r["id"], "question": r["question"], "answer": r["reference"], "source": r["source"]}
                )
    return [QuestionSet("faq", split, rows) for split, rows in out.items() if rows]


def hand_sets(path: str | Path, name: str) -> list[QuestionSet]:
    """A hand-written set (customer questions, follow-ups): every row names its gold_ids and its split."""
    path = Path(path)
    if not path.is_file():
        raise RagloraError(f"{name} questions: {path} is missing")
    by_split: dict[str, list[dict]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("question") or not row.get("gold_ids") or row.get("split") not in ("validation", "test"):
            raise RagloraError(f"{path}:{n}: a row needs question, gold_ids and split (validation or test)")
        by_split.setdefault(row["split"], []).append(row)
    return [QuestionSet(name, split, rows) for split, rows in sorted(by_split.items(), reverse=True)]


def query_forms(rows: list[dict], language: str) -> dict[str, list[str]]:
    """What is searched for each row: the question; for follow-ups also the condensed and history forms."""
    from pipeline.handoff import condense_query

    questions = [r["question"] for r in rows]
    if not any(r.get("history") for r in rows):
        return {"raw": questions}
    return {
        "raw": questions,
        "condensed": [condense_query(r["question"], r.get("history"), language) for r in rows],
        "history": [" ".join([*(m["content"] for m in r.get("history") or []), r["question"]]) for r in rows],
    }


def score_index(index, sets: list[QuestionSet], *, rerankers: dict, search_kw: dict, language: str) -> list[dict]:
    """hit@1/5/10 and MRR of every set × split × query form × search mode × reranker on one index."""
    finder = GoldFinder(index.chunks)
    rows = []
    for qs in sets:
        gold = [r.get("gold_ids") or finder.find(r) for r in qs.rows]
        for form, queries in query_forms(qs.rows, language).items():
            for mode in SEARCH_MODES:
                for rr_name, reranker in rerankers.items():
                    ranked = [
                        [
                            h.chunk.chunk_id
                            for h in index.search(q, k=max(KS), mode=mode, reranker=reranker, **search_kw)
                        ]
                        for q in queries
                    ]
                    m = retrieval_metrics(ranked, gold, ks=KS)
                    rows.append(
                        {"set": qs.name, "split": qs.split, "query": form, "mode": mode, "reranker": rr_name, **m}
                    )
    return rows


def cached_questions(add, path: Path, key: dict):
    """Wrap an add_questions callable so that questions written for a content hash are kept in `path` (valid
    while `key`, the model and prompt, is unchanged) and reused by the next run."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    stored: dict[str, list[str]] = data.get("questions", {}) if data.get("key") == key else {}

    def fill(chunks, previous):
        for start in range(0, len(chunks), CACHE_EVERY):  # saved as it goes: a stopped run loses one part at most
            part = chunks[start : start + CACHE_EVERY]
            add(part, {**stored, **previous})
            stored.update({c.content_hash: c.questions for c in part})
            text = json.dumps({"key": key, "questions": stored}, ensure_ascii=False, indent=1) + "\n"
            atomic_write_text(path, text)

    return fill


def run(
    docs: Sequence[str | Path],
    embedders: dict,
    sets: list[QuestionSet],
    *,
    doc_questions: Sequence[str] = ("off",),
    per_chunk: int = 3,
    chunk_size: int,
    chunk_overlap: int,
    language: str = "en",
    rerankers: dict | None = None,
    search_kw: dict | None = None,
    generator_factory: Callable | None = None,
    questions_cache: Path | None = None,
    cache_key: dict | None = None,
    reference: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Build one answers-only index per embedder × doc_questions, score it, add the question+answer reference,
    and pick the winner on validation. Returns the report (rows + winner)."""
    rerankers = rerankers or {"none": None}
    search_kw = search_kw or {}
    results: list[dict] = []
    build = partial(build_index, list(docs), chunk_size=chunk_size, chunk_overlap=chunk_overlap, show_progress=False)
    build = partial(build, language=language)
    with tempfile.TemporaryDirectory() as tmp:
        for emb_name, embedder in embedders.items():
            for dq in doc_questions:
                add = add_questions_fn(dq, per_chunk, generator_factory=generator_factory)
                if dq == "generate" and questions_cache is not None:
                    add = cached_questions(add, questions_cache, {**(cache_key or {}), **add.settings})
                out = Path(tmp) / f"{len(results)}"
                log(f"index: {emb_name}, doc_questions {dq}")
                build(out, embedder, **({"add_questions": add} if add is not None else {}))
                index = load_index(out, embedder)
                variant = {"embedder": emb_name, "index": "answers", "doc_questions": dq}
                rows = score_index(index, sets, rerankers=rerankers, search_kw=search_kw, language=language)
                results += [{**variant, **r} for r in rows]
        faq = [s for s in sets if s.name == "faq"]
        if reference and faq and embedders:
            emb_name, embedder = next(iter(embedders.items()))
            out = Path(tmp) / "reference"
            build(out, embedder, faq_include_question=True)
            rows = score_index(
                load_index(out, embedder), faq, rerankers={"none": None}, search_kw=search_kw, language=language
            )
            results += [{"embedder": emb_name, "index": "question+answer", "doc_questions": "off", **r} for r in rows]
    return {"results": results, **choose_winner(results)}


def _pooled(rows: list[dict], metric: str) -> float:
    n = sum(r["n"] for r in rows)
    return sum(r[metric] * r["n"] for r in rows) / n if n else float("nan")


VARIANT = ("embedder", "doc_questions", "mode", "reranker")


def choose_winner(results: list[dict]) -> dict:
    """The answers-only variant with the best pooled hit@5 (then MRR) over the faq + customer validation
    questions, its figures on both splits, and which query form serves its follow-ups best on validation."""
    candidates: dict[tuple, list[dict]] = {}
    for r in results:
        if r["index"] == "answers" and r["split"] == "validation" and r["query"] == "raw" and r["set"] in WINNER_SETS:
            candidates.setdefault(tuple(r[k] for k in VARIANT), []).append(r)
    if not candidates:
        return {"winner": None}
    key = max(candidates, key=lambda k: (_pooled(candidates[k], "hit@5"), _pooled(candidates[k], "mrr")))
    mine = [r for r in results if r["index"] == "answers" and tuple(r[k] for k in VARIANT) == key]
    figures = {}
    for split in ("validation", "test"):
        chosen = [r for r in mine if r["split"] == split and r["query"] == "raw" and r["set"] in WINNER_SETS]
        figures[split] = {m: _pooled(chosen, m) for m in ("hit@1", "hit@5", "mrr")} | {"n": sum(r["n"] for r in chosen)}
        figures[split]["by_set"] = {r["set"]: {m: r[m] for m in ("n", "hit@1", "hit@5", "mrr")} for r in chosen}
    follow = {r["query"]: r for r in mine if r["set"] == "followups" and r["split"] == "validation"}
    best_form = max(follow, key=lambda f: (follow[f]["hit@5"], follow[f]["mrr"])) if follow else None
    return {
        "winner": dict(zip(VARIANT, key, strict=True)),
        "winner_figures": figures,
        "followups_best_query": best_form,
    }


def markdown(report: dict) -> str:
    """The report table: one row per variant × set × split × query form."""
    lines = [
        "| index | embedder | doc_questions | mode | reranker | set | split | query | n | hit@1 | hit@5 | hit@10 | MRR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['index']} | {r['embedder']} | {r['doc_questions']} | {r['mode']} | {r['reranker']} | {r['set']} | "
            f"{r['split']} | {r['query']} | {r['n']} | {r['hit@1']:.3f} | {r['hit@5']:.3f} | {r['hit@10']:.3f} | "
            f"{r['mrr']:.3f} |"
        )
    w = report.get("winner")
    if w:
        f = report["winner_figures"]
        lines += [
            "",
            f"Winner on validation (faq + customer, pooled hit@5 then MRR): {w['embedder']}, doc_questions "
            f"{w['doc_questions']}, {w['mode']}, reranker {w['reranker']}.",
            *(
                f"- {split} (n={f[split]['n']}): hit@1 {f[split]['hit@1']:.3f}, hit@5 {f[split]['hit@5']:.3f}, "
                f"MRR {f[split]['mrr']:.3f}; "
                + "; ".join(f"{name} hit@5 {m['hit@5']:.3f} (n={m['n']})" for name, m in f[split]["by_set"].items())
                for split in ("validation", "test")
            ),
            f"- follow-ups: best query form on validation: {report.get('followups_best_query')}",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--embedders", help="comma-separated embedder names (default: index.embedder)")
    ap.add_argument("--doc-questions", default="off,headings", help="comma-separated: off, headings, generate")
    ap.add_argument("--per-chunk", type=int, help="questions per chunk (default: index.doc_questions_per_chunk)")
    ap.add_argument("--reranker", help="a cross-encoder folder or cached id: every mode is scored with and without it")
    ap.add_argument("--customer", default=CUSTOMER_FILE)
    ap.add_argument("--followups", default=FOLLOWUPS_FILE)
    ap.add_argument("--out-dir", default="reports")
    args = ap.parse_args()
    from pipeline.config import load_config
    from retriever.embedder import load_embedder

    try:
        cfg = load_config(args.config)
        ic = cfg.index
        per_chunk = args.per_chunk or ic.doc_questions_per_chunk
        sets = [*faq_sets(cfg), *hand_sets(args.customer, "customer"), *hand_sets(args.followups, "followups")]
        embedders = {}
        for name in (args.embedders or ic.embedder).split(","):
            embedders[name.strip()] = load_embedder(name.strip())
        rerankers = {"none": None}
        if args.reranker:
            from retriever.rerank import load_reranker

            rerankers[Path(args.reranker).name or args.reranker] = load_reranker(args.reranker)
        rc = cfg.retrieval
        search_kw = {
            "rrf_k": rc.rrf_k,
            "dense_weight": rc.dense_weight,
            "bm25_weight": rc.bm25_weight,
            "candidates": rc.candidates,
            "rerank_depth": rc.rerank_depth,
        }
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            report = run(
                list(ic.docs),
                embedders,
                sets,
                doc_questions=[d.strip() for d in args.doc_questions.split(",")],
                per_chunk=per_chunk,
                chunk_size=ic.chunk_size,
                chunk_overlap=ic.chunk_overlap,
                language=ic.language,
                rerankers=rerankers,
                search_kw=search_kw,
                generator_factory=base_model_writer(cfg, per_chunk, stack),
                questions_cache=out_dir / QUESTIONS_CACHE,
                cache_key={"model": cfg.model.base},
            )
    except RagloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["sets"] = {f"{s.name}/{s.split}": len(s.rows) for s in sets}
    report["settings"] = {"config": args.config, "chunk_size": ic.chunk_size, "per_chunk": per_chunk, **search_kw}
    (out_dir / "retrieval_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "retrieval_quality.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
