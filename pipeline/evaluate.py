"""`raglora eval`: what does retrieval buy, what does fine-tuning buy, and what do both buy together?

Arms (rows of every table): `base`, `rag`, `lora-<stage>` and `rag+lora-<stage>` for each trained stage, and
`oracle` (the deepest stage given the gold FAQ entry as its only context: the upper bound for generation).
Test sets come from data/ and never entered training: held-out domain and subdomain FAQ questions, questions
outside the knowledge base (the bot should decline and offer a human), and the general set (forgetting).

Generation is batched through the serving `Generator` (left padding, KV cache, greedy), with prompts sorted by
length so a batch wastes little on padding. Every metric gets a 95% bootstrap interval (pipeline.metrics).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pipeline import metrics as M
from retriever.errors import RagloraError

TEST_SETS = {
    "domain": "held-out FAQ questions outside the subdomain categories (data/domain/test.jsonl)",
    "subdomain": "held-out FAQ questions in the subdomain categories (data/subdomain/test.jsonl)",
    "out_of_kb": "questions outside the knowledge base; the right answer is a refusal (data/eval/out_of_kb.jsonl)",
    "general": "held-out general conversation (data/general/test.jsonl), for forgetting",
}
QUALITY = ("token_f1", "rouge_l", "semantic_similarity")
RAG_METRICS = ("groundedness", "citation_precision", "has_citation", "hit@1", "hit@5", "mrr")


class EvalConfig(BaseModel):
    """The `eval` section: which arms, how many questions, how long the answers."""

    model_config = ConfigDict(extra="forbid")

    arms: list[str] = ["base", "rag", "lora", "rag+lora", "oracle"]  # lora / rag+lora expand to every stage
    stages: list[str] | None = None  # default: every trained stage
    max_questions: dict[str, int] = {"domain": 20, "subdomain": 12, "out_of_kb": 12, "general": 12}
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)
    speedup_questions: int = Field(8, ge=0)  # answered one at a time and batched, to report the speed-up
    bootstrap_resamples: int = Field(1000, gt=0)
    calibration_pairs: int = Field(60, ge=0)
    examples: int = Field(5, ge=0)


# -- data ---------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise RagloraError(f"test set {path} is missing: run `make data`")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RagloraError(f"{path}: line {n} is not valid JSON") from None
    return rows


def load_test_sets(data_dir: str | Path, max_questions: dict[str, int]) -> tuple[dict[str, list[dict]], list[str]]:
    """{set: [{id, question, reference, gold}]} (first n rows of each, files are sorted by id) and notes."""
    data = Path(data_dir)
    raw = {
        "domain": _read_jsonl(data / "domain" / "test.jsonl"),
        "subdomain": _read_jsonl(data / "subdomain" / "test.jsonl"),
        "out_of_kb": _read_jsonl(data / "eval" / "out_of_kb.jsonl"),
        "general": _read_jsonl(data / "general" / "test.jsonl"),
    }
    sets, notes = {}, []
    for name, rows in raw.items():
        out = []
        for r in rows:
            question = r.get("question") or (r.get("messages") or [{}])[0].get("content")
            reference = r.get("answer") if "answer" in r else None
            if reference is None and name == "general" and len(r.get("messages", [])) > 1:
                reference = r["messages"][1]["content"]
            if not question or (reference is None and name != "out_of_kb"):
                notes.append(f"{name}: row {r.get('id')} has no question or reference; skipped")
                continue
            out.append({"id": r["id"], "question": question, "reference": reference, "gold": r.get("faq_id")})
        limit = max_questions.get(name, len(out) or 1)
        if limit <= 0:
            continue  # switched off in config
        if not out:
            raise RagloraError(f"test set {name!r} is empty: run `make data`")
        sets[name] = out[:limit]
    return sets, notes


# -- arms ---------------------------------------------------------------------------------------------------


def plan_arms(
    requested: list[str], stages: list[str], *, has_index: bool, oracle_ok: bool
) -> tuple[dict[str, dict], dict[str, str]]:
    """Expand arm names into {name: {mode, stage, oracle}} plus {name: reason} for the arms that cannot run."""
    arms: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    no_index = "no index: run `make index`"
    no_adapters = "no trained stage adapters: run `make finetune`"
    for arm in requested:
        if arm in ("base", "rag"):
            if arm == "rag" and not has_index:
                skipped[arm] = no_index
            else:
                arms[arm] = {"mode": arm, "stage": None, "oracle": False}
        elif arm in ("lora", "rag+lora"):
            if not stages:
                skipped[arm] = no_adapters
            for stage in stages:
                if arm == "rag+lora" and not has_index:
                    skipped[f"{arm}-{stage}"] = no_index
                else:
                    arms[f"{arm}-{stage}"] = {"mode": arm, "stage": stage, "oracle": False}
        elif arm == "oracle":
            if not oracle_ok:
                skipped[arm] = "needs the knowledge base data/kb/faq.jsonl: run `make data`"
            else:
                # Deepest stage when there is one: the best generator we have, given perfect retrieval.
                arms[arm] = {"mode": "rag+lora" if stages else "rag", "stage": stages[-1] if stages else None}
                arms[arm]["oracle"] = True
        else:
            raise RagloraError(f"eval.arms: unknown arm {arm!r} (known: base, rag, lora, rag+lora, oracle)")
    return arms, skipped


def _arm_sets(arm: dict) -> list[str]:
    """General questions are not in the knowledge base: they measure forgetting of the no-retrieval arms."""
    if arm["oracle"]:
        return ["domain", "subdomain"]
    sets = ["domain", "subdomain", "out_of_kb"]
    return [*sets, "general"] if arm["mode"] in ("base", "lora") else sets


# -- generation -----------------------------------------------------------------------------------------------


def answer_all(service, arm: dict, questions: list[dict], kb: dict[str, dict], params, *, desc: str) -> list[dict]:
    """Prepare every prompt, generate them in length-sorted batches, return one record per question."""
    chunk_text = {c.chunk_id: c.text for c in service.index.chunks} if service.index is not None else {}
    prepared = []
    for q in questions:
        if arm["oracle"]:
            row = kb[q["gold"]]
            gold_ctx = [{"text": row["answer"], "title": row["category"], "source": row["id"], "chunk_id": row["id"]}]
            messages, ids, _, used = service.build_prompt(
                q["question"], gold_ctx, [], service.rag_system_prompt, params.max_new_tokens
            )
            citations = [{"n": 1, "source": row["id"], "title": row["category"], "chunk_id": row["id"], "score": 1.0}]
            contexts = [c["text"] for c in used or []]
            prepared.append({"ids": ids, "citations": citations, "contexts": contexts, "handoff": None})
        else:
            p = service.prepare(
                q["question"], [], mode=arm["mode"], stage=arm["stage"], max_new_tokens=params.max_new_tokens
            )
            contexts = [chunk_text.get(c["chunk_id"], "") for c in p.citations]
            prepared.append(
                {"ids": p.prompt_ids, "citations": p.citations, "contexts": contexts, "handoff": p.handoff_text}
            )
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i]["ids"]))
    handles = {}
    for i in order:
        if prepared[i]["handoff"] is None:
            handles[i] = service.generator.submit(prepared[i]["ids"], stage=arm["stage"], params=params)
    records = []
    for i, q in enumerate(tqdm(questions, desc=desc, unit="q", leave=False)):
        p = prepared[i]
        if i in handles:
            res = handles[i].result()
            text, n_tokens, seconds = res.text.strip(), res.completion_tokens, res.total_s
        else:
            text, n_tokens, seconds = p["handoff"], 0, 0.0
        records.append(
            {
                "id": q["id"],
                "question": q["question"],
                "reference": q["reference"],
                "gold": q["gold"],
                "answer": text,
                "prompt": service.tokenizer.decode(p["ids"]),
                "contexts": p["contexts"],
                "citations": p["citations"],
                "handoff": p["handoff"] is not None,
                "completion_tokens": n_tokens,
                "latency_s": seconds,
            }
        )
    return records


# -- scoring ------------------------------------------------------------------------------------------------


def score_records(records: list[dict], test_set: str, *, rag: bool, embed, threshold: float) -> None:
    """Add `scores` to every record in place (one value per metric; nan where it does not apply)."""
    answered = [r for r in records if r["reference"] is not None]
    if answered and embed is not None:
        sims = M.semantic_similarity(
            embed([r["answer"] or " " for r in answered]), embed([r["reference"] for r in answered])
        )
    else:
        sims = [math.nan] * len(answered)
    sim_of = {id(r): float(s) for r, s in zip(answered, sims, strict=True)}
    for r in records:
        refused = r["handoff"] or M.is_refusal(r["answer"])
        s: dict[str, float] = {"refusal_rate": float(refused)}
        if r["reference"] is not None:
            s["token_f1"] = M.token_f1(r["answer"], r["reference"])
            s["rouge_l"] = M.rouge_l(r["answer"], r["reference"])
            s["semantic_similarity"] = sim_of[id(r)]
        if test_set in ("domain", "subdomain"):
            s["false_refusal_rate"] = float(refused)
            if rag:
                s["groundedness"] = M.groundedness(r["answer"], r["contexts"], embed=embed, threshold=threshold)
                by_number = {c["n"]: c["source"] for c in r["citations"]}
                s["citation_precision"] = M.citation_precision(r["answer"], by_number, r["gold"])
                s["has_citation"] = float(M.has_citation(r["answer"]))
                s.update(M.retrieval_hits([c["source"] for c in r["citations"]], r["gold"], ks=(1, 5)))
        r["scores"] = s


def calibrate_groundedness(kb_rows: list[dict], embed, n_pairs: int, seed: int = 0) -> dict:
    """Label sentence/context pairs from the FAQ itself: a sentence against the rest of its own answer is
    supported, against a random other answer is not. (Against its own full answer the sentence matches itself
    word for word, which calibrates nothing.)"""
    rng = np.random.default_rng(seed)
    rows = [r for r in kb_rows if len(M.split_sentences(r["answer"])) >= 2]
    if n_pairs <= 0 or len(rows) < 3:
        return {"threshold": 0.6, "method": "default threshold 0.6 (no calibration pairs)"}
    picks = rng.choice(len(rows), size=min(n_pairs, len(rows)), replace=False)
    supported, unsupported = [], []
    for i in picks:
        sentences = M.split_sentences(rows[i]["answer"])
        j = int(rng.integers(len(sentences)))
        rest = " ".join(sentences[:j] + sentences[j + 1 :])
        other = rows[int((i + 1 + rng.integers(len(rows) - 1)) % len(rows))]["answer"]
        supported.append((sentences[j], rest))
        unsupported.append((sentences[j], other))
    result = M.calibrate_groundedness_threshold(supported, unsupported, embed)
    result["method"] = (
        "an answer sentence is supported when its best cosine similarity to a retrieved-context sentence reaches the "
        "threshold, or when half its content-word trigrams occur in the context; the threshold maximises balanced "
        f"accuracy on {len(supported)} supported (sentence vs the rest of its own FAQ answer) and {len(unsupported)} "
        "unsupported (sentence vs a random other answer) pairs from the knowledge base"
    )
    return result


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
        metrics = m.get("metrics", {})
        log = stage_dir(adapters_dir, stage) / "train_log.jsonl"
        curve = []
        if log.is_file():
            for line in log.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                if "loss" in row and "step" in row:
                    curve.append([row["step"], row["loss"]])
        out[stage] = {"train_loss_curve": curve, "raft": bool(m.get("config", {}).get("raft", False)), **metrics}
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
        "identical_outputs": single == batched,
    }


def run_evaluation(cfg, *, out_dir: str | Path | None = None, service=None) -> Path:
    """Run every arm on every applicable test set and write reports/<run>/ (results.json, report.md/.html)."""
    from pipeline.answer import build_service
    from pipeline.api.settings import ServeConfig
    from pipeline.generate import SamplingParams
    from pipeline.report import write_report

    ec: EvalConfig = cfg.eval
    sets, notes = load_test_sets(cfg.paths.data_dir, ec.max_questions)
    kb_path = Path(cfg.paths.data_dir) / "kb" / "faq.jsonl"
    kb_rows = _read_jsonl(kb_path) if kb_path.is_file() else []
    kb = {r["id"]: r for r in kb_rows}
    if service is None:
        serve = ServeConfig(
            **{**cfg.serve.model_dump(), "batching": True, "max_batch_size": ec.batch_size, "batch_wait_ms": 50}
        )
        service = build_service(cfg, serve=serve, with_store=False)
    trained = service.models.stage_names
    stages = [s for s in (ec.stages or trained) if s in trained]
    for s in ec.stages or []:
        if s not in trained:
            notes.append(f"stage {s!r} has no trained adapter under {cfg.paths.adapters_dir}: run `make finetune`")
    arms, skipped = plan_arms(ec.arms, stages, has_index=service.index is not None, oracle_ok=bool(kb))
    embedder = service.index.embedder if service.index is not None else None
    if embedder is None:
        from retriever.embedder import load_embedder

        embedder = load_embedder(cfg.index.embedder)

    def embed(texts):
        return embedder.encode(list(texts), batch_size=64)

    calibration = calibrate_groundedness(kb_rows, embed, ec.calibration_pairs)
    threshold = float(calibration.get("threshold", 0.6))
    params = SamplingParams(max_new_tokens=ec.max_new_tokens)
    results_arms: dict[str, dict] = {name: {"skipped": why} for name, why in skipped.items()}
    t_start = time.perf_counter()
    for name, arm in arms.items():
        rag = arm["mode"] in ("rag", "rag+lora")
        records: list[dict] = []
        t0 = time.perf_counter()
        for test_set in _arm_sets(arm):
            if test_set not in sets or (arm["oracle"] and any(q["gold"] not in kb for q in sets[test_set])):
                continue
            recs = answer_all(service, arm, sets[test_set], kb, params, desc=f"{name}/{test_set}")
            for r in recs:
                r["test_set"] = test_set
            score_records(recs, test_set, rag=rag, embed=embed, threshold=threshold)
            records += recs
        seconds = time.perf_counter() - t0
        by_set = {}
        for test_set in dict.fromkeys(r["test_set"] for r in records):
            rows = [r for r in records if r["test_set"] == test_set]
            names = sorted({k for r in rows for k in r["scores"]})
            by_set[test_set] = M.summarize(rows, names, n_resamples=ec.bootstrap_resamples)
        in_domain = [r for r in records if r["test_set"] in ("domain", "subdomain")]
        headline_names = [*QUALITY, "false_refusal_rate", *(RAG_METRICS if rag else ())]
        headline = M.summarize(in_domain, headline_names, n_resamples=ec.bootstrap_resamples)
        if "out_of_kb" in by_set:
            headline["refusal_rate"] = by_set["out_of_kb"]["refusal_rate"]
        latencies = [r["latency_s"] for r in records if not r["handoff"]]
        tokens = sum(r["completion_tokens"] for r in records)
        point, low, high = M.bootstrap_ci(latencies, n_resamples=ec.bootstrap_resamples)
        results_arms[name] = {
            "description": _describe(name, arm),
            "metrics": headline,
            "by_test_set": by_set,
            "latency_s": {
                "mean": point,
                "low": low,
                "high": high,
                "n": len(latencies),
                "p50": float(np.median(latencies)) if latencies else math.nan,
                "p95": float(np.percentile(latencies, 95)) if latencies else math.nan,
            },
            "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
            "wall_s": seconds,
            "answers": records,
        }
    comparisons = _comparisons(results_arms, stages, ec.bootstrap_resamples)
    speed = {}
    if ec.speedup_questions and "domain" in sets:
        speed = measure_speedup(service, sets["domain"][: ec.speedup_questions], params)
        notes.append(
            f"batched generation: {speed['questions']} questions in {speed['batched_s']}s vs {speed['one_at_a_time_s']}s "
            f"one at a time (x{speed['speedup']}); identical outputs: {speed['identical_outputs']}"
        )
    stage_info = _stage_summaries(cfg.paths.adapters_dir, stages) if stages else {}
    forgetting = {}
    for after in ["base", *stages]:
        arm_name = "base" if after == "base" else f"lora-{after}"
        general = results_arms.get(arm_name, {}).get("by_test_set", {}).get("general")
        if general:
            forgetting[after] = {m: general[m] for m in QUALITY if m in general}
    retrieval = {}
    for name, arm in results_arms.items():
        if "metrics" in arm and "hit@5" in arm["metrics"] and name != "oracle":
            retrieval[name] = {m: arm["metrics"][m] for m in ("hit@1", "hit@5", "mrr")}
            break  # every RAG arm retrieves the same chunks: one row says it
    now = datetime.now(timezone.utc)
    run_name = now.strftime("%Y%m%d-%H%M%S")
    data_manifest = Path(cfg.paths.data_dir) / "manifest.json"
    data_version = json.loads(data_manifest.read_text())["dataset_version"] if data_manifest.is_file() else None
    results = {
        "run": {
            "name": run_name,
            "created": now.isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "model": cfg.model.base,
            "data_version": data_version,
            "config": cfg.model_dump(mode="json"),
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "bootstrap": {"n_resamples": ec.bootstrap_resamples, "confidence": 0.95, "seed": 0},
        "test_sets": {k: {"description": TEST_SETS[k], "n": len(v)} for k, v in sets.items()},
        "arms": results_arms,
        "comparisons": comparisons,
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


def _describe(name: str, arm: dict) -> str:
    if arm["oracle"]:
        return f"gold FAQ entry as the only context, {arm['stage'] or 'base'} model (upper bound)"
    parts = {
        "base": "base model, no retrieval",
        "rag": "retrieval + base model",
        "lora": "stage adapter, no retrieval",
        "rag+lora": "retrieval + stage adapter",
    }
    return parts[arm["mode"]] + (f" ({arm['stage']})" if arm["stage"] else "")


def _comparisons(arms: dict, stages: list[str], n_resamples: int) -> list[dict]:
    """Paired differences on token F1 (same questions): what retrieval, fine-tuning, and both buy."""
    deepest = stages[-1] if stages else None
    pairs = [("rag", "base")]
    if deepest:
        pairs += [
            (f"lora-{deepest}", "base"),
            (f"rag+lora-{deepest}", "rag"),
            (f"rag+lora-{deepest}", f"lora-{deepest}"),
        ]
    out = []
    for a, b in pairs:
        if "answers" not in arms.get(a, {}) or "answers" not in arms.get(b, {}):
            continue
        key = lambda r: (r["test_set"], r["id"])  # noqa: E731
        bs = {key(r): r["scores"].get("token_f1", math.nan) for r in arms[b]["answers"]}
        paired = [
            (r["scores"].get("token_f1", math.nan), bs[key(r)])
            for r in arms[a]["answers"]
            if key(r) in bs and r["test_set"] in ("domain", "subdomain")
        ]
        if not paired:
            continue
        diff, low, high = M.paired_bootstrap_diff(
            [p[0] for p in paired], [p[1] for p in paired], n_resamples=n_resamples
        )
        out.append({"a": a, "b": b, "metric": "token_f1", "diff": diff, "low": low, "high": high})
    return out
