"""Which answer modes and stages a service offers, and the OpenAI-style model names that pick them.

Modes: `base` (no retrieval, no adapter), `rag` (retrieval, base model), `lora` (stage adapter, no retrieval)
and `rag+lora`. A model name is `raglora-<mode>` or, for the adapter modes, `raglora-<mode>-<stage>` for any
trained stage name (names may contain '-' or '.'); the names come from the trained stages, never from a list.
"""

from __future__ import annotations

from pipeline.api.settings import MODES
from raglora.errors import RagloraError

RAG_MODES = ("rag", "rag+lora")
LORA_MODES = ("lora", "rag+lora")
MODEL_PREFIX = "raglora"


def model_name(mode: str, stage: str | None = None) -> str:
    name = f"{MODEL_PREFIX}-{mode}"
    return f"{name}-{stage}" if stage and mode in LORA_MODES else name


class UnknownModel(RagloraError):
    def __init__(self, name: str | None, valid: list[str]):
        self.name = name
        self.valid = valid
        super().__init__(f"unknown model {name!r}; valid models: {', '.join(valid)}")


class Routing:
    """Available modes and models for the loaded pieces (an index or not, which stage adapters), and defaults.

    `default_stage` None means the deepest trained stage; a named one that is not trained is an error here, at
    startup, rather than on the first request.
    """

    def __init__(self, stage_names: list[str], deepest: str | None, *, has_index: bool, default_mode: str,
                 default_stage: str | None):  # fmt: skip
        self.stage_names = list(stage_names)
        self.has_index = has_index
        if default_mode not in MODES:
            raise RagloraError(f"unknown mode {default_mode!r} (known: {', '.join(MODES)})")
        if default_stage is not None and default_stage not in self.stage_names:
            trained = ", ".join(self.stage_names) or "none"
            raise RagloraError(
                f"serve.default_stage {default_stage!r} is not a trained stage (trained: {trained}): train it "
                "with `raglora finetune`, or set serve.default_stage to null for the deepest trained stage"
            )
        self.default_stage = default_stage or deepest
        self.default_mode = default_mode if self.mode_available(default_mode) else self._fallback_mode(default_mode)

    def mode_available(self, mode: str) -> bool:
        if mode in RAG_MODES and not self.has_index:
            return False
        return not (mode in LORA_MODES and not self.stage_names)

    def _fallback_mode(self, mode: str) -> str:
        for candidate in (mode.replace("rag+", ""), mode.replace("+lora", ""), "base"):
            if candidate in MODES and self.mode_available(candidate):
                return candidate
        return "base"

    @property
    def default_model(self) -> str:
        return model_name(self.default_mode, self.default_stage if self.default_mode in LORA_MODES else None)

    def models(self) -> dict[str, tuple[str, str | None]]:
        """Every offered model name -> (mode, stage); a stage-less adapter mode means the default stage."""
        table: dict[str, tuple[str, str | None]] = {}
        for mode in MODES:
            if not self.mode_available(mode):
                continue
            table[model_name(mode)] = (mode, self.default_stage if mode in LORA_MODES else None)
            if mode in LORA_MODES:
                table.update({model_name(mode, s): (mode, s) for s in self.stage_names})
        return table

    def model_names(self) -> list[str]:
        return list(self.models())

    def resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """`raglora-rag+lora-heat-pumps.boilers` → ("rag+lora", "heat-pumps.boilers"); `raglora`/None → defaults.

        Looked up in the table of offered names, not parsed, so any stage name resolves exactly.
        """
        if name in (None, "", MODEL_PREFIX):
            mode = self.default_mode
            return mode, self.default_stage if mode in LORA_MODES else None
        table = self.models()
        if name not in table:
            raise UnknownModel(name, list(table))
        return table[name]
