"""Request and response bodies. Requests ignore unknown OpenAI fields so standard clients work unchanged."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# What torch.Generator.manual_seed takes; outside it a request is a 422, never a failed generation.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=1)
    seed: Seed | None = None
    conversation_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v and v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class CompletionChoice(BaseModel):
    index: int
    message: CompletionMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Extension(BaseModel):
    """The `raglora` object: conversation id, mode/stage, citations, unsupported sentences, hand-off and timings.

    `citations`: the passages the shown answer cites as [n] ({"n", "source", "title", "chunk_id", "text", "score",
    "relevance"}); `unsupported`: answer sentences no passage supports; `rejected_citations`: [n] markers the model
    wrote that the judge rejected; `handoff`: {"ticket_id", "reason"} when the turn went to a person; `gate`: the
    answerability gate's decision, when one is fitted; `client_system`: how much of the client's own system/developer
    messages went into the prompt ({"messages", "chars", "truncated"}; None when it sent none); `text` (last stream
    chunk only): the answer as shown and stored, when it differs from the streamed tokens.
    """

    conversation_id: str | None
    mode: str
    stage: str | None
    citations: list[dict[str, Any]]
    unsupported: list[str] = []
    rejected_citations: list[int] = []
    handoff: dict[str, Any] | None
    gate: dict[str, Any] | None = None
    client_system: dict[str, Any] | None = None
    timing: dict[str, Any]
    text: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    raglora: Extension


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class StoredMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    created_at: float
    meta: dict[str, Any] | None = None


class Conversation(BaseModel):
    id: str
    created_at: float
    updated_at: float
    messages: list[StoredMessage]
    handoffs: list[dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok", "loading"]
    model_loaded: bool
    index_loaded: bool
    stages: list[str]
    default_model: str | None
    adapter_strategy: str | None
    batching: bool | None
    versions: dict[str, Any]
    auth: bool


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the OpenAI-shaped error body, so the schema documents every error."""
    text = {
        400: "Malformed request (not JSON, a request the model cannot take, or system messages the server refuses)",
        401: "Missing or invalid API key",
        404: "Unknown model or conversation",
        413: "Request body too large",
        422: "Invalid request",
        429: "Rate limit exceeded (see Retry-After)",
        503: "The model is loading, or the conversation store is unavailable",
    }
    return {status: {"model": ErrorResponse, "description": text[status]} for status in statuses}


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    extension: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": openai_finish_reason(finish_reason),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "raglora": extension,
    }


def chunk_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    extension: dict[str, Any] | None = None,
    usage: dict[str, int] | None = None,
    empty_choices: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if empty_choices
        else [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None if finish_reason is None else openai_finish_reason(finish_reason),
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    if extension is not None:
        body["raglora"] = extension
    return body


def openai_finish_reason(reason: str) -> str:
    # OpenAI clients only know stop / length / content_filter / tool_calls.
    return "length" if reason == "length" else "stop"
