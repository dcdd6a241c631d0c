"""`raglora init DIR`: start a project on the company's own documents and Q/A data.

It reads a sample of every input straight away and says what it understood (format, field mapping, rows,
categories, language, what it could not use), then writes DIR/raglora.yaml: the same schema as
configs/default.yaml, complete and commented, with every output path inside DIR.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune.prompt import HANDOFF_REPLY, REFUSAL_ANSWER
from pipeline.sources import GENERAL_SOURCE, SourceReport, load_source
from raglora.errors import RagloraError

CONFIG_NAME = "raglora.yaml"
LANGUAGE_SAMPLE = 200  # texts fed to language detection


@dataclass
class Inspection:
    """What `init` learned from the inputs; printed to the user and used to fill the config."""

    qa: list[SourceReport] = field(default_factory=list)
    doc_files: dict[str, int] = field(default_factory=dict)  # suffix -> files
    doc_warnings: list[str] = field(default_factory=list)
    language: str = "en"
    language_share: float = 0.0


def detect_language(texts: list[str]) -> tuple[str, float]:
    """The most common language of the texts (ISO 639-1) and its share; English when nothing is detectable."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect is randomised; a seed makes init reproducible
    votes: Counter[str] = Counter()
    for text in texts[:LANGUAGE_SAMPLE]:
        if len(text.strip()) < 12:
            continue
        try:
            votes[detect(text)[:2]] += 1
        except LangDetectException:
            continue
    if not votes:
        return "en", 0.0
    lang, n = votes.most_common(1)[0]
    return lang, n / sum(votes.values())


def inspect_inputs(docs: list[str], qa: list[str], fields: dict[str, str | None], fmt: str = "auto") -> Inspection:
    """Read every Q/A file fully and the document folders' file lists; raise on anything unusable."""
    from retriever.documents import SUPPORTED_SUFFIXES, load_documents

    if not docs and not qa:
        raise RagloraError("give documents (--docs) or Q/A files (--qa), or both")
    found = Inspection()
    texts: list[str] = []
    for path in docs:
        p = Path(path)
        if not p.exists():
            raise RagloraError(f"--docs {path}: no such file or folder")
        files = [p] if p.is_file() else [f for f in sorted(p.rglob("*")) if f.is_file()]
        usable = [f for f in files if f.suffix.lower() in SUPPORTED_SUFFIXES]
        if not usable:
            raise RagloraError(
                f"--docs {path}: no supported documents ({', '.join(sorted(SUPPORTED_SUFFIXES))}) in {len(files)} file(s)"
            )
        for f in usable:
            found.doc_files[f.suffix.lower()] = found.doc_files.get(f.suffix.lower(), 0) + 1
        loaded, warnings = load_documents([p])
        found.doc_warnings += warnings
        texts += [d.text[:500] for d in loaded[:LANGUAGE_SAMPLE]]
    names: list[str] = []
    for path in qa:
        name = _source_name(path, names)
        names.append(name)
        rows, report = load_source(name=name, path=str(path), fmt=fmt, **{f"{k}_field": v for k, v in fields.items()})
        found.qa.append(report)
        texts += [r["question"] or r["messages"][0]["content"] for r in rows[:LANGUAGE_SAMPLE]]
    found.language, found.language_share = detect_language(texts)
    return found


