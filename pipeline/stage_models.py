"""Stage adapters over one base model: which stages are trained (their manifests' parent chains), in which
order, and `StageModels`, which loads the base once and serves any stage without reloading.

Stage N's adapter was trained on base + merged earlier stages (its manifest's `parents`); for LoRA that is exactly
the base with the parents' and the stage's adapters active together (each adds its own low-rank delta to the same
linear layers), so the `stack` strategy activates `[*parents, stage]` on the shared base. The `merged` strategy
instead keeps one pre-merged copy per stage (more memory, no LoRA overhead per token). The `cumulative` strategy
loads one adapter per stage that already is its whole chain (`finetune.export.cumulative_adapter`: the chain's
factors concatenated), so rows of different stages can share one forward through PEFT's mixed-batch
`adapter_names` (`use_rows`). Base modes run under `disable_adapter()` (or as `"__base__"` rows).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from raglora.errors import RagloraError

# -- stage adapters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInfo:
    name: str
    path: Path
    parents: tuple[str, ...]
    method: str = "lora"
    dora: bool = False
    # continue_previous_adapter: this adapter started from that stage's weights (it already holds them), so it
    # comes after that stage although it is not one of its parents.
    initialized_from: str | None = None

    @property
    def chain(self) -> tuple[str, ...]:
        """The adapters that are active together for this stage: its parents, then itself."""
        return (*self.parents, self.name)

    @property
    def after(self) -> tuple[str, ...]:
        """The stages this one was trained after (parents and the stage it was initialized from)."""
        return (*self.parents, self.initialized_from) if self.initialized_from else self.parents


def discover_stages(adapters_dir: str | Path | None) -> list[StageInfo]:
    """Trained stage adapters under `<adapters_dir>/<stage>/` (PEFT folder + manifest.json), in `order_stages`
    order: the names and the order come from the manifests' parent chains, never from a list in the code."""
    if adapters_dir is None or not Path(adapters_dir).is_dir():
        return []
    found: dict[str, StageInfo] = {}
    for sub in sorted(Path(adapters_dir).iterdir()):
        if not (sub / "adapter_config.json").is_file():
            continue
        data: dict = {}
        if (sub / "manifest.json").is_file():
            from finetune.model import read_manifest  # also checks the weights files, naming a corrupt one

            data = read_manifest(adapters_dir, sub.name)
        found[sub.name] = StageInfo(
            sub.name,
            sub,
            tuple(data.get("parents") or ()),
            str(data.get("method", "lora")),
            bool((data.get("lora") or {}).get("use_dora", False)),
            data.get("initialized_from") if isinstance(data.get("initialized_from"), str) else None,
        )
    for info in found.values():
        missing = [p for p in info.parents if p not in found]
        if missing:
            raise RagloraError(
                f"stage adapter {info.name} was trained on top of {', '.join(missing)}, which is not under "
                f"{adapters_dir}: train it first (raglora finetune --stages {','.join(missing)})"
            )
    return order_stages(list(found.values()))


def order_stages(stages: list[StageInfo]) -> list[StageInfo]:
    """Every stage after its parents; among stages whose parents are all placed, by name.

    `general -> domain -> subdomain` stays in that order whatever the names ("basics" -> "heat-pumps" ->
    "heat-pumps.boilers"); sibling branches are interleaved by name. A cycle is a clear error.
    """
    by_name = {s.name: s for s in stages}
    placed: list[StageInfo] = []
    done: set[str] = set()
    pending = sorted(by_name)
    while pending:
        ready = [n for n in pending if all(p in done or p not in by_name for p in by_name[n].after)]
        if not ready:
            raise RagloraError(f"stage adapters {', '.join(pending)} name each other as parents (a cycle)")
        placed.append(by_name[ready[0]])
        done.add(ready[0])
        pending.remove(ready[0])
    return placed


def deepest_stage(stages: list[StageInfo]) -> str | None:
    """The end of the longest chain of stages trained one after another (ties: the first by name); None when
    nothing is trained."""
    by_name = {s.name: s for s in stages}
    depth: dict[str, int] = {}
    for info in order_stages(stages):  # parents first, so their depth is known
        depth[info.name] = 1 + max((depth.get(p, 0) for p in info.after if p in by_name), default=0)
    return min(depth, key=lambda name: (-depth[name], name)) if depth else None


STRATEGIES = ("stack", "merged", "cumulative")
BASE_ROW = "__base__"  # PEFT's adapter name for rows that run on the plain base in a mixed batch


class StageSet:
    """The trained stages by name (`stages`), in `order_stages` order: what routing needs, whether the weights are
    here (`StageModels`) or in an external engine (`pipeline.upstream.UpstreamModels`)."""

    stages: dict[str, StageInfo]

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)

    @property
    def deepest_stage(self) -> str | None:
        """The end of the longest parent chain: the default stage when `serve.default_stage` is None."""
        return deepest_stage(list(self.stages.values()))

    def check_stage(self, stage: str | None) -> None:
        if stage is not None and stage not in self.stages:
            have = ", ".join(self.stages) or "none trained"
            raise RagloraError(f"stage adapter {stage!r} is not available (have: {have})")


