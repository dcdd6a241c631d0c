"""The answerability gate: a small calibrated classifier on retrieval features that says whether the knowledge base
can answer a question, in place of a fixed cosine threshold.

    features  one hybrid search per question through `Index.search` (so `exclude` and the index's own dense/BM25
              code apply): top-1 dense cosine, the margin to the second, the top BM25 score as a share of the best
              the query could score, dense/BM25 agreement and the top-1's z-score among the candidates.
    fit       scikit-learn logistic regression on standardised features, on VALIDATION data only:
                answerable    validation questions of the knowledge-base sources (kb: true, or a source whose rows
                              name their gold passages in the index, e.g. tickets citing help-centre pages);
                gold_removed  the same questions asked with their gold chunks excluded from retrieval;
                off_topic     TRAIN questions of the other sources (general conversation), never test rows and
                              never the evaluation's out-of-KB file.
              The threshold is the highest one whose false-refusal rate on the answerable questions is at most
              `gate.target_false_refusal`.
    artifact  <paths.gate_dir>/gate.json (scaler, coefficients, threshold; JSON, no pickle) + manifest.json.
              Too few examples in a class: a warning, no gate.json, and serving keeps serve.handoff_threshold.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from raglora.errors import RagloraError
from raglora.files import atomic_replace_dir, file_sha256, read_jsonl

FORMAT = "raglora-gate"
FORMAT_VERSION = 1
GATE_FILE, MANIFEST = "gate.json", "manifest.json"
FEATURES = ("dense_top1", "dense_margin", "bm25_top", "top1_agree", "overlap_at_5", "dense_z")
#: Depth of each ranking the features look at (the score distribution of the top-50 dense candidates).
CANDIDATES = 50
OVERLAP_K = 5
#: A source without `kb: true` counts as knowledge-base questions when more of its rows than this name a gold
#: passage in the index (a ticket export citing help-centre pages); below it, its train rows are off-topic.
IN_DOMAIN_GOLD_SHARE = 0.05
NEGATIVE_KINDS = ("gold_removed", "off_topic")
TRADEOFF_TARGETS = (0.02, 0.05, 0.1, 0.2, 0.3)


# ----------------------------------------------------------------------------------------------- features


def bm25_ceiling(index, query: str) -> float:
    """The most BM25 could ever score `query` in this index: the sum over its terms of idf(term), the limit of a
    term's lucene-BM25 score idf * tf / (tf + k1 * (1 - b + b * len / avg_len)) as tf grows (bm25s's default
    scoring, which the index uses). A term no chunk holds counts with document frequency 0: the rarest possible.

    Why this scale: raw BM25 grows with the number of query terms and with their rarity in the corpus, so "7.3"
    means something different for every query and every knowledge base. top / ceiling is the share of the
    query's weighted terms the best chunk matches, 0..1 for any query and corpus; a question whose distinctive
    words appear nowhere (or only in excluded chunks) scores low even when its common words match well.
    """
    from retriever.search import tokenize

    bm25 = getattr(index, "bm25", None)
    tokens = tokenize([query], index.language)[0]
    if bm25 is None or not tokens:
        return 0.0
    n, indptr = float(bm25.scores["num_docs"]), bm25.scores["indptr"]
    total = 0.0
    for token in tokens:  # bm25s sums a repeated query term once per occurrence; so does the ceiling
        t = bm25.vocab_dict.get(token)
        df = 0.0 if t is None else float(indptr[t + 1] - indptr[t])
        total += math.log(1.0 + (n - df + 0.5) / (df + 0.5))
    return total


def retrieval_features(
    index, query: str, *, exclude: Collection[str] = (), candidates: int = CANDIDATES, overlap_k: int = OVERLAP_K
) -> dict[str, float]:
    """The gate's inputs for one question, from one hybrid search (`exclude`: chunk ids retrieval must not see).

    Asking for 2 * candidates fused hits returns the whole union of the dense and the BM25 top-`candidates`, so
    every score below is exact, whatever the fusion did. Returns {name: value} for every name in FEATURES, plus
    "n_hits" (0: nothing retrievable, the gate then says unanswerable).
    """
    hits = index.search(query, k=2 * candidates, mode="hybrid", candidates=candidates, exclude=exclude)
    dense = sorted(((h.dense_score or 0.0, h.chunk.chunk_id) for h in hits), key=lambda x: -x[0])[:candidates]
    keyword = sorted(((h.bm25_score or 0.0, h.chunk.chunk_id) for h in hits if (h.bm25_score or 0) > 0),
                     key=lambda x: -x[0])[:candidates]  # fmt: skip
    top1 = dense[0][0] if dense else 0.0
    margin = top1 - dense[1][0] if len(dense) > 1 else 0.0
    scores = np.array([s for s, _ in dense], dtype=np.float64)
    std = float(scores.std()) if len(scores) > 1 else 0.0
    z = (top1 - float(scores.mean())) / std if std > 1e-9 else 0.0
    ceiling = bm25_ceiling(index, query) if keyword else 0.0
    bm25_top = keyword[0][0] / ceiling if keyword and ceiling > 0 else 0.0
    k = min(overlap_k, len(dense)) or 1
    overlap = len({c for _, c in dense[:overlap_k]} & {c for _, c in keyword[:overlap_k]}) / k
    agree = float(bool(dense and keyword and dense[0][1] == keyword[0][1]))
    values = [top1, margin, min(bm25_top, 1.0), agree, overlap, z]
    return {**{name: float(v) for name, v in zip(FEATURES, values, strict=True)}, "n_hits": float(len(hits))}


# ---------------------------------------------------------------------------------------------------- gate


@dataclass
class GateDecision:
    answerable: bool
    p_answerable: float
    threshold: float
    features: dict[str, float]


@dataclass
class Gate:
    """A fitted gate: p(answerable) = sigmoid(coef · (x - mean) / scale + intercept); answerable when p >= threshold."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    features: tuple[str, ...] = FEATURES
    candidates: int = CANDIDATES
    overlap_k: int = OVERLAP_K

    def probability(self, features: dict[str, float]) -> float:
        x = np.array([features[name] for name in self.features], dtype=np.float64)
        logit = float(np.dot((x - np.array(self.mean)) / np.array(self.scale), np.array(self.coef)) + self.intercept)
        return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))

    def decide(
        self, index, query: str, *, exclude: Collection[str] = (), retrieval: dict | None = None
    ) -> GateDecision:
        """Whether the knowledge base can answer `query` (`exclude`: chunk ids retrieval must not see).

        `retrieval`: features `retrieval_features` already computed for this query and exclusion (every name in
        FEATURES), so a caller that logs them searches once; anything else (e.g. the `retrieval` config section)
        is not used: the gate always computes its features with the settings it was fitted with.
        """
        given = retrieval if retrieval is not None and all(name in retrieval for name in self.features) else None
        feats = given or retrieval_features(
            index, query, exclude=exclude, candidates=self.candidates, overlap_k=self.overlap_k
        )
        if feats.get("n_hits", 1.0) == 0:  # nothing retrievable: nothing to answer from
            return GateDecision(False, 0.0, self.threshold, dict(feats))
        p = self.probability(feats)
        return GateDecision(p >= self.threshold, p, self.threshold, dict(feats))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "features": list(self.features),
            "candidates": self.candidates,
            "overlap_k": self.overlap_k,
            "scaler": {"mean": self.mean, "scale": self.scale},
            "coef": self.coef,
            "intercept": self.intercept,
            "threshold": self.threshold,
        }