def _source_name(path: str, taken: list[str]) -> str:
    """A config-safe source name from the file name, unique among `taken`."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "-" for c in Path(path).stem)
    stem = stem.strip("-._") or "qa"
    name, n = stem, 2
    while name in taken or name == "general":
        name, n = f"{stem}-{n}", n + 1
    return name


def parse_subdomain(spec: str | None) -> tuple[str, list[str]] | None:
    """`category=heat-pumps,boilers` -> ("category", ["heat-pumps", "boilers"])."""
    if not spec:
        return None
    key, sep, values = spec.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not vals:
        raise RagloraError(
            f"--subdomain expects FIELD=VALUE[,VALUE...], e.g. category=heat-pumps,boilers; got {spec!r}"
        )
    return key.strip(), vals


def _filter_field(name: str, reports: list[SourceReport]) -> str:
    """The row field a `--subdomain FIELD=...` filter means: a mapped column ("Product line", any case) is its role
    (category, source, id); another column of a Q/A file stays as it is; anything else is an error."""
    for rep in reports:
        for role, column in rep.fields.items():
            if role in ("category", "source", "id") and column and name.lower() in (column.lower(), role):
                return role
    if any(name in rep.columns for rep in reports):
        return name
    if name == "category":
        raise RagloraError("--subdomain category=...: the Q/A files have no category column (give --category-field)")
    columns = sorted({c for rep in reports for c in rep.columns})
    raise RagloraError(f"--subdomain: no column {name!r} in the Q/A files (columns: {', '.join(columns[:15])})")


def _rel(path: str | Path, project: Path) -> str:
    return os.path.relpath(Path(path).resolve(), project.resolve())


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # a bare scalar is dumped as a document ending in "..."


def render_config(
    project: Path,
    *,
    name: str,
    description: str,
    docs: list[str],
    qa: list[SourceReport],
    fields: dict[str, str | None],
    fmt: str,
    language: str,
    subdomain: tuple[str, list[str]] | None,
    base: str,
) -> str:
    """DIR/raglora.yaml text: every section of the schema, commented, paths relative to DIR."""
    qa_is_kb = not docs  # without documents, the Q/A answers are the knowledge base
    index_docs = [_rel(d, project) for d in docs] + (["data/kb"] if qa_is_kb and qa else [])
    src_lines = ["    - name: general                 # packaged general conversation: first stage and replay",
                 f"      path: {GENERAL_SOURCE}"]  # fmt: skip
    for rep in qa:
        src_lines += [
            f"    - name: {rep.name}",
            f"      path: {_flow(_rel(rep.path, project))}",
            f"      format: {fmt}",
        ]
        for role in ("question", "answer", "id", "category", "source"):
            value = fields.get(role) or rep.fields.get(role)
            src_lines.append(f"      {role}_field: {_flow(value) if value else 'null'}")
        src_lines.append(f"      kb: {'true' if qa_is_kb else 'false'}" + ("                     # no --docs: the answers are the knowledge base" if qa_is_kb else ""))  # fmt: skip
    qa_names = [r.name for r in qa]
    stages = [
        "    - name: general",
        "      kind: chat",
        "      sources: [general]",
        "      max_steps: 15",
        "      lr: 5.0e-4",
    ]
    eval_sets = ['    general: {from: "held_out:general", limit: 50}   # forgetting, measured on answers']
    if qa_names:
        stages += ["    - name: domain", "      kind: chat", f"      sources: {_flow(qa_names)}"]
        if subdomain:
            stages.append(
                f"      where_not: {_flow({subdomain[0]: subdomain[1]})}   # the subdomain stage brings these"
            )
        stages += ["      max_steps: 30", "      lr: 8.0e-4", "      replay_fraction: 0.1        # earlier stages' rows mixed in against forgetting"]  # fmt: skip
        stages += ["      raft: true                  # gold passage + distractors in the prompt" if docs or qa_is_kb else "      raft: false", "      raft_fraction: 0.3"]  # fmt: skip
        eval_sets.insert(0, '    domain: {from: "held_out:domain", limit: 50}')
        if subdomain:
            stages += ["    - name: subdomain", "      kind: chat", f"      sources: {_flow(qa_names)}",
                       f"      where: {_flow({subdomain[0]: subdomain[1]})}", "      max_steps: 12", "      lr: 5.0e-4",
                       "      replay_fraction: 0.1", "      raft: true", "      raft_fraction: 0.3"]  # fmt: skip
            eval_sets.insert(1, '    subdomain: {from: "held_out:subdomain", limit: 50}')
    elif docs:
        stages += ["    - name: docs                    # no Q/A data: continued pre-training on the documents",
                   "      kind: text", "      max_steps: 30", "      lr: 2.0e-4"]  # fmt: skip
    if qa_names:  # the held-out questions asked with their gold passages removed from retrieval: hand over
        held_out = ["domain", *(["subdomain"] if subdomain else [])]
        eval_sets += [f'    gold_removed_{s}: {{from: "gold_removed:{s}", limit: 30}}' for s in held_out]
    eval_sets.append("    out_of_kb: {from: out_of_kb, limit: 30}   # the right reply is a hand-over")
    eval_sets.append(
        "    # near_domain: {from: near_domain.jsonl, kind: near_domain}   # optional: questions no document answers"
    )
    return TEMPLATE.format(
        name=_flow(name),
        description=_flow(description),
        sources="\n".join(src_lines),
        docs=_flow(index_docs),
        language=language,
        base=_flow(base),
        stages="\n".join(stages),
        eval_sets="\n".join(eval_sets),
        no_answer_reply=_flow(REFUSAL_ANSWER),
        handoff_reply=_flow(HANDOFF_REPLY),
    )


TEMPLATE = """\
# raglora project written by `raglora init`. Same schema as configs/default.yaml; every field is validated.
# Launch: raglora demo --config {{this file}}   (data -> index -> finetune -> eval), then raglora serve --config ...
# Relative paths are relative to this file's folder: everything the pipeline writes stays in it.

