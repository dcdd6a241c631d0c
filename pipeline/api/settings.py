"""The `serve` config section: the chat API, the answer pipeline defaults and the dynamic batcher."""

from __future__ import annotations

import ipaddress
import os
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["base", "rag", "lora", "rag+lora"]
MODES: tuple[str, ...] = get_args(Mode)  # the one list of answer modes (pipeline.routing explains them)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Bearer keys; RAGLORA_API_KEYS (comma-separated) adds to these. None at all: loopback only, no auth.
    api_keys: list[str] = []
    rate_limit_per_minute: int = Field(60, ge=1)  # per key, token bucket (burst = the same number)
    max_body_bytes: int = Field(65536, ge=1024)
    max_message_chars: int = Field(4000, ge=1)
    max_messages: int = Field(50, ge=1)
    db_path: str = "artifacts/conversations.db"
    # The conversation store as an SQLAlchemy URL: None = SQLite at db_path; "postgresql+psycopg://user@host/db"
    # for several API replicas sharing one store.
    db_url: str | None = None
    # Continuous batching (pipeline.generate): requests join the running batch between decode steps, up to
    # max_batch_size rows; batch_wait_ms is how long an idle worker waits for company before it starts.
    batching: bool = True
    batch_wait_ms: float = Field(10.0, ge=0)
    max_batch_size: int = Field(16, ge=1)
    # A joining prompt is prefilled in chunks of at most this many tokens between decode steps, so running
    # streams stall for at most one chunk's work.
    prefill_chunk_tokens: int = Field(256, ge=16)
    # Stage adapters (pipeline.stage_models), measured by bench/adapter_strategies.py with 3 trained stages of
    # SmolLM2-135M on 2 CPU cores (RSS after load / decode ms per token through the engine, batching off):
    #   merged      2,486 MB / 54.4  one pre-merged copy per stage plus the base
    #   stack         456 MB / 46.2  parents' and the stage's adapters active together on one base
    #   cumulative    500 MB / 37.8  one LoRA per stage equal to its whole chain on one base; rows of different
    #                                stages share a batch (PEFT per-row adapter_names, as S-LoRA/Punica do)
    # So cumulative is the default: 5x less memory than merged and not slower per token through the engine.
    adapter_strategy: Literal["stack", "merged", "cumulative"] = "cumulative"
    # Token generation: "local" (the built-in engine above) or "openai": any OpenAI-compatible engine at
    # upstream_url (vLLM with the adapters of `raglora export`, llama.cpp server, TGI, SGLang) gets the prompt
    # that our chat template rendered at /v1/completions; retrieval, citations, the gate, hand-off,
    # conversations, auth and rate limits stay here.
    generator: Literal["local", "openai"] = "local"
    upstream_url: str | None = None  # e.g. http://gpu-box:8000/v1
    upstream_api_key: str | None = None  # RAGLORA_UPSTREAM_API_KEY overrides
    # stage -> the upstream's model name for it (default: the stage's own name, as `--lora-modules stage=...`);
    # upstream_base_model is the name of the plain base (base and rag modes); None: the upstream's first model.
    upstream_models: dict[str, str] = {}
    upstream_base_model: str | None = None
    upstream_timeout_s: float = Field(120.0, gt=0)
    # "ids": send the prompt as token ids (exact: vLLM, llama.cpp server, SGLang); "text": as the rendered string
    # (TGI); either way it is our chat template's rendering, never the upstream's.
    upstream_prompt: Literal["ids", "text"] = "ids"
    # A client's own system/developer messages: "append" adds them after the project's system prompt (which keeps
    # precedence), cut to max_client_system_chars; "reject" answers 400.
    client_system: Literal["append", "reject"] = "append"
    max_client_system_chars: int = Field(2000, ge=0)
    # Answerability: with `gate` on, a gate fitted by `raglora gate` (paths.gate_dir) decides whether
    # retrieval found something to answer from; without a fitted gate (or with gate: false) the fallback is
    # handoff_threshold: hand over when the best dense cosine similarity of the retrieved passages is below it.
    gate: bool = True
    handoff_threshold: float | None = 0.3
    # Verified citations (pipeline.citations): each answer sentence is cited with the passages that the
    # groundedness judge says support it; sentences no passage supports are listed as `unsupported`.
    # "keep" shows them, "drop" removes them, "handover" hands the turn over to a person when more than
    # max_unsupported_share of the answer's sentences are unsupported. Default "handover": the failure this
    # guards against is a small model answering an in-domain-sounding question from plausible passages that do
    # not hold the answer (the gold-removed case the gate cannot see); a mostly unsupported answer is then more
    # likely made up than right, and a colleague costs less than a confident wrong answer. A mostly supported
    # answer is shown with its unsupported sentences listed. Choose "keep" if false hand-overs cost more.
    citations: Literal["keep", "drop", "handover"] = "handover"
    max_unsupported_share: float = Field(0.5, ge=0.0, le=1.0)
    # The judge's similarity threshold is calibrated at startup on this many (sentence, passage) pairs drawn
    # from the index (seeded; one batched embedding call); 0 uses the judge's default threshold.
    judge_calibration_pairs: int = Field(100, ge=0)
    default_mode: Mode = "rag+lora"
    default_stage: str | None = None  # None: the deepest trained stage
    max_new_tokens_default: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1)
    cors_origins: list[str] = []
    graceful_shutdown_s: float = Field(30.0, ge=0)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _limits(self) -> ServeConfig:
        if self.max_new_tokens_default > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens_default must not exceed max_new_tokens_limit")
        if self.generator == "openai" and not self.upstream_url:
            raise ValueError("generator: openai needs upstream_url (e.g. http://gpu-box:8000/v1)")
        return self

    def resolved_api_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get("RAGLORA_API_KEYS", "").split(",") if k.strip()]
        return list(dict.fromkeys([*self.api_keys, *env]))


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