def load_gate(path: str | Path) -> Gate | None:
    """The gate fitted into folder `path` (or the gate.json file itself); None when none was fitted there, so
    serving uses serve.handoff_threshold. A damaged gate.json is an error naming the file."""
    p = Path(path)
    file = p if p.name == GATE_FILE and not p.is_dir() else p / GATE_FILE
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise RagloraError(f"corrupt gate file {file}: {type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("not a raglora gate")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {raw.get('format_version')} (this raglora reads {FORMAT_VERSION})")
        features = tuple(raw["features"])
        if features != FEATURES:
            raise ValueError(f"features {list(features)} are not this raglora's {list(FEATURES)}")
        gate = Gate(
            mean=[float(v) for v in raw["scaler"]["mean"]],
            scale=[float(v) for v in raw["scaler"]["scale"]],
            coef=[float(v) for v in raw["coef"]],
            intercept=float(raw["intercept"]),
            threshold=float(raw["threshold"]),
            features=features,
            candidates=int(raw["candidates"]),
            overlap_k=int(raw["overlap_k"]),
        )
        numbers = [*gate.mean, *gate.scale, *gate.coef, gate.intercept, gate.threshold]
        if not all(len(v) == len(features) for v in (gate.mean, gate.scale, gate.coef)):
            raise ValueError("scaler/coef lengths do not match the features")
        if not all(math.isfinite(v) for v in numbers) or min(gate.scale) <= 0 or not 0 <= gate.threshold <= 1:
            raise ValueError("non-finite numbers, a scale <= 0 or a threshold outside [0, 1]")
        if gate.candidates <= 0 or gate.overlap_k <= 0:
            raise ValueError("candidates and overlap_k must be positive")
    except (KeyError, TypeError, ValueError) as exc:
        raise RagloraError(f"corrupt gate file {file}: {exc}: refit it with `raglora gate`") from None
    return gate