project:
  name: {name}
  description: {description}        # one line on what the company does; fills the persona prompt
  no_answer_reply: {no_answer_reply}   # when the documents do not cover it
  handoff_reply: {handoff_reply}   # when the customer asks for a person

paths:
  data_dir: data                  # written by `raglora data`
  artifacts_dir: artifacts
  index_dir: artifacts/index
  adapters_dir: artifacts/adapters
  base_cache_dir: artifacts/base
  reports_dir: reports
  gate_dir: artifacts/gate        # the answerability gate, written by `raglora gate`

data:
  seed: 13
  test_fraction: 0.15             # per category; held out from every training stage
  validation_fraction: 0.1
  sources:
{sources}
  out_of_kb_file: null            # a file of questions your documents do not answer; null: generic ones

index:
  docs: {docs}
  embedder: packaged:all-mpnet-base-v2  # or packaged:all-MiniLM-L6-v2 (6x cheaper), any sentence-transformers name or path
  chunk_size: 800
  chunk_overlap: 100
  faq_include_question: false
  index_type: auto                # auto (flat <50k chunks, ivf <5M, ivfpq above) | flat | ivf | hnsw | ivfpq
  batch_size: 64
  language: {language}                    # detected by init; BM25 stemming and stop words

retrieval:
  k: 3
  mode: dense                     # dense | bm25 | hybrid
  rrf_k: 60
  dense_weight: 1.0
  bm25_weight: 1.0
  candidates: 50

model:
  base: {base}   # or any HF causal-LM id / local folder
  device: auto
  dtype: auto
  load_in_4bit: false
  max_length: 512                 # tokens per training example: a RAFT row with 3 passages fits

finetune:
  seed: 42
  continue_previous_adapter: false
  group_by_length: true
  packing: false
  gradient_checkpointing: false
  save_minutes: 5.0               # checkpoint interval (and on Ctrl-C); --resume continues
  lora:
    method: lora
    r: 16
    lora_alpha: 32                # usually alpha = 2 * r
    lora_dropout: 0.05
    target_modules: [q_proj, k_proj, v_proj, o_proj]
    use_dora: false
    use_rslora: false
  # Step counts are sized for a CPU run of minutes; on a GPU drop max_steps and use epochs.
  stages:
{stages}

serve:
  host: 127.0.0.1
  port: 8000
  api_keys: []                    # or RAGLORA_API_KEYS; without keys the server binds to loopback only
  rate_limit_per_minute: 60
  db_path: artifacts/conversations.db
  batching: true
  batch_wait_ms: 10
  max_batch_size: 16
  adapter_strategy: cumulative    # one base + one LoRA per stage (its chain); merged: a copy per stage; or stack
  prefill_chunk_tokens: 256       # a joining prompt is prefilled in chunks this size between decode steps
  generator: local                # openai: token generation by vLLM / llama.cpp server / TGI at upstream_url
  # upstream_url: http://gpu-box:8000/v1   # with generator: openai (stages exported by `raglora export`)
  # db_url: postgresql+psycopg://user@db/raglora   # a store shared by several API replicas (default: db_path)
  client_system: append           # clients' system messages: append after the project's prompt, or reject (400)
  handoff_threshold: 0.3          # best dense cosine below this: hand over to a person
  default_mode: rag+lora
  default_stage: null             # null: the deepest trained stage

