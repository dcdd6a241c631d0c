"""Retrieval quality on the FAQ knowledge base: does each held-out question retrieve its own entry?

Builds two throwaway indexes of data/kb/faq.jsonl — answers only (the honest figure) and question +
answer (trivially high, shown beside it) — and reports hit@1/5/10 and MRR for dense, BM25 and hybrid.

    .venv/bin/python bench/retrieval_quality.py [--config configs/default.yaml] [--all-questions]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.config import load_config
from retriever.embedder import load_embedder
from retriever.evaluate import retrieval_metrics
from retriever.index import build_index, load_index


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--all-questions", action="store_true", help="score all 503 FAQ questions, not only held-out")
    ap.add_argument("--out", default="reports/retrieval_quality.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    data = Path(cfg.paths.data_dir)
    kb = data / "kb" / "faq.jsonl"
    if args.all_questions:
        rows = [json.loads(line) for line in kb.read_text().splitlines()]
    else:
        rows = [
            json.loads(line)
            for s in ("domain", "subdomain")
            for line in (data / s / "test.jsonl").read_text().splitlines()
        ]
    questions = [r["question"] for r in rows]
    gold = [r["id"] for r in rows]
    embedder = load_embedder(cfg.index.embedder)
    rc = cfg.retrieval
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for with_question in (False, True):
            name = "question+answer" if with_question else "answer only"
            out = Path(tmp) / ("qa" if with_question else "a")
            build_index(
                [str(kb)],
                out,
                embedder,
                chunk_size=cfg.index.chunk_size,
                chunk_overlap=cfg.index.chunk_overlap,
                faq_include_question=with_question,
                show_progress=False,
            )
            index = load_index(out, embedder)
            for mode in ("dense", "bm25", "hybrid"):
                ranked = [
                    [
                        h.chunk.source
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