# ----------------------------------------------------------------------------------------------- examples


def _rows(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)] if path.is_file() else []


def _data_file(data_dir: Path, rel: str) -> Path:
    return Path(rel) if Path(rel).is_absolute() else data_dir / rel


def gate_examples(cfg, index, *, gold_finder=None) -> tuple[list[dict], dict]:
    """The questions the gate is fitted on: [{"question", "label" (1 answerable), "kind", "exclude"}] and facts for
    the manifest. Reads <data_dir>/<stage>/{validation,train}.jsonl of the chat stages (written by `raglora data`).
    """
    from retriever.gold import GoldFinder

    finder = gold_finder or GoldFinder(index.chunks)
    data_dir = Path(cfg.paths.data_dir)
    kb_sources = {s.name for s in cfg.data.sources if s.kb}
    validation: dict[str, dict] = {}  # id -> row, each row once (stages may share rows)
    train: dict[str, dict] = {}
    for stage in cfg.finetune.stages:
        if stage.kind != "chat":
            continue
        for split, file, into in (
            ("validation", stage.validation_file, validation),
            ("train", stage.train_file, train),
        ):
            rel = file or f"{stage.name}/{split}.jsonl"
            for row in _rows(_data_file(data_dir, rel)):
                row.setdefault("source_name", f"stage:{stage.name}")
                into.setdefault(str(row.get("id")), row)
    if not validation:
        raise RagloraError(f"no validation rows under {data_dir} for any chat stage: run `raglora data` first")

    def question(row: dict) -> str:
        return (row.get("question") or "").strip()

    def gold(row: dict) -> list[str]:  # as evaluation's gold-removed set removes it
        return finder.all_gold({"id": row.get("id"), "source": row.get("source"), "answer": row.get("answer")})

    gold_of = {rid: gold(r) for rid, r in {**train, **validation}.items() if question(r)}
    by_source: dict[str, list[str]] = {}
    for rid in gold_of:
        row = validation.get(rid) or train[rid]
        by_source.setdefault(row["source_name"], []).append(rid)
    gold_share = {name: sum(bool(gold_of[r]) for r in ids) / len(ids) for name, ids in by_source.items()}
    in_domain = {n for n in by_source if n in kb_sources or gold_share[n] > IN_DOMAIN_GOLD_SHARE}

    examples: list[dict] = []
    seen: set[str] = set()
    for rid, row in sorted(validation.items()):
        q = question(row)
        if not q or row["source_name"] not in in_domain or (row["source_name"] not in kb_sources and not gold_of[rid]):
            continue
        seen.add(q.lower())
        examples.append({"id": rid, "question": q, "label": 1, "kind": "answerable", "exclude": []})
        if gold_of[rid]:
            examples.append({"id": rid, "question": q, "label": 0, "kind": "gold_removed", "exclude": gold_of[rid]})
    off = [
        (rid, question(r))
        for rid, r in sorted(train.items())
        if question(r) and r["source_name"] not in in_domain and not gold_of.get(rid)
    ]
    off = [(rid, q) for rid, q in dict((q.lower(), (rid, q)) for rid, q in off).values() if q.lower() not in seen]
    rng = random.Random(f"{cfg.gate.seed}:off-topic")
    picked = sorted(rng.sample(off, min(cfg.gate.max_off_topic, len(off))))
    examples += [{"id": rid, "question": q, "label": 0, "kind": "off_topic", "exclude": []} for rid, q in picked]
    facts = {
        "answerable_sources": sorted(in_domain),
        "off_topic_sources": sorted(set(by_source) - in_domain),
        "gold_share_per_source": {n: round(v, 3) for n, v in sorted(gold_share.items())},
        "off_topic_available": len(off),
        "answerable_without_gold": sum(1 for e in examples if e["kind"] == "answerable" and not gold_of[e["id"]]),
    }
    return examples, facts


