"""`raglora`: a thin command line over the pure functions in retriever/, finetune/ and pipeline/.

Every user-fixable problem surfaces as one `error: ...` line and exit code 2; heavy libraries are
imported inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from pipeline.api.settings import MODES
from pipeline.config import DEFAULT_CONFIG
from raglora.errors import RagloraError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, args.set)


def cmd_data(args: argparse.Namespace) -> int:
    from pipeline.datasets import datasets_from_config, write_datasets

    cfg = _config(args)
    out = args.out or cfg.paths.data_dir
    files, info, settings = datasets_from_config(cfg, out)
    manifest = write_datasets(out, files, settings=settings, info=info)
    for name, src in manifest["sources"].items():
        collapsed = (
            f", {src['duplicates_collapsed']} duplicate questions collapsed" if src["duplicates_collapsed"] else ""
        )
        print(f"  source {name}: {src['rows']} rows ({src['format']}){collapsed}")
    for rel, entry in manifest["files"].items():
        print(f"  {rel:32s} {entry['rows']:6d} rows")
    for warning in info["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    leak = manifest["leak_check"]
    print(
        f"leak check: {leak['held_out_in_training']} of {leak['held_out_questions']} held-out questions in training rows"
    )
    print(f"wrote {len(manifest['files'])} files and manifest.json to {out}/")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from pipeline.doc_questions import add_questions_for
    from retriever.embedder import load_embedder
    from retriever.index import build_index, verify_index

    cfg = _config(args)
    ic = cfg.index
    docs = args.docs or ic.docs
    out = args.out or cfg.paths.index_dir
    if getattr(args, "verify", False):
        manifest = verify_index(out)
        checked = (
            "the Qdrant collection opens" if manifest.get("backend") == "qdrant" else "every file matches its checksum"
        )
        print(f"index {out}: {manifest['counts']['chunks']} chunks, {checked}")
        return 0
    missing = [d for d in docs if not Path(d).exists()]
    if missing:  # before loading the embedder, so a typo fails in milliseconds
        raise RagloraError(f"documents not found: {', '.join(missing)}")
    embedder = load_embedder(ic.embedder)
    with contextlib.ExitStack() as stack:  # a question-writing model, if any, is closed when the build ends
        report = build_index(
            docs,
            out,
            embedder,
            chunk_size=ic.chunk_size,
            chunk_overlap=ic.chunk_overlap,
            faq_include_question=ic.faq_include_question,
            index_type=ic.index_type,
            batch_size=ic.batch_size,
            language=ic.language,
            ivf_nlist=ic.ivf_nlist,
            pq_m=ic.pq_m,
            hnsw_m=ic.hnsw_m,
            backend=ic.backend,
            qdrant=ic.qdrant,
            add_questions=add_questions_for(cfg, stack),
        )
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"index {out}: {report.n_documents} documents, {report.n_chunks} chunks "
        f"({report.embedded} embedded, {report.reused} reused, {report.removed} removed) in {report.seconds:.1f}s"
    )
    return 0


def _parse_filters(items: list[str] | None) -> dict | None:
    if not items:
        return None
    filters: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise RagloraError(f"--filter expects KEY=VALUE (e.g. category=billing), got {item!r}")
        filters.setdefault(key, []).append(value)
    return filters


def cmd_search(args: argparse.Namespace) -> int:
    from retriever.embedder import load_embedder
    from retriever.index import load_index
    from retriever.rerank import load_reranker

    cfg = _config(args)
    rc = cfg.retrieval
    query = " ".join(args.query).strip()
    if not query:
        raise RagloraError('empty query: pass the question to search for, e.g. raglora search "building permit"')
    k = rc.k if args.k is None else args.k
    if k <= 0:
        raise RagloraError(f"--k must be a positive number of results, got {k}")
    mode = args.mode or rc.mode
    index_dir = args.index or cfg.paths.index_dir
    if not Path(index_dir).exists():
        raise RagloraError(f"no index at {index_dir}: build it with `make index` (or raglora index --out {index_dir})")
    # The configured embedder must be the one the index was built with; load_index checks that.
    index = load_index(index_dir, None if mode == "bm25" else load_embedder(cfg.index.embedder))
    hits = index.search(
        query,
        k=k,
        mode=mode,
        filters=_parse_filters(args.filter),
        rrf_k=rc.rrf_k,
        dense_weight=rc.dense_weight,
        bm25_weight=rc.bm25_weight,
        candidates=rc.candidates,
        nprobe=rc.nprobe,
        ef_search=rc.ef_search,
        reranker=load_reranker(rc.reranker) if rc.reranker else None,
        rerank_depth=rc.rerank_depth,
    )
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("no results")
    for h in hits:
        d = h.to_dict()
        text = " ".join(d["text"].split())
        print(f"{h.rank}. [{d['score']:.4f}] {d['title']} ({d['source']}, {d['chunk_id']})\n   {text[:240]}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from finetune.stages import run_finetune

    cfg = _config(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    summaries = run_finetune(
        cfg.finetune,
        cfg.model,
        data_dir=cfg.paths.data_dir,
        adapters_dir=cfg.paths.adapters_dir,
        cache_dir=cfg.paths.base_cache_dir,
        index_dir=cfg.paths.index_dir,
        stages=stages,
        resume=args.resume,
        force=args.force,
        max_steps=args.max_steps,
        company_name=cfg.project.name,
        company_description=cfg.project.description,
        no_answer_reply=cfg.project.no_answer_reply,
    )
    for s in summaries:
        print(json.dumps(s, ensure_ascii=False))
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return n


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.init import describe, init_project

    fields = {
        "question": args.question_field,
        "answer": args.answer_field,
        "id": args.id_field,
        "category": args.category_field,
        "source": args.source_field,
    }
    target, found = init_project(
        args.dir,
        docs=args.docs or [],
        qa=args.qa or [],
        name=args.name,
        description=args.description or "",
        fields=fields,
        fmt=args.format,
        subdomain=args.subdomain,
        language=args.language,
        base=args.base,
        force=args.force,
    )
    print(describe(found, target))
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from pipeline.gate import describe, fit_gate

    cfg = _config(args)
    for what, path, step in (("index", cfg.paths.index_dir, "index"), ("data", cfg.paths.data_dir, "data")):
        if not Path(path).exists():  # before loading the embedder, so a missing step fails in milliseconds
            raise RagloraError(f"no {what} at {path}: run `raglora {step}` before `raglora gate`")
    out = args.out or cfg.paths.gate_dir
    manifest = fit_gate(cfg, out_dir=out)
    if not manifest["fitted"]:
        print(f"warning: {manifest['warning']}", file=sys.stderr)
    print(describe(manifest))
    print(f"wrote {'gate.json and ' if manifest['fitted'] else ''}manifest.json to {out}/")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """data -> index -> gate -> finetune -> eval, each step reusing what is already built and up to date."""
    cmd_data(argparse.Namespace(**{**vars(args), "out": None}))
    cmd_index(argparse.Namespace(**{**vars(args), "docs": None, "out": None}))
    cmd_gate(argparse.Namespace(**{**vars(args), "out": None}))  # needs only data and index: seconds
    cmd_finetune(argparse.Namespace(**{**vars(args), "stages": None, "resume": False, "force": False}))
    return cmd_eval(argparse.Namespace(**{**vars(args), "out": None}))


def cmd_merge(args: argparse.Namespace) -> int:
    from finetune.merge import merge_stages

    cfg = _config(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    if not stages:  # the model serving defaults to (a config may hold sibling stages: not one chain)
        from pipeline.stage_models import deepest_stage, discover_stages

        default = cfg.serve.default_stage or deepest_stage(discover_stages(cfg.paths.adapters_dir))
        stages = [default or cfg.finetune.stages[-1].name] if cfg.finetune.stages else []
    out = merge_stages(
        cfg.model.base,
        adapters_dir=cfg.paths.adapters_dir,
        stages=stages,
        out_dir=args.out,
        cache_dir=cfg.paths.base_cache_dir,
    )
    print(f"merged model written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import export_stages

    cfg = _config(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    out = Path(args.out or Path(cfg.paths.artifacts_dir) / "export")
    done = export_stages(
        cfg.paths.adapters_dir,
        stages,
        out,
        base=cfg.model.base,
        on_stage=lambda stage, chain, rank: print(f"  {stage}: chain {' -> '.join(chain)}, rank {rank}"),
    )
    print(f"cumulative LoRA adapters written to {done}/ (one folder per stage, on base {cfg.model.base})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.api.app import run_server

    run_server(_config(args), host=args.host, port=args.port)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pipeline.answer import chat_repl

    return chat_repl(_config(args), mode=args.mode, stage=args.stage, max_new_tokens=args.max_tokens)


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import run_evaluation

    out = run_evaluation(_config(args), out_dir=args.out, limit=args.limit)
    print(f"report: {out / 'report.html'}  (also report.md, results.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raglora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml if present)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. retrieval.k=3"
        )
        p.set_defaults(func=func)
        return p

    p = add(
        "init", cmd_init, "Start a project on your own documents and Q/A data: inspect them, write DIR/raglora.yaml."
    )
    p.add_argument("dir", metavar="DIR", help="project folder; everything the pipeline writes goes inside it")
    p.add_argument(
        "--docs", nargs="+", metavar="PATH", help="documentation files or folders (.md .txt .html .pdf .json .jsonl)"
    )
    p.add_argument("--qa", nargs="+", metavar="FILE", help="Q/A or conversation files (JSONL, JSON, CSV)")
    p.add_argument("--name", required=True, help='the company the bot speaks for, e.g. "Acme Heating"')
    p.add_argument("--description", help='one line on what it does, e.g. "installs heat pumps and boilers"')
    p.add_argument(
        "--subdomain",
        metavar="FIELD=V1,V2",
        help="rows for a third, specialised stage, e.g. category=heat-pumps,boilers",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "qa", "alpaca", "sharegpt", "messages"],
        help="Q/A file format (default: detected)",
    )
    for role in ("question", "answer", "id", "category", "source"):
        p.add_argument(f"--{role}-field", metavar="COLUMN", help=f"the column holding the {role} (default: detected)")
    p.add_argument("--language", help="ISO 639-1 code of the documents (default: detected)")
    p.add_argument(
        "--base", default="packaged:smollm2-135m-instruct", help="base model: packaged name, HF id or local folder"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing DIR/raglora.yaml")

    p = add("demo", cmd_demo, "data -> index -> gate -> finetune -> eval in one go; prints the report path.")
    p.add_argument("--max-steps", type=_positive, help="cap every stage's optimizer steps (smoke runs)")
    p.add_argument("--limit", type=_positive, help="cap every test set at N questions")

    p = add("data", cmd_data, "Materialise the knowledge base and train/validation/test splits under data/.")
    p.add_argument("--out", help="output folder (default: paths.data_dir)")

    p = add("index", cmd_index, "Build or incrementally update the retrieval index.")
    p.add_argument("--docs", nargs="+", metavar="PATH", help="files or folders to index (default: index.docs)")
    p.add_argument("--out", metavar="DIR", help="index folder (default: paths.index_dir)")
    p.add_argument(
        "--verify", action="store_true", help="check every file of the built index against its checksums; no build"
    )

    p = add("gate", cmd_gate, "Fit the answerability gate on validation data (needs data and index).")
    p.add_argument("--out", metavar="DIR", help="gate folder (default: paths.gate_dir)")

    p = add("search", cmd_search, "Search the index and print the best chunks.")
    p.add_argument("query", nargs="*", help="the question to search for")
    p.add_argument("--index", metavar="DIR", help="index folder (default: paths.index_dir)")
    p.add_argument("--k", type=int, help="number of results (default: retrieval.k)")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], help="retrieval mode (default: retrieval.mode)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata filter, e.g. category=billing")
    p.add_argument("--json", action="store_true", help="print a JSON list, best first")

    p = add("finetune", cmd_finetune, "LoRA fine-tune the generator stage by stage, in finetune.stages order.")
    p.add_argument("--stages", help="comma-separated stage names (default: all configured stages)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain stages that are already complete")
    p.add_argument("--max-steps", type=_positive, help="cap every stage's optimizer steps (smoke runs)")

    p = add("merge", cmd_merge, "Merge base + stage adapters into a full model loadable by AutoModelForCausalLM.")
    p.add_argument(
        "--stages",
        help="comma-separated stages to merge, in order (default: serving's default stage and its chain)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")

    p = add(
        "export",
        cmd_export,
        "Write one standard LoRA adapter per stage on the plain base, equal to its merged chain (PEFT, vLLM).",
    )
    p.add_argument("--stages", help="comma-separated stages to export (default: every trained stage)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <paths.artifacts_dir>/export)")

    p = add("serve", cmd_serve, "Serve the OpenAI-compatible chat API and the chat page.")
    p.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serve.port)")

    p = add("chat", cmd_chat, "Chat with the bot in the terminal (/mode, /stage, /new, /sources, /quit).")
    p.add_argument("--mode", choices=list(MODES), help="answer mode (default: serve.default_mode)")
    p.add_argument("--stage", help="adapter stage (default: the deepest trained stage)")
    p.add_argument("--max-tokens", type=int, help="maximum new tokens per answer")

    p = add("eval", cmd_eval, "Compare base, RAG, LoRA and RAG+LoRA on held-out questions; write a report.")
    p.add_argument("--out", metavar="DIR", help="report folder (default: reports/<timestamp>)")
    p.add_argument("--limit", type=_positive, help="cap every test set at N questions")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None and Path(DEFAULT_CONFIG).is_file():
        args.config = DEFAULT_CONFIG
    try:
        if argv is None and args.func in (cmd_finetune, cmd_demo):  # a real command line, not a call from Python
            from finetune.allocator import relaunch_with_allocator

            relaunch_with_allocator(_config(args).finetune.allocator)
        return args.func(args)
    except RagloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
