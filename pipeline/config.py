"""Typed configuration: one YAML file validated by pydantic, with `--set a.b=value` overrides.

Each package owns the models for its own section (retriever.config, finetune.config); this module
composes them into the root `Config` and turns every load/validation problem into one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.config import FinetuneConfig, ModelConfig
from finetune.prompt import HANDOFF_REPLY, REFUSAL_ANSWER
from pipeline.api.settings import ServeConfig
from pipeline.sources import GENERAL_SOURCE, OUT_OF_KB_FILE
from raglora.errors import RagloraError
from retriever.config import IndexConfig, RetrievalConfig

DEFAULT_CONFIG = "configs/default.yaml"


class PathsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str = "data"
    artifacts_dir: str = "artifacts"
    index_dir: str = "artifacts/index"
    adapters_dir: str = "artifacts/adapters"
    base_cache_dir: str = "artifacts/base"
    reports_dir: str = "reports"
    gate_dir: str = "artifacts/gate"  # the answerability gate (`raglora gate`)


SourceFormat = Literal["auto", "qa", "alpaca", "sharegpt", "messages"]


class ProjectConfig(BaseModel):
    """Who the bot speaks for: fills the persona prompts and the hand-off replies."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("our company", min_length=1)  # e.g. "Acme Heating"
    description: str = ""  # one line on what the company does, e.g. "installs heat pumps and boilers"
    # Said when the documents do not cover the question (serving's hand-off and refusal training targets).
    no_answer_reply: str = Field(REFUSAL_ANSWER, min_length=1)
    # Said when the customer asks for a person.
    handoff_reply: str = Field(HANDOFF_REPLY, min_length=1)


class SourceConfig(BaseModel):
    """One Q/A or conversation file (JSONL, JSON or CSV), or a packaged source (`packaged:<name>`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str = Field(min_length=1)  # relative to the config file's folder, absolute, or packaged:<name>
    format: SourceFormat = "auto"  # auto: detected per file (qa with the field mapping below, alpaca, ...)
    # qa format: which column/key holds what; None = detected from common names (question/q/subject/...).
    question_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None  # missing ids get a stable content hash
    category_field: str | None = None
    source_field: str | None = None  # the document or section that supports the answer (gold passage)
    kb: bool = False  # also write the rows to <data_dir>/kb/<name>.jsonl, so `raglora index` can index them


class DataConfig(BaseModel):
    """How `raglora data` turns `sources` into the per-stage splits under `paths.data_dir`."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 13
    test_fraction: float = Field(0.15, gt=0, lt=0.5)  # per category (when the rows have one); held out everywhere
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    sources: list[SourceConfig] = []
    # Questions the knowledge base does not answer (the right reply is a hand-over): a JSONL/JSON/CSV file with a
    # question column. None: built generically from packaged general-knowledge and other-domain questions.
    out_of_kb_file: str | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source names {dupes}")
        return self


EvalKind = Literal["kb", "gold_removed", "near_domain", "out_of_kb", "general"]
#: Kinds whose right reply is a hand-over (unanswerable from the documents as retrieval sees them).
UNANSWERABLE_KINDS = ("gold_removed", "near_domain", "out_of_kb")


