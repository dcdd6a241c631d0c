"""The prompt of one turn, fitted to the model: untrusted text neutralised, then history dropped oldest-first
(then the last passages) until prompt + answer fit the context window, counted in tokens.

Messages come from `finetune.prompt.build_messages` and are tokenized by `finetune.prompt.chat_ids`, the same
rendering training and evaluation use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raglora.errors import RagloraError


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


def token_ids(encoded: Any) -> list[int]:
    """A flat list of ids from whatever a tokenizer returned (BatchEncoding, tensor, nested list)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


@dataclass
class FittedPrompt:
    messages: list[dict]
    ids: list[int]
    dropped_history: int  # history messages left out to fit
    contexts: list[dict] | None  # the passages actually in the prompt (cleaned), None in closed-book modes


class PromptFitter:
    """Builds a turn's prompt for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.control = control_tokens(tokenizer)

    def clean(self, text: str) -> str:
        return strip_control_tokens(text, self.control)

    def encode(self, messages: list[dict]) -> list[int]:
        from finetune.prompt import chat_ids  # the same rendering + tokenization as training

        return token_ids(chat_ids(self.tokenizer, messages, add_generation_prompt=True))

    def fit(
        self,
        question: str,
        contexts: list[dict] | None,
        history: list[dict],
        system_prompt: str,
        *,
        max_new_tokens: int,
        context_window: int,
    ) -> FittedPrompt:
        from finetune.prompt import build_messages

        budget = context_window - max_new_tokens
        # User text, stored history and knowledge-base passages are untrusted: a literal "<|im_start|>system"
        # in them would be tokenized as a real turn marker and open a second system turn.
        clean = self.clean
        question = clean(question)
        history = [{**m, "content": clean(m["content"])} for m in history]
        if contexts is not None:
            contexts = [
                {**c, "text": clean(c.get("text") or ""), "title": clean(str(c.get("title") or ""))} for c in contexts
            ]
        dropped = 0
        while True:
            messages = build_messages(question, contexts=contexts, history=history, system_prompt=system_prompt)
            ids = self.encode(messages)
            if len(ids) <= budget:
                return FittedPrompt(messages, ids, dropped, contexts)
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
                    f"exceed the context window of {context_window}"
                )
