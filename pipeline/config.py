"""Typed configuration: one YAML file validated by pydantic, with `--set a.b=value` overrides.

Each package owns the models for its own section (retriever.config, finetune.config); this module
composes them into the root `Config` and turns every load/validation problem into one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.config import FinetuneConfig, ModelConfig
from pipeline.api.settings import ServeConfig
from pipeline.evaluate import EvalConfig
from retriever.config import IndexConfig, RetrievalConfig
from retriever.errors import RagloraError

DEFAULT_CONFIG = "configs/default.yaml"


class PathsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str = "data"
    artifacts_dir: str = "artifacts"
    index_dir: str = "artifacts/index"
    adapters_dir: str = "artifacts/adapters"
    base_cache_dir: str = "artifacts/base"
    reports_dir: str = "reports"


class DataConfig(BaseModel):
    """How `raglora data` materialises the datasets under `paths.data_dir`."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 13
    faq_lang: str = "en"
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    subdomain_categories: list[str] = [
        "bygglov",
        "bbr-pbl",
        "marklov-rivningslov",
        "attefallshus-friggebod",
        "tillbyggnad",
    ]

    @field_validator("faq_lang")
    @classmethod
    def _known_lang(cls, v: str) -> str:
        if v not in ("en", "sv"):
            raise ValueError(f"must be 'en' or 'sv', got {v!r}")
        return v

    @field_validator("subdomain_categories")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one FAQ category")
        return v


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    index: IndexConfig = IndexConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()


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
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise RagloraError(format_validation_error(exc, source)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, written beside every artifact."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