class EvalSetConfig(BaseModel):
    """One evaluation set: `from` is `held_out:<stage>` (that stage's test split), `gold_removed:<stage>` (the same
    rows asked with their gold chunks removed from retrieval), `out_of_kb` (the data step's off-topic questions)
    or a file; `kind` says how it is scored (default: inferred)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", min_length=1)
    # kb: answerable from the documents; gold_removed: held-out Q/A rows asked with their gold chunks removed from
    # retrieval (right reply: hand-over); near_domain: a file of in-domain-sounding questions no document answers
    # (right reply: hand-over); out_of_kb: off topic (right reply: hand-over); general: no documents, measures
    # forgetting of the closed-book arms. None: gold_removed for `gold_removed:<stage>`, out_of_kb for `out_of_kb`
    # and files without answers, general for a stage trained only on packaged general conversation, else kb.
    kind: EvalKind | None = None
    limit: int | None = Field(None, ge=0)  # first N rows (files are sorted by id); 0 switches the set off


class EvalConfig(BaseModel):
    """The `eval` section: which arms, which test sets, how long the answers."""

    model_config = ConfigDict(extra="forbid")

    arms: list[str] = ["base", "rag", "lora", "rag+lora", "oracle"]  # lora / rag+lora expand to every stage
    stages: list[str] | None = None  # default: every trained stage
    # name -> set; {} = held_out:<stage> for every chat stage, gold_removed:<stage> for those that are not general
    # conversation, plus out_of_kb.
    sets: dict[str, EvalSetConfig] = {}
    max_questions: int = Field(50, ge=1)  # cap per set when the set has no limit of its own
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)
    # answered one at a time and batched, to report the speed-up; as many as one batch holds (batch_size), so the
    # figure is the speed-up evaluation itself gets
    speedup_questions: int = Field(16, ge=0)
    bootstrap_resamples: int = Field(1000, gt=0)
    # pairs that calibrate the judge when serving has none (else serve.judge_calibration_pairs, as serving does)
    calibration_pairs: int = Field(60, ge=0)
    examples: int = Field(5, ge=0)

    @field_validator("sets", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        """`domain: held_out:domain` is short for `domain: {from: held_out:domain}`."""
        if isinstance(v, dict):
            return {k: {"from": val} if isinstance(val, str) else val for k, val in v.items()}
        return v


class GateConfig(BaseModel):
    """The `gate` section: how `raglora gate` fits the answerability gate (pipeline/gate.py) on validation data."""

    model_config = ConfigDict(extra="forbid")

    # The threshold is the highest whose share of refused answerable validation questions is at most this.
    target_false_refusal: float = Field(0.05, ge=0, lt=1)
    # Fewer examples than this in a class (answerable / unanswerable): no gate, serve.handoff_threshold is used.
    min_per_class: int = Field(20, ge=2)
    max_off_topic: int = Field(100, ge=0)  # off-topic train questions sampled as unanswerable examples
    seed: int = 13


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: ProjectConfig = ProjectConfig()
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    index: IndexConfig = IndexConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    serve: ServeConfig = ServeConfig()
    gate: GateConfig = GateConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        """Names that point across sections must exist: stage sources, held-out sets, the default stage. RAFT
        retrieves as served (retrieval.mode) unless a stage sets raft_search_mode."""
        sources = {s.name for s in self.data.sources}
        stages = [s.name for s in self.finetune.stages]
        for stage in self.finetune.stages:
            if stage.raft_search_mode is None:
                stage.raft_search_mode = self.retrieval.mode
            unknown = [n for n in stage.sources if n not in sources]
            if unknown:
                known = ", ".join(sorted(sources)) or "none: add data.sources"
                raise ValueError(
                    f"finetune.stages[{stage.name}].sources: unknown source {unknown[0]!r} (known: {known})"
                )
        for name, spec in self.eval.sets.items():
            if spec.from_.startswith(("held_out:", "gold_removed:")) and spec.from_.split(":", 1)[1] not in stages:
                raise ValueError(f"eval.sets.{name}: {spec.from_!r} names no stage (stages: {', '.join(stages)})")
        if self.serve.default_stage is not None and stages and self.serve.default_stage not in stages:
            raise ValueError(f"serve.default_stage: {self.serve.default_stage!r} is not a stage ({', '.join(stages)})")
        return self


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML so numbers and lists work."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise RagloraError(f"--set expects KEY=VALUE (e.g. retrieval.k=3), got {assignment!r}")
    node: Any = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # finetune.stages.1.max_steps: a list index
            node = _list_item(node, part, key)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise RagloraError(f"--set {key}: {part!r} is not a section")
        node = child
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise RagloraError(f"--set {key}: value {value!r} is not valid YAML ({exc.problem})") from None
    if isinstance(node, list):
        node[_index(node, parts[-1], key)] = parsed
    else:
        node[parts[-1]] = parsed


def _index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise RagloraError(f"--set {key}: {part!r} is not an index of a list with {len(items)} items")
    return int(part)


def _list_item(items: list, part: str, key: str) -> Any:
    item = items[_index(items, part, key)]
    if not isinstance(item, dict | list):
        raise RagloraError(f"--set {key}: item {part} is not a section")
    return item


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One readable line per bad field: `config FILE: index.chunk_size: Input should be > 0 (got -1)`."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        lines.append(f"config {source}: {field}: {err['msg']}{got}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or only defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise RagloraError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RagloraError(f"config {p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        except UnicodeDecodeError:
            raise RagloraError(f"config {p}: not UTF-8 text") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RagloraError(f"config {p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
        # Paths in a file are relative to the file's folder (so `mybot/raglora.yaml` works from anywhere);
        # paths given with --set are relative to the working directory, as typed.
        raw = resolve_paths(_validate(raw, source), p.resolve().parent).model_dump(mode="json", by_alias=True)
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    return _validate(raw, source)


def _validate(raw: dict, source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise RagloraError(format_validation_error(exc, source)) from None


def _join(base: Path, value: str | None, *, only_if_exists: bool = False) -> str | None:
    if value is None or value.startswith("packaged:") or Path(value).is_absolute():
        return value
    joined = base / value
    if only_if_exists and not joined.exists():
        return value  # a model id such as HuggingFaceTB/SmolLM2-135M-Instruct, not a local folder
    return str(Path(os.path.normpath(joined)))


def resolve_paths(cfg: Config, base: Path) -> Config:
    """A copy of `cfg` with every relative path made absolute against `base` (the config file's folder).

    Stage train/validation files stay relative: they are relative to paths.data_dir by design.
    """
    cfg = cfg.model_copy(deep=True)
    for name in PathsConfig.model_fields:
        setattr(cfg.paths, name, _join(base, getattr(cfg.paths, name)))
    cfg.index.docs = [_join(base, d) for d in cfg.index.docs]
    cfg.index.embedder = _join(base, cfg.index.embedder, only_if_exists=True)
    if cfg.retrieval.reranker:
        cfg.retrieval.reranker = _join(base, cfg.retrieval.reranker, only_if_exists=True)
    cfg.model.base = _join(base, cfg.model.base, only_if_exists=True)
    cfg.model.system_prompt_file = _join(base, cfg.model.system_prompt_file)
    cfg.model.rag_system_prompt_file = _join(base, cfg.model.rag_system_prompt_file)
    for src in cfg.data.sources:
        src.path = _join(base, src.path)
    cfg.data.out_of_kb_file = _join(base, cfg.data.out_of_kb_file)
    for spec in cfg.eval.sets.values():
        if not spec.from_.startswith(("held_out:", "gold_removed:")) and spec.from_ != "out_of_kb":
            spec.from_ = _join(base, spec.from_)
    cfg.serve.db_path = _join(base, cfg.serve.db_path)
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, written beside every artifact."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)


class EvalSet(BaseModel):
    """An evaluation set resolved against the config: the file to read and how to score it."""

    name: str
    path: str
    kind: EvalKind
    limit: int
    stage: str | None = None  # the stage a held_out:<stage> / gold_removed:<stage> set is held out of


def resolve_eval_sets(cfg: Config, limit: int | None = None) -> list[EvalSet]:
    """eval.sets (or the default: held_out:<stage> for every chat stage, gold_removed:<stage> for those that are not
    general conversation, plus out_of_kb) as files and kinds.

    `limit` (the CLI's --limit) caps every set on top of its own limit.
    """
    data = Path(cfg.paths.data_dir)
    stages = {s.name: s for s in cfg.finetune.stages}
    sources = {s.name: s.path for s in cfg.data.sources}

    def general(stage) -> bool:
        return bool(stage.sources) and all(sources.get(s) == GENERAL_SOURCE for s in stage.sources)

    chat = [s for s in cfg.finetune.stages if s.kind == "chat"]
    specs = cfg.eval.sets or {
        **{s.name: EvalSetConfig(**{"from": f"held_out:{s.name}"}) for s in chat},
        **{
            f"gold_removed_{s.name}": EvalSetConfig(**{"from": f"gold_removed:{s.name}"})
            for s in chat
            if not general(s)
        },
        "out_of_kb": EvalSetConfig(**{"from": "out_of_kb"}),
    }
    out = []
    for name, spec in specs.items():
        stage_name = None
        if spec.from_.startswith(("held_out:", "gold_removed:")):
            stage = stages[spec.from_.split(":", 1)[1]]
            stage_name, path = stage.name, data / stage.name / "test.jsonl"
            if spec.from_.startswith("gold_removed:"):
                kind = "gold_removed"  # the rows are answerable; what makes them unanswerable is the removal
            else:
                kind = spec.kind or ("general" if general(stage) else "kb")
        elif spec.from_ == "out_of_kb":
            path, kind = data / OUT_OF_KB_FILE, spec.kind or "out_of_kb"
        else:
            path, kind = Path(spec.from_), spec.kind or "kb"  # a file without answers is scored as out_of_kb
        n = cfg.eval.max_questions if spec.limit is None else spec.limit
        if limit is not None:
            n = min(n, limit)
        if n > 0:
            out.append(EvalSet(name=name, path=str(path), kind=kind, limit=n, stage=stage_name))
    return out
