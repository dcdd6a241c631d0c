"""The answer pipeline: mode/stage routing, retrieval, prompt building, hand-off, persistence, terminal chat.

Modes: `base` (no retrieval, no adapter), `rag` (retrieval, base model), `lora` (stage adapter, no retrieval)
and `rag+lora`. Prompts come from `finetune.prompt.build_messages` (the one builder shared with training and
evaluation) and the tokenizer's chat template; history is dropped oldest-first until the prompt fits the
model's context window in tokens. Follow-up questions are made standalone for retrieval by a cheap rule.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.generate import GenerationHandle, Generator, SamplingParams
from pipeline.store import ANONYMOUS, ConversationStore
from retriever.errors import RagloraError

if TYPE_CHECKING:
    from pipeline.api.settings import ServeConfig

log = logging.getLogger("raglora.answer")

MODES = ("base", "rag", "lora", "rag+lora")
RAG_MODES = ("rag", "rag+lora")
LORA_MODES = ("lora", "rag+lora")
MODEL_PREFIX = "raglora"

HANDOFF_REPLY = (
    "I'll hand you over to a colleague in our customer-service team; they will pick up this conversation "
    "shortly and can see everything we have discussed."
)
LOW_SCORE_REPLY = (
    "I couldn't find an answer to that in our documentation, so I'm handing you over to a colleague in our "
    "customer-service team who can help. They will see this conversation."
)

ASKED_FOR_PERSON = "user asked for a person"
_HANDOFF_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b(human|real person|live person|live agent|human agent|customer service agent|representative|operator)s?\b",
        r"\b(talk|speak|chat|connect|transfer|put)\b[^.?!]{0,30}\b(someone|somebody|person|agent|staff|people|colleague)\b",
        r"^\s*(an?\s+)?(agent|person|someone)[\s.!?]*(please)?[\s.!?]*$",
        r"\b(prata|tala|snacka)\s+med\s+(en\s+)?(människa|person|handläggare|någon|kundtjänst)\b",
    )
]

_FOLLOWUP_WORDS = {
    "it",
    "its",
    "that",
    "this",
    "those",
    "these",
    "they",
    "them",
    "their",
    "there",
    "one",
    "ones",
    "he",
    "she",
    "such",
    "same",
    "det",
    "den",
    "dem",
    "dom",
    "detta",
}
_FOLLOWUP_OPENERS = ("and ", "what about", "how about", "also", "and what", "but ", "same for", "then ", "och ")


def wants_human(text: str) -> bool:
    """True when the user explicitly asks for a person."""
    return any(p.search(text) for p in _HANDOFF_PATTERNS)


def condense_query(question: str, history: list[dict] | None) -> str:
    """Make a follow-up standalone for retrieval: short questions, ones with pronouns or follow-up openers get
    the previous user turn prepended ("How much does it cost?" → "<previous question> How much does it cost?")."""
    previous = next((m["content"] for m in reversed(history or []) if m.get("role") == "user"), None)
    if not previous:
        return question
    q = question.strip()
    words = re.findall(r"[\wåäöÅÄÖ]+", q.lower())
    if len(words) <= 4 or any(w in _FOLLOWUP_WORDS for w in words) or q.lower().startswith(_FOLLOWUP_OPENERS):
        return f"{previous.strip()} {q}"
    return q


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special-token strings (ChatML markers, end of text, ...), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return tuple(sorted((t for t in found if len(t) > 1), key=len, reverse=True))


def strip_control_tokens(text: str, tokens: tuple[str, ...]) -> str:
    """Remove special-token strings from untrusted text (repeatedly: removing one must not form another)."""
    if not text or not tokens:
        return text
    while True:
        before = text
        for token in tokens:
            text = text.replace(token, "")
        if text == before:
            return text


def model_name(mode: str, stage: str | None = None) -> str:
    name = f"{MODEL_PREFIX}-{mode}"
    return f"{name}-{stage}" if stage and mode in LORA_MODES else name


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


@dataclass
class Prepared:
    """Everything decided before generation: the prompt, citations, and whether to hand over instead."""

    mode: str
    stage: str | None
    question: str
    messages: list[dict]
    prompt_ids: list[int]
    citations: list[dict]
    retrieval_query: str | None
    handoff_reason: str | None
    dropped_history: int
    retrieval_ms: float
    best_score: float | None = None

    @property
    def model(self) -> str:
        return model_name(self.mode, self.stage)

    @property
    def handoff_text(self) -> str | None:
        """The fixed reply when this turn is handed over to a person (no generation)."""
        if self.handoff_reason is None:
            return None
        return HANDOFF_REPLY if self.handoff_reason == ASKED_FOR_PERSON else LOW_SCORE_REPLY


@dataclass
class Answer:
    text: str
    mode: str
    stage: str | None
    citations: list[dict]
    handoff: dict | None
    conversation_id: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timing: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return model_name(self.mode, self.stage)

    def extension(self) -> dict:
        """The `raglora` extension object of an API response."""
        return {
            "conversation_id": self.conversation_id,
            "mode": self.mode,
            "stage": self.stage,
            "citations": self.citations,
            "handoff": self.handoff,
            "timing": self.timing,
        }


class AnswerService:
    """Stateless per request; holds the generator, the index, the prompts and the store."""

    def __init__(
        self,
        generator: Generator,
        index=None,
        *,
        store: ConversationStore | None = None,
        system_prompt: str | None = None,
        rag_system_prompt: str | None = None,
        retrieval: dict | None = None,
        handoff_threshold: float | None = None,
        default_mode: str = "rag+lora",
        default_stage: str | None = None,
        max_new_tokens_default: int = 256,
        versions: dict | None = None,
    ):
        from finetune.prompt import load_system_prompt

        self.generator = generator
        self.models = generator.models
        self.tokenizer = generator.tokenizer
        self.index = index
        self.store = store
        self.system_prompt = system_prompt if system_prompt is not None else load_system_prompt(None, False)
        self.rag_system_prompt = rag_system_prompt if rag_system_prompt is not None else load_system_prompt(None, True)
        self.retrieval = {"k": 5, "mode": "hybrid", **(retrieval or {})}
        self.handoff_threshold = handoff_threshold
        self.max_new_tokens_default = max_new_tokens_default
        self.default_stage = default_stage or self.models.deepest_stage
        if default_stage is not None:
            self.models.check_stage(default_stage)
        self.default_mode = default_mode if self.mode_available(default_mode) else self._fallback_mode(default_mode)
        self.versions = versions or {}
        self._control_tokens = control_tokens(self.tokenizer)

    # -- routing ----------------------------------------------------------------------------------------------

    def mode_available(self, mode: str) -> bool:
        if mode in RAG_MODES and self.index is None:
            return False
        return not (mode in LORA_MODES and not self.models.stage_names)

    def _fallback_mode(self, mode: str) -> str:
        for candidate in (mode.replace("rag+", ""), mode.replace("+lora", ""), "base"):
            if candidate in MODES and self.mode_available(candidate):
                return candidate
        return "base"

    @property
    def default_model(self) -> str:
        return model_name(self.default_mode, self.default_stage if self.default_mode in LORA_MODES else None)

    def model_names(self) -> list[str]:
        names = []
        for mode in MODES:
            if not self.mode_available(mode):
                continue
            names.append(model_name(mode))
            if mode in LORA_MODES:
                names.extend(model_name(mode, s) for s in self.models.stage_names)
        return names

    def resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """`raglora-rag+lora-domain` → ("rag+lora", "domain"); `raglora` or None → the defaults."""
        if name in (None, "", MODEL_PREFIX):
            mode = self.default_mode
            return mode, self.default_stage if mode in LORA_MODES else None
        if name not in self.model_names():
            raise UnknownModel(name, self.model_names())
        rest = name[len(MODEL_PREFIX) + 1 :]
        for mode in sorted(MODES, key=len, reverse=True):
            if rest == mode:
                return mode, self.default_stage if mode in LORA_MODES else None
            if rest.startswith(mode + "-") and mode in LORA_MODES:
                return mode, rest[len(mode) + 1 :]
        raise UnknownModel(name, self.model_names())

    # -- preparation ------------------------------------------------------------------------------------------

    def _retrieve(self, query: str) -> tuple[list[dict], float | None]:
        rc = self.retrieval
        hits = self.index.search(
            query,
            k=rc["k"],
            mode=rc["mode"],
            **{key: rc[key] for key in ("rrf_k", "dense_weight", "bm25_weight", "candidates") if key in rc},
        )
        contexts = [h.to_dict() if hasattr(h, "to_dict") else dict(h) for h in hits]
        if self.handoff_threshold is None:
            return contexts, None
        # Fused (RRF) scores say nothing absolute: relevance is the best dense cosine similarity among the hits
        # (every hit carries it in dense and hybrid mode); BM25-only retrieval has no comparable scale.
        dense = [c["dense_score"] for c in contexts if c.get("dense_score") is not None]
        best = None  # bm25-only retrieval: no comparable relevance, never a low-score hand-off
        if dense:
            best = max(dense)
        elif rc["mode"] != "bm25":
            best = max((float(c["score"]) for c in contexts), default=None)
        return contexts, best

    def _neutralise(self, text: str) -> str:
        return strip_control_tokens(text, self._control_tokens)

    def _encode(self, messages: list[dict]) -> list[int]:
        from finetune.prompt import chat_ids  # the same rendering + tokenization as training

        return _ids(chat_ids(self.tokenizer, messages, add_generation_prompt=True))

    def build_prompt(
        self, question: str, contexts: list[dict] | None, history: list[dict], system_prompt: str, max_new_tokens: int
    ) -> tuple[list[dict], list[int], int, list[dict] | None]:
        """Messages and token ids that fit the context window; drops the oldest history, then the last contexts."""
        from finetune.prompt import build_messages

        budget = self.models.context_window - max_new_tokens
        # User text, stored history and knowledge-base passages are untrusted: a literal "<|im_start|>system"
        # in them would be tokenized as a real turn marker and open a second system turn.
        clean = self._neutralise
        question = clean(question)
        history = [{**m, "content": clean(m["content"])} for m in history]
        if contexts is not None:
            contexts = [
                {**c, "text": clean(c.get("text") or ""), "title": clean(str(c.get("title") or ""))} for c in contexts
            ]
        dropped = 0
        while True:
            messages = build_messages(question, contexts=contexts, history=history, system_prompt=system_prompt)
            ids = self._encode(messages)
            if len(ids) <= budget:
                return messages, ids, dropped, contexts
            if history:
                history.pop(0)
                dropped += 1
                while history and history[0].get("role") != "user":
                    history.pop(0)
                    dropped += 1
            elif contexts:
                contexts.pop()
            else:
                raise RagloraError(
                    f"the message is too long for the model: {len(ids)} prompt tokens + {max_new_tokens} new tokens "
                    f"exceed the context window of {self.models.context_window}"
                )

    def prepare(
        self,
        question: str,
        history: list[dict] | None = None,
        *,
        mode: str | None = None,
        stage: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Prepared:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise RagloraError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        if not self.mode_available(mode):
            raise RagloraError(
                f"mode {mode!r} is not available: "
                + ("no index loaded" if mode in RAG_MODES else "no stage adapters trained")
            )
        if mode in LORA_MODES:
            stage = stage or self.default_stage
            self.models.check_stage(stage)
        else:
            stage = None
        question = question.strip()
        if not question:
            raise RagloraError("the question is empty")
        history = [
            {"role": m["role"], "content": m["content"]}
            for m in (history or [])
            if m.get("role") in ("user", "assistant")
        ]
        max_new_tokens = max_new_tokens or self.max_new_tokens_default
        handoff_reason = ASKED_FOR_PERSON if wants_human(question) else None
        contexts = None
        citations: list[dict] = []
        query = None
        best = None
        t0 = time.perf_counter()
        if mode in RAG_MODES and handoff_reason is None:
            query = condense_query(question, history)
            contexts, best = self._retrieve(query)
            if self.handoff_threshold is not None and (
                not contexts or (best is not None and best < self.handoff_threshold)
            ):
                handoff_reason = "no relevant documentation found" + (
                    "" if best is None else f" (best relevance {best:.3f} < {self.handoff_threshold})"
                )
        retrieval_ms = (time.perf_counter() - t0) * 1000
        system = self.rag_system_prompt if mode in RAG_MODES else self.system_prompt
        messages, ids, dropped, used = self.build_prompt(question, contexts, history, system, max_new_tokens)
        for n, ctx in enumerate(used or [], start=1):
            citations.append(
                {
                    "n": n,
                    "source": ctx.get("source"),
                    "title": ctx.get("title"),
                    "chunk_id": ctx.get("chunk_id"),
                    "score": ctx.get("score"),
                    "relevance": ctx.get("dense_score"),
                }
            )
        return Prepared(
            mode, stage, question, messages, ids, citations, query, handoff_reason, dropped, retrieval_ms, best
        )

    # -- generation + persistence ---------------------------------------------------------------------------------

    def start(
        self, prepared: Prepared, params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None
    ) -> GenerationHandle | None:
        """Queue generation; None when the answer is a hand-off (no generation needed)."""
        if prepared.handoff_reason is not None:
            return None
        return self.generator.submit(prepared.prompt_ids, stage=prepared.stage, params=params, loop=loop)

    def open_conversation(self, conversation_id: str | None, owner: str = ANONYMOUS) -> str | None:
        if self.store is None:
            return conversation_id
        cid, _ = self.store.open_conversation(conversation_id, owner)
        return cid

    def stored_history(self, conversation_id: str | None) -> list[dict]:
        if self.store is None or conversation_id is None:
            return []
        return [{"role": m["role"], "content": m["content"]} for m in self.store.messages(conversation_id)]

    def finish(
        self,
        prepared: Prepared,
        text: str,
        *,
        conversation_id: str | None,
        finish_reason: str,
        completion_tokens: int,
        timing: dict,
        history: list[dict] | None = None,
    ) -> Answer:
        """Write the turn (and a hand-off ticket) to the store, committed, and build the Answer."""
        handoff = None
        if prepared.handoff_reason is not None:
            text = prepared.handoff_text
            finish_reason = "stop"
        citations = [] if prepared.handoff_reason else prepared.citations
        if self.store is not None and conversation_id is not None:
            meta = {"model": prepared.model, "citations": citations, "finish_reason": finish_reason}
            self.store.add_messages(
                conversation_id,
                [{"role": "user", "content": prepared.question}, {"role": "assistant", "content": text, "meta": meta}],
            )
            if prepared.handoff_reason is not None:
                transcript = [*(history or []), {"role": "user", "content": prepared.question}]
                transcript.append({"role": "assistant", "content": text})
                ticket = self.store.create_handoff(conversation_id, prepared.handoff_reason, transcript)
                handoff = {"ticket_id": ticket, "reason": prepared.handoff_reason}
        if prepared.handoff_reason is not None and handoff is None:
            handoff = {"ticket_id": None, "reason": prepared.handoff_reason}
        return Answer(
            text=text,
            mode=prepared.mode,
            stage=prepared.stage,
            citations=citations,
            handoff=handoff,
            conversation_id=conversation_id,
            finish_reason=finish_reason,
            prompt_tokens=len(prepared.prompt_ids),
            completion_tokens=completion_tokens,
            timing=timing,
        )

    def answer(
        self,
        question: str,
        history: list[dict] | None = None,
        *,
        mode: str | None = None,
        stage: str | None = None,
        params: SamplingParams | None = None,
        conversation_id: str | None = None,
        owner: str = ANONYMOUS,
        on_delta: Callable[[str], None] | None = None,
    ) -> Answer:
        """Blocking end-to-end answer (terminal chat, evaluation, tests)."""
        t0 = time.perf_counter()
        params = params or SamplingParams(max_new_tokens=self.max_new_tokens_default)
        cid = self.open_conversation(conversation_id, owner)
        if history is None:
            history = self.stored_history(cid)
        prepared = self.prepare(question, history, mode=mode, stage=stage, max_new_tokens=params.max_new_tokens)
        handle = self.start(prepared, params)
        text, reason, n_tokens, ttft = "", "stop", 0, None
        if handle is not None:
            for delta in handle:
                if on_delta is not None:
                    on_delta(delta)
            result = handle.result()
            text, reason, n_tokens, ttft = result.text, result.finish_reason, result.completion_tokens, result.ttft_s
        timing = {
            "retrieval_ms": round(prepared.retrieval_ms, 2),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
            "total_ms": round((time.perf_counter() - t0) * 1000, 2),
        }
        answer = self.finish(
            prepared,
            text,
            conversation_id=cid,
            finish_reason=reason,
            completion_tokens=n_tokens,
            timing=timing,
            history=history,
        )
        if handle is None and on_delta is not None:
            on_delta(answer.text)
        return answer

    def close(self) -> None:
        self.generator.close()
        if self.store is not None:
            self.store.close()


class UnknownModel(RagloraError):
    def __init__(self, name: str | None, valid: list[str]):
        self.name = name
        self.valid = valid
        super().__init__(f"unknown model {name!r}; valid models: {', '.join(valid)}")


# -- building from the root config ---------------------------------------------------------------------------


def serve_config(cfg) -> ServeConfig:
    from pipeline.api.settings import ServeConfig

    serve = getattr(cfg, "serve", None)
    return serve if serve is not None else ServeConfig()


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("raglora", "torch", "transformers", "peft", "fastapi"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def build_service(
    cfg,
    *,
    serve: ServeConfig | None = None,
    with_index: bool = True,
    with_store: bool = True,
    model_and_tokenizer: tuple | None = None,
    on_batch: Callable | None = None,
) -> AnswerService:
    """Load the base model once, its stage adapters, the index and the store, as configured.

    `cfg` is the root `pipeline.config.Config`; `serve` overrides `cfg.serve`.
    """
    from pathlib import Path

    from finetune.prompt import load_system_prompt
    from pipeline.generate import StageModels

    serve = serve or serve_config(cfg)
    if model_and_tokenizer is None:
        from finetune.model import load_base

        mc = cfg.model
        model, tokenizer = load_base(
            mc.base,
            cache_dir=cfg.paths.base_cache_dir,
            device=mc.device,
            dtype=mc.dtype,
            attn_implementation=mc.attn_implementation,
        )
    else:
        model, tokenizer = model_and_tokenizer
    models = StageModels(model, tokenizer, cfg.paths.adapters_dir, strategy=serve.adapter_strategy)
    generator = Generator(
        models,
        batching=serve.batching,
        max_batch_size=serve.max_batch_size,
        batch_wait_ms=serve.batch_wait_ms,
        on_batch=on_batch,
    )
    index = None
    if with_index and not Path(cfg.paths.index_dir).exists():
        log.warning("no index at %s: rag modes are off (build it with `raglora index`)", cfg.paths.index_dir)
    if with_index and Path(cfg.paths.index_dir).exists():
        from retriever.embedder import load_embedder
        from retriever.index import load_index

        index = load_index(cfg.paths.index_dir, load_embedder(cfg.index.embedder))
    store = ConversationStore(serve.db_path) if with_store else None
    versions = package_versions()
    versions["base_model"] = getattr(cfg.model, "base", None)
    versions["stages"] = models.stage_names
    return AnswerService(
        generator,
        index,
        store=store,
        # The same prompt files as training and evaluation (model.system_prompt_file / rag_system_prompt_file).
        system_prompt=load_system_prompt(getattr(cfg.model, "system_prompt_file", None), False),
        rag_system_prompt=load_system_prompt(getattr(cfg.model, "rag_system_prompt_file", None), True),
        retrieval=cfg.retrieval.model_dump(),
        handoff_threshold=serve.handoff_threshold,
        default_mode=serve.default_mode,
        default_stage=serve.default_stage,
        max_new_tokens_default=serve.max_new_tokens_default,
        versions=versions,
    )


CHAT_HELP = """commands: /mode base|rag|lora|rag+lora   /stage general|domain|subdomain   /new (forget history)
          /sources (citations of the last answer)   /quit"""


def chat_repl(
    cfg=None,
    *,
    service: AnswerService | None = None,
    mode: str | None = None,
    stage: str | None = None,
    max_new_tokens: int | None = None,
    input_fn: Callable[[str], str] = input,
    out=None,
) -> int:
    """Terminal chat: streams answers, keeps the history in memory, prints citations. Returns an exit code."""
    out = out or sys.stdout
    own = service is None
    if service is None:
        if cfg is None:
            raise RagloraError("chat_repl needs a config or a service")
        service = build_service(cfg, with_store=False)
    mode = mode or service.default_mode
    stage = stage or service.default_stage
    history: list[dict] = []
    last: Answer | None = None
    print(f"raglora chat ({model_name(mode, stage)}); type /help for commands", file=out)
    try:
        while True:
            try:
                line = input_fn("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/help":
                print(CHAT_HELP, file=out)
                continue
            if line == "/new":
                history = []
                print("(history cleared)", file=out)
                continue
            if line.startswith("/mode"):
                value = line[5:].strip()
                if value not in MODES or not service.mode_available(value):
                    print(f"available modes: {', '.join(m for m in MODES if service.mode_available(m))}", file=out)
                else:
                    mode = value
                continue
            if line.startswith("/stage"):
                value = line[6:].strip()
                if value not in service.models.stage_names:
                    print(f"available stages: {', '.join(service.models.stage_names) or 'none'}", file=out)
                else:
                    stage = value
                continue
            if line == "/sources":
                for c in last.citations if last else []:
                    print(f"  [{c['n']}] {c['title']} ({c['source']}, score {c['score']:.3f})", file=out)
                continue
            print("bot> ", end="", file=out, flush=True)
            try:
                last = service.answer(
                    line,
                    history,
                    mode=mode,
                    stage=stage,
                    params=SamplingParams(max_new_tokens=max_new_tokens or service.max_new_tokens_default),
                    on_delta=lambda d: print(d, end="", file=out, flush=True),
                )
            except RagloraError as exc:
                print(f"\nerror: {exc}", file=out)
                continue
            print(file=out)
            if last.citations:
                print("sources: " + "; ".join(f"[{c['n']}] {c['title']}" for c in last.citations), file=out)
            if last.handoff:
                print(f"(handed over: {last.handoff['reason']})", file=out)
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": last.text}]
    except KeyboardInterrupt:
        print(file=out)
    finally:
        if own:
            service.close()
    return 0
