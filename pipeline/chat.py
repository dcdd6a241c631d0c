"""The terminal chat (`raglora chat`): streams answers, keeps the history in memory, prints citations."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.answer import Answer, AnswerService
from pipeline.generate import SamplingParams
from pipeline.routing import MODES, model_name
from raglora.errors import RagloraError


def chat_help(service: AnswerService) -> str:
    """The /help text, naming the modes and trained stages this service really offers."""
    modes = "|".join(m for m in MODES if service.mode_available(m)) or "base"
    stages = "|".join(service.models.stage_names) or "(no stages trained)"
    return (
        f"commands: /mode {modes}   /stage {stages}   /new (forget history)\n"
        "          /sources (citations of the last answer)   /quit"
    )


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
        from pipeline.service import build_service

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
                print(chat_help(service), file=out)
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
            streamed: list[str] = []

            def on_delta(delta: str, streamed: list[str] = streamed) -> None:
                streamed.append(delta)
                print(delta, end="", file=out, flush=True)

            try:
                last = service.answer(
                    line,
                    history,
                    mode=mode,
                    stage=stage,
                    params=SamplingParams(max_new_tokens=max_new_tokens or service.max_new_tokens_default),
                    on_delta=on_delta,
                )
            except RagloraError as exc:
                print(f"\nerror: {exc}", file=out)
                continue
            print(file=out)
            if last.text != "".join(streamed):  # checked after streaming: verified markers, or a hand-over
                print(f"bot (checked)> {last.text}", file=out)
            if last.citations:
                print("sources: " + "; ".join(f"[{c['n']}] {c['title']}" for c in last.citations), file=out)
            if last.unsupported:
                print("not supported by the sources: " + " | ".join(last.unsupported), file=out)
            if last.handoff:
                ticket = last.handoff.get("ticket_id")
                print(f"(handed over{f', ticket {ticket}' if ticket else ''}: {last.handoff['reason']})", file=out)
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": last.text}]
    except KeyboardInterrupt:
        print(file=out)
    finally:
        if own:
            service.close()
    return 0