# ----------------------------------------------------------------------------------------------- fitting


def choose_threshold(p_answerable: np.ndarray, target: float) -> float:
    """The highest threshold whose false-refusal rate (share of answerable questions with p < threshold) is at
    most `target`: with the positives' p sorted ascending, the (floor(target * n) + 1)-th smallest."""
    p = np.sort(np.asarray(p_answerable, dtype=np.float64))
    if len(p) == 0:
        raise RagloraError("no answerable questions to choose a threshold on")
    return float(p[min(int(math.floor(target * len(p) + 1e-9)), len(p) - 1)])


def _digest(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def fit_gate(cfg, *, out_dir=None, index=None, progress: bool = True) -> dict:
    """Fit the gate on the project's validation data and write it to `out_dir` (default paths.gate_dir).

    Args: cfg (the root Config), out_dir, index (a loaded Index with its embedder; default: load paths.index_dir),
    progress (a progress bar on stderr). Returns the manifest written (`fitted` False: too few examples, no
    gate.json; serving falls back to serve.handoff_threshold).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from tqdm.auto import tqdm

    gc = cfg.gate
    out = Path(os.path.abspath(out_dir or cfg.paths.gate_dir))
    if index is None:
        index = _open_index(cfg)
    examples, facts = gate_examples(cfg, index)
    y = np.array([ex["label"] for ex in examples], dtype=int)
    kinds = np.array([ex["kind"] for ex in examples])
    counts = {"answerable": int(y.sum()), "unanswerable": int((y == 0).sum())}
    counts.update({k: int((kinds == k).sum()) for k in NEGATIVE_KINDS})
    manifest = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fitted_on": "validation questions (answerable, gold removed) + train questions of off-topic sources",
        "n": counts,
        "features": list(FEATURES),
        "config": {**gc.model_dump(mode="json"), "candidates": CANDIDATES, "overlap_k": OVERLAP_K},
        "data_version": _data_version(Path(cfg.paths.data_dir)),
        "index": {"path": str(index.path), "manifest_sha256": _digest(Path(index.path) / "manifest.json")},
        "examples": facts,
    }
    small = [f"{n} {name}" for name, n in (("answerable", counts["answerable"]), ("unanswerable", counts["unanswerable"])) if n < gc.min_per_class]  # fmt: skip
    if small:
        fallback = cfg.serve.handoff_threshold
        manifest.update(
            fitted=False,
            warning=(
                f"too few examples to fit the answerability gate ({', '.join(small)}; gate.min_per_class is "
                f"{gc.min_per_class}): no gate written, serving falls back to serve.handoff_threshold ({fallback})"
            ),
            fallback={"serve.handoff_threshold": fallback},
        )
        _write(out, manifest, None)
        return manifest

    rows = []
    for ex in tqdm(examples, desc="gate features", unit="q", disable=not progress, file=sys.stderr):
        rows.append(retrieval_features(index, ex["question"], exclude=ex["exclude"]))
    x = np.array([[r[name] for name in FEATURES] for r in rows], dtype=np.float64)  # (n questions, n features)
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    model.fit(x, y)
    scaler, lr = model[0], model[1]
    gate = Gate(
        mean=[float(v) for v in scaler.mean_],
        scale=[float(v) for v in scaler.scale_],
        coef=[float(v) for v in lr.coef_[0]],
        intercept=float(lr.intercept_[0]),
        threshold=0.0,
    )
    p = np.array([gate.probability(r) for r in rows])  # the serving code path, so decisions match exactly
    gate.threshold = choose_threshold(p[y == 1], gc.target_false_refusal)
    refused = p < gate.threshold

    def rates(threshold: float) -> dict:
        no = p < threshold
        return {
            "threshold": threshold,
            "false_refusal": float(no[y == 1].mean()),
            **{f"refusal_{k}": float(no[kinds == k].mean()) for k in NEGATIVE_KINDS if (kinds == k).any()},
        }

    folds = min(5, counts["answerable"], counts["unanswerable"])
    cv = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=gc.seed),
                           method="predict_proba")[:, 1]  # fmt: skip
    manifest.update(
        fitted=True,
        auc=float(roc_auc_score(y, p)),
        cv_auc=float(roc_auc_score(y, cv)),
        cv_folds=folds,
        threshold=gate.threshold,
        false_refusal=float(refused[y == 1].mean()),
        refusal={k: float(refused[kinds == k].mean()) for k in NEGATIVE_KINDS if (kinds == k).any()},
        coefficients={name: c for name, c in zip(FEATURES, gate.coef, strict=True)},
        intercept=gate.intercept,
        scaler={"mean": gate.mean, "scale": gate.scale},
        # what other gate.target_false_refusal values would give on the same fit (pick one without refitting)
        tradeoff={f"{t:.2f}": rates(choose_threshold(p[y == 1], t)) for t in TRADEOFF_TARGETS},
    )
    _write(out, manifest, gate)
    return manifest


def stale_reason(gate_dir: str | Path, index_dir: str | Path) -> str | None:
    """Why the gate in `gate_dir` no longer matches the index in `index_dir` (rebuilt since the fit: its features
    were calibrated on other documents), or None when it matches or nothing was fitted."""
    try:
        manifest = json.loads((Path(gate_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fitted_on = (manifest.get("index") or {}).get("manifest_sha256") if isinstance(manifest, dict) else None
    if not manifest.get("fitted") or not fitted_on:
        return None
    if fitted_on != _digest(Path(index_dir) / "manifest.json"):
        return f"the gate in {gate_dir} was fitted on another version of the index {index_dir}: rerun `raglora gate`"
    return None


def _open_index(cfg):
    from retriever.embedder import load_embedder
    from retriever.index import load_index

    if not Path(cfg.paths.index_dir).exists():
        raise RagloraError(f"no index at {cfg.paths.index_dir}: build it with `raglora index` before `raglora gate`")
    return load_index(cfg.paths.index_dir, load_embedder(cfg.index.embedder))


def _data_version(data_dir: Path) -> dict:
    manifest = data_dir / "manifest.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("dataset_version")
    except (OSError, ValueError, AttributeError):
        version = None
    return {"dataset_version": version, "manifest_sha256": _digest(manifest)}


def _write(out: Path, manifest: dict, gate: Gate | None) -> None:
    """Replace `out` whole: gate.json (when fitted) + manifest.json; an unfitted run leaves no stale gate.json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if gate is not None:
            (tmp / GATE_FILE).write_text(json.dumps(gate.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        atomic_replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RagloraError(f"cannot write the gate to {out}: {exc.strerror or exc}") from exc


def describe(manifest: dict) -> str:
    """The CLI's summary lines for a fit_gate manifest."""
    n = manifest["n"]
    counts = f"{n['answerable']} answerable, {n['gold_removed']} gold removed, {n['off_topic']} off topic"
    if not manifest["fitted"]:
        return f"gate not fitted ({counts})"
    refusal = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in manifest["refusal"].items())
    return (
        f"gate fitted on validation: {counts}\n"
        f"  AUC {manifest['auc']:.3f} ({manifest['cv_folds']}-fold cross-validated {manifest['cv_auc']:.3f}), "
        f"threshold p(answerable) >= {manifest['threshold']:.3f}\n"
        f"  at the threshold: refusal {refusal}; false refusal on answerable {manifest['false_refusal']:.2f} "
        f"(target <= {manifest['config']['target_false_refusal']})"
    )