gate:                             # the answerability gate (`raglora gate`): answer from the documents or hand over
  target_false_refusal: 0.05      # threshold: refuse at most this share of answerable validation questions
  min_per_class: 20               # fewer examples: no gate, serve.handoff_threshold is used
  max_off_topic: 100
  seed: 13

eval:
  arms: [base, rag, lora, rag+lora, oracle]
  sets:
{eval_sets}
  max_new_tokens: 48
  batch_size: 16
  speedup_questions: 16            # answered one at a time and as one batch (= batch_size): the speed-up
"""


def init_project(
    project: str | Path,
    *,
    docs: list[str],
    qa: list[str],
    name: str,
    description: str = "",
    fields: dict[str, str | None] | None = None,
    fmt: str = "auto",
    subdomain: str | None = None,
    language: str | None = None,
    base: str = "packaged:smollm2-135m-instruct",
    force: bool = False,
) -> tuple[Path, Inspection]:
    """Inspect the inputs, then write PROJECT/raglora.yaml; an existing one is kept unless `force`."""
    from pipeline.config import load_config

    fields = fields or {}
    out_dir = Path(project)
    target = out_dir / CONFIG_NAME
    if target.exists() and not force:
        raise RagloraError(f"{target} already exists; pass --force to overwrite it")
    sub = parse_subdomain(subdomain)
    found = inspect_inputs(docs, qa, fields, fmt)
    if sub and not found.qa:
        raise RagloraError("--subdomain needs Q/A files (--qa) to split")
    if sub:
        sub = (_filter_field(sub[0], found.qa), sub[1])
        if sub[0] == "category":
            seen = {c for rep in found.qa for c in rep.categories}
            unknown = [v for v in sub[1] if v not in seen]
            if unknown:
                raise RagloraError(
                    f"--subdomain: categor{'y' if len(unknown) == 1 else 'ies'} {unknown} not in the data "
                    f"(seen: {', '.join(sorted(seen)[:15])})"
                )
    if language is not None and not re.fullmatch(r"[a-z]{2}", language):
        raise RagloraError(f"--language expects a two-letter ISO 639-1 code such as en, sv or de; got {language!r}")
    lang = language or found.language
    text = render_config(
        out_dir, name=name, description=description, docs=docs, qa=found.qa, fields=fields, fmt=fmt,
        language=lang, subdomain=sub, base=base,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    from raglora.files import atomic_write_text

    tmp = out_dir / f".{CONFIG_NAME}.check"
    tmp.write_text(text, encoding="utf-8")
    try:
        load_config(tmp)  # what we write must load; a failure here is our bug, never the user's file
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(target, text)
    found.language = lang
    return target, found


def describe(found: Inspection, target: Path) -> str:
    """What init understood, and the next commands."""
    lines = []
    for ext, n in sorted(found.doc_files.items()):
        lines.append(f"documents: {n} {ext} file(s)")
    for w in found.doc_warnings[:5]:
        lines.append(f"  warning: {w}")
    for rep in found.qa:
        mapping = ", ".join(f"{k}={v}" for k, v in rep.fields.items() if v) or "(conversation format)"
        lines.append(f"Q/A {rep.path}: {rep.format}, {rep.rows} usable rows; fields {mapping}")
        missing = [k for k in ("id", "category", "source") if rep.format == "qa" and not rep.fields.get(k)]
        if missing:
            lines.append(f"  no {', '.join(missing)} column: " + ("ids are content hashes; " if "id" in missing else "") + "see --help to map them")  # fmt: skip
        if rep.categories:
            top = sorted(rep.categories.items(), key=lambda kv: -kv[1])[:10]
            lines.append(f"  categories ({len(rep.categories)}): " + ", ".join(f"{k} ({v})" for k, v in top))
        if rep.n_skipped:
            lines.append(f"  could not use {rep.n_skipped} row(s), e.g. " + "; ".join(rep.skipped[:3]))
    lines.append(
        f"language: {found.language}"
        + (f" ({found.language_share:.0%} of sampled texts)" if found.language_share else "")
    )
    lines.append(f"wrote {target}")
    lines.append("next:")
    lines.append(f"  raglora demo --config {target}     # data -> index -> finetune -> eval, prints the report path")
    lines.append(f"  raglora serve --config {target}    # the chat API and chat page")
    return "\n".join(lines)