class StageModels(StageSet):
    """The base model plus every stage adapter, loaded once; `use(stage)` switches without reloading.

    `adapter_loads` counts adapter weight loads (tests assert it does not grow when requests switch stage).
    """

    def __init__(
        self,
        model,
        tokenizer,
        adapters_dir: str | Path | None = None,
        *,
        strategy: str = "stack",
        stages: list[StageInfo] | None = None,
    ):
        if strategy not in STRATEGIES:
            raise RagloraError(f"adapter strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.tokenizer = tokenizer
        self.strategy = strategy
        found = order_stages(stages) if stages else discover_stages(adapters_dir)
        self.stages: dict[str, StageInfo] = {s.name: s for s in found}
        self.adapter_loads = 0
        self.switches = 0
        self._active: tuple[str, ...] | None = None
        model.eval()
        self.base = model
        self.peft = None
        self.merged: dict[str, torch.nn.Module] = {}
        if not self.stages:
            return
        for info in self.stages.values():
            if info.method not in ("lora", "ia3"):
                raise RagloraError(f"stage {info.name}: serving {info.method} stages is not supported (LoRA/IA3 only)")
            if strategy in ("stack", "cumulative") and (info.method != "lora" or info.dora):
                verb = "stacked per request" if strategy == "stack" else "served as cumulative adapters"
                raise RagloraError(
                    f"stage {info.name} is {'DoRA' if info.dora else info.method}: only plain LoRA stages can be "
                    f"{verb}; set serve.adapter_strategy=merged"
                )
        if strategy == "stack":
            self.peft = self._load_stacked(model)
        elif strategy == "cumulative":
            self.peft = self._load_cumulative(model)
        else:
            self.merged = {name: self._load_merged(model, info) for name, info in self.stages.items()}

    # Loading ------------------------------------------------------------------------------------------------

    def _load_stacked(self, model):
        from peft import PeftModel

        peft_model = None
        for info in self.stages.values():
            try:
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(
                        model, str(info.path), adapter_name=self.adapter_name(info.name)
                    )
                else:
                    peft_model.load_adapter(str(info.path), adapter_name=self.adapter_name(info.name))
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise RagloraError(f"cannot load stage adapter {info.path}: {exc}") from None
            self.adapter_loads += 1
        peft_model.eval()
        return peft_model

    def _load_cumulative(self, model):
        """One PEFT adapter per stage, each the whole chain of that stage (built in memory, no export folder)."""
        from peft import get_peft_model
        from peft.utils import set_peft_model_state_dict

        from finetune.export import cumulative_adapter

        peft_model = None
        for info in self.stages.values():
            cum = cumulative_adapter(info.path.parent, info.name)
            name = self.adapter_name(info.name)
            try:
                if peft_model is None:
                    peft_model = get_peft_model(model, cum.config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, cum.config)
                result = set_peft_model_state_dict(peft_model, cum.state, adapter_name=name)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise RagloraError(f"cannot load the cumulative adapter of stage {info.name}: {exc}") from None
            stray = [k for k in result.unexpected_keys if "lora_" in k]
            if stray:
                raise RagloraError(
                    f"cumulative adapter of stage {info.name} names modules the base model lacks: {stray[0]}"
                )
            self.adapter_loads += 1
        peft_model.eval()
        return peft_model

    def _load_merged(self, model, info: StageInfo):
        from peft import PeftModel

        merged = copy.deepcopy(model)
        for name in info.chain:
            try:
                merged = PeftModel.from_pretrained(merged, str(self.stages[name].path)).merge_and_unload()
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise RagloraError(f"cannot merge stage adapter {self.stages[name].path}: {exc}") from None
            self.adapter_loads += 1
        merged.eval()
        return merged

    # Use ----------------------------------------------------------------------------------------------------

    def adapter_name(self, stage: str) -> str:
        """The PEFT adapter name of a stage: PEFT refuses '.' in names ("heat-pumps.boilers"), so it is
        numbered by the stage's position and keeps only word characters and '-'."""
        return f"s{list(self.stages).index(stage)}_{re.sub(r'[^0-9A-Za-z_-]', '_', stage)}"

    @property
    def context_window(self) -> int:
        cfg = self.base.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(self.tokenizer, "model_max_length", 2048))

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @contextlib.contextmanager
    def use(self, stage: str | None):
        """Yield the module to run for `stage` (None: the plain base model)."""
        self.check_stage(stage)
        if stage is None:
            if self.peft is None:
                yield self.base
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        if self.strategy == "merged":
            yield self.merged[stage]
            return
        chain = self.stages[stage].chain if self.strategy == "stack" else (stage,)
        if self._active != chain:
            self.peft.base_model.set_adapter([self.adapter_name(s) for s in chain], inference_mode=True)
            self._active = chain
            self.switches += 1
        yield self.peft

    @property
    def mixes_stages(self) -> bool:
        """True when rows of different stages can share one forward (`use_rows`): only the cumulative strategy,
        where every stage is one adapter on the same base (stacked chains overlap, merged copies are separate)."""
        return self.strategy == "cumulative" and self.peft is not None

    @contextlib.contextmanager
    def use_rows(self, stages: list[str | None]):
        """Yield (module, forward_kwargs) to run one forward over rows whose stages are `stages` (None: base).

        cumulative with mixed stages: (peft model, {"adapter_names": [adapter name or "__base__" per row]}), PEFT's
        mixed-batch forward. Rows all of one stage (any strategy) run as `use(stage)` with no extra kwargs, the
        cheaper path with the same result; other strategies refuse mixed rows.
        """
        if not stages:
            raise RagloraError("use_rows: no rows")
        for stage in set(stages):
            self.check_stage(stage)
        if len(set(stages)) == 1:
            with self.use(stages[0]) as module:
                yield module, {}
            return
        if not self.mixes_stages:
            raise RagloraError(
                f"adapter strategy {self.strategy!r} runs one stage per forward, got rows of "
                f"{', '.join(sorted(str(s) for s in set(stages)))}"
            )
        yield self.peft, {"adapter_names": [BASE_ROW if s is None else self.adapter_name(s) for s in stages]}


__all__ = [
    "BASE_ROW",
    "STRATEGIES",
    "StageInfo",
    "StageModels",
    "StageSet",
    "deepest_stage",
    "discover_stages",
    "order_stages",
]
