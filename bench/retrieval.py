"""Retrieval speed: index build throughput vs raw SentenceTransformer.encode (the ceiling), query latency of dense,
BM25 and hybrid vs LangChain's FAISS.from_documents + similarity_search (same corpus, same embedder), and a
synthetic scale run (faiss exact vs IVF vs HNSW: latency and recall@10 against exact).

    .venv/bin/python -m bench.retrieval [--quick] [--scale 100000,1000000] [--embedder packaged:all-MiniLM-L6-v2]

Corpus: data/kb/faq.jsonl chunked with the config's settings; queries: the held-out FAQ questions (domain and
subdomain test). Scale vectors are synthetic 384-d float32, unit-normalised, drawn around 1,000 random centres
(uniformly random unit vectors have no neighbourhood structure and make every ANN index look broken); queries
come from the same mixture. Indexes are built with `retriever.index.make_faiss_index` (the product's settings).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import latency_summary, md_table, median, ratio, timed, write_report


def held_out_questions(data_dir: Path) -> list[str]:
    rows = []
    for split in ("domain", "subdomain"):
        rows += [json.loads(x) for x in (data_dir / split / "test.jsonl").read_text().splitlines() if x.strip()]
    return [r["question"] for r in rows]


def langchain_embeddings(embedder):
    """Our embedder as a LangChain `Embeddings` (the same model and normalisation on both sides)."""
    from langchain_core.embeddings import Embeddings

    class RagloraEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return embedder.encode(list(texts), batch_size=64).tolist()

        def embed_query(self, text: str) -> list[float]:
            return embedder.encode([text], batch_size=1)[0].tolist()

    return RagloraEmbeddings()


def build_and_query(args, tables: dict, results: dict) -> None:
    from pipeline.config import load_config
    from retriever.embedder import load_embedder
    from retriever.index import build_index, load_index

    cfg = load_config(args.config if Path(args.config).is_file() else None)
    embedder = load_embedder(args.embedder or cfg.index.embedder)
    data = Path(args.data_dir)
    kb = data / "kb" / "faq.jsonl"
    tmp_kb = None
    if args.kb_rows:  # a smaller corpus (smoke tests)
        tmp_kb = Path(tempfile.mkdtemp(prefix="raglora-bench-kb-")) / "faq.jsonl"
        tmp_kb.write_text("\n".join(kb.read_text(encoding="utf-8").splitlines()[: args.kb_rows]) + "\n")
        kb = tmp_kb
    questions = held_out_questions(data)[: args.queries]
    repeats = 1 if args.quick else 3
    ic = cfg.index
    with tempfile.TemporaryDirectory() as tmp:
        n_build = [0]

        def build():
            n_build[0] += 1
            return build_index([str(kb)], Path(tmp) / f"ix{n_build[0]}", embedder, chunk_size=ic.chunk_size,
                               chunk_overlap=ic.chunk_overlap, faq_include_question=ic.faq_include_question,
                               batch_size=ic.batch_size, show_progress=False)  # fmt: skip

        print("[retrieval] index build vs raw encode ...", flush=True)
        build_times, report = timed(build, warmup=1, repeats=repeats)
        index = load_index(Path(tmp) / f"ix{n_build[0]}", embedder)
        texts = [c.text for c in index.chunks]
        st = embedder.model

        def raw():
            return st.encode(texts, batch_size=ic.batch_size, normalize_embeddings=True, convert_to_numpy=True)

        raw_times, _ = timed(raw, warmup=1, repeats=repeats)
        n = report.n_chunks
        ours_cps, raw_cps = n / median(build_times), n / median(raw_times)

        # LangChain FAISS, the way its docs build one: FAISS.from_documents(docs, embeddings)
        with warnings.catch_warnings():  # langchain-community announces its sunset on import
            warnings.simplefilter("ignore")
            from langchain_community.vectorstores import FAISS
        from langchain_core.documents import Document

        docs = [Document(page_content=c.text, metadata={"chunk_id": c.chunk_id, "source": c.source})
                for c in index.chunks]  # fmt: skip
        lc_emb = langchain_embeddings(embedder)
        lc_times, store = timed(lambda: FAISS.from_documents(docs, lc_emb), warmup=1, repeats=repeats)
        lc_cps = n / median(lc_times)
        results["build"] = {
            "chunks": n,
            "ours_build_s": round(median(build_times), 3),
            "raw_encode_s": round(median(raw_times), 3),
            "langchain_from_documents_s": round(median(lc_times), 3),
            "ours_chunks_per_s": round(ours_cps, 1),
            "raw_encode_chunks_per_s": round(raw_cps, 1),
            "langchain_chunks_per_s": round(lc_cps, 1),
            "ours_fraction_of_ceiling": ratio(ours_cps, raw_cps),
        }
        tables[f"Index build, {n} FAQ chunks, {embedder.name} (median of {repeats})"] = md_table(
            ["builder", "seconds", "chunks/s", "vs raw encode"],
            [
                ["raw SentenceTransformer.encode (ceiling)", median(raw_times), raw_cps, 1.0],
                [
                    "raglora build_index (load, chunk, embed, faiss, atomic write)",
                    median(build_times),
                    ours_cps,
                    ratio(ours_cps, raw_cps),
                ],
                ["LangChain FAISS.from_documents", median(lc_times), lc_cps, ratio(lc_cps, raw_cps)],
            ],  # fmt: skip
        )

        print(f"[retrieval] query latency, {len(questions)} questions ...", flush=True)
        k = cfg.retrieval.k
        lat: dict = {}
        ours_dense_ids = []
        for mode in ("dense", "bm25", "hybrid"):
            for q in questions[:3]:
                index.search(q, k=k, mode=mode)
            times = []
            for q in questions:
                t0 = time.perf_counter()
                hits = index.search(q, k=k, mode=mode, rrf_k=cfg.retrieval.rrf_k, candidates=cfg.retrieval.candidates)
                times.append(time.perf_counter() - t0)
                if mode == "dense":
                    ours_dense_ids.append([h.chunk.chunk_id for h in hits])
            lat[f"raglora {mode}"] = latency_summary(times)
        for q in questions[:3]:
            store.similarity_search(q, k=k)
        times, lc_ids = [], []
        for q in questions:
            t0 = time.perf_counter()
            got = store.similarity_search(q, k=k)
            times.append(time.perf_counter() - t0)
            lc_ids.append([d.metadata["chunk_id"] for d in got])
        lat["LangChain FAISS similarity_search"] = latency_summary(times)
        same = sum(a == b for a, b in zip(ours_dense_ids, lc_ids, strict=True))
        enc_times, _ = timed(lambda: [embedder.encode([q], batch_size=1) for q in questions[:20]], warmup=1, repeats=1)
        results["query"] = {
            "k": k,
            "latency": lat,
            "dense_top_k_identical_to_langchain": f"{same}/{len(questions)}",
            "query_encode_ms": round(median(enc_times) / 20 * 1000, 2),
        }
        base = lat["LangChain FAISS similarity_search"]["p50_ms"]
        tables[f"Query latency, {len(questions)} held-out questions, k={k} ({n} chunks)"] = md_table(
            ["retriever", "p50 ms", "p95 ms", "p50 vs LangChain"],
            [[name, v["p50_ms"], v["p95_ms"], ratio(v["p50_ms"], base, 3)] for name, v in lat.items()],
        ) + (
            f"\n\nDense top-{k} ids identical to LangChain's: {same}/{len(questions)}. Encoding one query costs "
            f"{results['query']['query_encode_ms']} ms of the dense latency."
        )


def clustered_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, spread: float = 0.6):
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for i in range(0, n, step):
        m = min(step, n - i)
        c = centres[rng.integers(0, len(centres), m)]
        out[i : i + m] = c + spread * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def scale_run(args, sizes: list[int], tables: dict, results: dict) -> None:
    import faiss

    from retriever.config import IndexConfig
    from retriever.index import HNSW_EF_SEARCH, IVF_NPROBE, make_faiss_index

    ic = IndexConfig()
    dim, k = 384, 10
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n_q = 100
    queries = clustered_vectors(n_q, dim, rng, centres)
    rows, res = [], {}
    for n in sizes:
        print(f"[retrieval] scale {n:,} vectors ...", flush=True)
        xb = clustered_vectors(n, dim, rng, centres)
        truth = None
        for kind in ("flat", "ivf", "hnsw"):
            if kind == "hnsw" and n > args.hnsw_max:
                res[f"{n}/{kind}"] = {"skipped": f"n > --hnsw-max {args.hnsw_max}"}
                rows.append([f"{n:,}", kind, "-", "-", "-", "-", f"skipped (n > --hnsw-max {args.hnsw_max:,})"])
                continue
            t0 = time.perf_counter()
            index = make_faiss_index(xb, kind, ivf_nlist=ic.ivf_nlist, hnsw_m=ic.hnsw_m)
            build_s = time.perf_counter() - t0
            if kind == "flat":
                _, truth = index.search(queries, k)
            for q in queries[:5]:
                index.search(q[None, :], k)
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                _, ids = index.search(q[None, :], k)
                times.append(time.perf_counter() - t0)
                found.append(ids[0])
            recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))
            lat = latency_summary(times)
            params = {"flat": "exact", "ivf": f"nlist {ic.ivf_nlist}, nprobe {min(IVF_NPROBE, ic.ivf_nlist)}",
                      "hnsw": f"M {ic.hnsw_m}, efC 200, efSearch {HNSW_EF_SEARCH}"}[kind]  # fmt: skip
            res[f"{n}/{kind}"] = {"build_s": round(build_s, 2), "recall@10": round(recall, 4), **lat, "params": params}
            rows.append([f"{n:,}", kind, params, build_s, lat["p50_ms"], lat["p95_ms"], round(recall, 4)])
            del index
            gc.collect()
        del xb
        gc.collect()
    results["scale"] = res
    results["scale_faiss_threads"] = faiss.omp_get_max_threads()
    tables[f"faiss at scale: synthetic clustered 384-d unit vectors, {n_q} single queries, k=10"] = md_table(
        ["vectors", "index", "params", "build s", "p50 ms", "p95 ms", "recall@10 vs exact"], rows
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, scale 50k only")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--embedder", default=None, help="default: the config's index.embedder")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--kb-rows", type=int, default=None, help="index only the first N FAQ rows (smoke tests)")
    ap.add_argument("--queries", type=int, default=200, help="at most this many held-out questions")
    ap.add_argument(
        "--scale", default=None, help="comma-separated sizes (default 100000,1000000; quick 50000; 0: none)"
    )
    # HNSW on 1M vectors takes ~15 min to build on 2 cores, which alone would break the 20-minute budget.
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this many vectors (build time)")
    ap.add_argument("--skip-corpus", action="store_true", help="only the synthetic scale run")
    ap.add_argument("--out-dir", default="reports/bench")
    args = ap.parse_args(argv)
    scale = args.scale or ("50000" if args.quick else "100000,1000000")
    sizes = [int(s) for s in scale.split(",") if int(s) > 0]
    tables: dict = {}
    results: dict = {}
    if not args.skip_corpus:
        build_and_query(args, tables, results)
    if sizes:
        scale_run(args, sizes, tables, results)
    write_report("retrieval", args=vars(args) | {"scale_sizes": sizes}, results=results, tables=tables,
                 out_dir=args.out_dir)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
