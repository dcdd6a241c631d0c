"""Retrieval quality on the project's knowledge base: does each held-out question retrieve its gold passage?

Builds two throwaway indexes of `index.docs` (what `raglora index` indexes): Q/A rows as answers only (the honest
figure) and as question + answer (trivially high, shown beside it), and reports hit@1/5/10 and MRR for dense,
BM25 and hybrid. Questions are the kb-kind evaluation sets (`eval.sets`), or with --all-questions every row of
the Q/A knowledge base (<data_dir>/kb/*.jsonl). Gold passages come from retriever.gold.GoldFinder; questions
without one are left out of the figures.

    .venv/bin/python bench/retrieval_quality.py [--config configs/default.yaml] [--all-questions]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.config import load_config, resolve_eval_sets
from pipeline.evaluate import load_test_set
from retriever.embedder import load_embedder
from retriever.evaluate import retrieval_metrics
from retriever.gold import GoldFinder
from retriever.index import build_index, load_index


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument(
        "--all-questions", action="store_true", help="score every Q/A knowledge-base row, not only held-out"
    )
    ap.add_argument("--out", default="reports/retrieval_quality.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    if args.all_questions:
        rows = [
            {"id": r.get("id"), "question": r.get("question"), "answer": r.get("answer"), "source": r.get("source")}
            for path in sorted((Path(cfg.paths.data_dir) / "kb").glob("*.jsonl"))
            for r in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        ]
    else:
        rows = [
            {"id": r["id"], "question": r["question"], "answer": r["reference"], "source": r["source"]}
            for spec in resolve_eval_sets(cfg)
            if spec.kind == "kb"
            for r in load_test_set(spec.model_copy(update={"limit": sys.maxsize})).rows  # every held-out row
        ]
    rows = [r for r in rows if r["question"]]
    if not rows:
        print("no questions to score: run `raglora data` (and check eval.sets)", file=sys.stderr)
        return 1
    questions = [r["question"] for r in rows]
    embedder = load_embedder(cfg.index.embedder)
    rc = cfg.retrieval
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for with_question in (False, True):
            name = "question+answer" if with_question else "answer only"
            out = Path(tmp) / ("qa" if with_question else "a")
            build_index(
                list(cfg.index.docs),
                out,
                embedder,
                chunk_size=cfg.index.chunk_size,
                chunk_overlap=cfg.index.chunk_overlap,
                faq_include_question=with_question,
                show_progress=False,
                language=cfg.index.language,
            )
            index = load_index(out, embedder)
            finder = GoldFinder(index.chunks)
            gold = [finder.find(r) for r in rows]
            for mode in ("dense", "bm25", "hybrid"):
                ranked = [
                    [
                        h.chunk.chunk_id
                        for h in index.search(
                            q,
                            k=10,
                            mode=mode,
                            rrf_k=rc.rrf_k,
                            dense_weight=rc.dense_weight,
                            bm25_weight=rc.bm25_weight,
                            candidates=rc.candidates,
                        )
                    ]
                    for q in questions
                ]
                results[f"{name} / {mode}"] = retrieval_metrics(ranked, gold, ks=(1, 5, 10))
    report = {
        "questions": len(questions),
        "questions_with_gold": results[next(iter(results))]["n"] if results else 0,
        "question_set": "all" if args.all_questions else "held-out test",
        "embedder": cfg.index.embedder,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(questions)} {report['question_set']} questions, embedder {cfg.index.embedder}")
    print("| index / mode | hit@1 | hit@5 | hit@10 | MRR |\n|---|---|---|---|---|")
    for key, m in results.items():
        print(f"| {key} | {m['hit@1']:.3f} | {m['hit@5']:.3f} | {m['hit@10']:.3f} | {m['mrr']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
