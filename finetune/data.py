"""Training data: JSONL reading with format auto-detection, chat tokenisation with assistant-only labels,
replay mixing, length-grouped batch plans and padding/packing collation.

Formats, detected per line:
  * OpenAI  `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`
  * ShareGPT `{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}`
  * Alpaca  `{"instruction": ..., "input": ..., "output": ...}`
  * text    `{"id", "text", "source", "title"}`: a document chunk for a `kind: text` stage (continued
    pre-training, loss on every token, no chat template)
Q/A rows may also carry `faq_id`/`id`, `question`, `answer`, `category` and `source` (used for RAFT).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from finetune.prompt import build_messages
from raglora.errors import RagloraError
from raglora.files import read_jsonl

IGNORE_INDEX = -100
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------------- reading


def detect_format(row: dict) -> str:
    """'messages', 'sharegpt', 'alpaca' or 'text'; '' when the row matches none."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return ""


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise RagloraError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def to_messages(row: dict, where: str = "row") -> list[dict]:
    """Normalise one row of any supported format to [{"role", "content"}] (system optional, first only)."""
    fmt = detect_format(row)
    if fmt == "messages":
        raw = row["messages"]
        if not isinstance(raw, list):
            raise RagloraError(f"{where}: 'messages' must be a list")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RagloraError(f"{where}: messages[{i}] must be an object")
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                raise RagloraError(
                    f"{where}: messages[{i}].role: unknown role {role!r} (expected system, user or assistant)"
                )
            msgs.append({"role": role, "content": _text(m.get("content"), f"{where}: messages[{i}].content")})
    elif fmt == "sharegpt":
        raw = row["conversations"]
        if not isinstance(raw, list):
            raise RagloraError(f"{where}: 'conversations' must be a list")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RagloraError(f"{where}: conversations[{i}] must be an object")
            role = SHAREGPT_ROLES.get(str(m.get("from")))
            if role is None:
                raise RagloraError(
                    f"{where}: conversations[{i}].from: unknown speaker {m.get('from')!r} (expected human, gpt or system)"
                )
            msgs.append({"role": role, "content": _text(m.get("value"), f"{where}: conversations[{i}].value")})
    elif fmt == "alpaca":
        instruction = _text(row["instruction"], f"{where}: instruction").strip()
        extra = _text(row.get("input") or "", f"{where}: input").strip()
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row["output"], f"{where}: output")},
        ]
    else:
        raise RagloraError(
            f"{where}: unknown format (expected 'messages', ShareGPT 'conversations' or Alpaca 'instruction'/'output'); "
            f"keys: {sorted(row)[:8]}"
        )
    if any(m["role"] == "system" for m in msgs[1:]):
        raise RagloraError(f"{where}: a system message is only allowed first")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise RagloraError(f"{where}: no non-empty assistant message to train on")
    return msgs


def load_examples(path: str | Path, *, stage: str, allow_empty: bool = False) -> list[dict]:
    """Examples of one JSONL file.

    Chat rows become {"id", "stage", "messages", "faq_id", "question", "answer", "category", "source"}; document
    rows (`{"text", ...}`, for text stages) become {"id", "stage", "text", "source", "title"}.
    """
    if not Path(path).is_file():
        raise RagloraError(f"dataset file not found: {path} (run `raglora data` to write the stages' datasets)")
    rows = read_jsonl(path)
    if not rows and not allow_empty:
        raise RagloraError(f"dataset {path} has no examples (stage {stage})")
    out = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        row_id = str(row.get("id", f"{Path(path).name}:{lineno}"))
        if detect_format(row) == "text":
            text = _text(row["text"], f"{where}: text")
            if not text.strip():
                raise RagloraError(f"{where}: empty 'text'")
            source, title = row.get("source"), row.get("title")
            out.append({"id": row_id, "stage": stage, "text": text, "source": source, "title": title})
            continue
        msgs = to_messages(row, where)
        convo = [m for m in msgs if m["role"] != "system"]
        single_turn = len(convo) == 2 and convo[0]["role"] == "user" and convo[1]["role"] == "assistant"
        out.append(
            {
                "id": row_id,
                "stage": stage,
                "messages": msgs,
                "faq_id": row.get("faq_id"),
                "category": row.get("category"),
                "source": row.get("source"),
                "question": row.get("question") or (convo[0]["content"] if single_turn else None),
                "answer": row.get("answer") or (convo[1]["content"] if single_turn else None),
            }
        )
    return out


def is_text_example(example: dict) -> bool:
    """A document chunk (text stage) rather than a conversation."""
    return "messages" not in example and isinstance(example.get("text"), str)


# ---------------------------------------------------------------------------------------------- formatting


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    """The conversation with our system prompt first unless the row brings its own."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def raft_messages(example: dict, contexts: list[dict], system_prompt: str, answer: str) -> list[dict]:
    """A RAFT training conversation: the serving prompt (question + numbered contexts) and the target."""
    msgs = build_messages(example["question"], contexts=contexts, system_prompt=system_prompt)
    return [*msgs, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------------------------------------- tokenising


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> dict | None:
    """input_ids + labels where labels are -100 except on assistant turns (content and end-of-turn token).

    The rendered text is cut at every assistant turn's start (= the prompt the model sees at serving time
    with add_generation_prompt=True) and end, and each piece is tokenized on its own, so the prompt part is
    byte-for-byte what serving tokenizes. Returns None when truncation leaves no trained token.
    """
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True))
        end = len(_render(tokenizer, messages[: i + 1], False))
        if not (start <= end <= len(full)):
            raise RagloraError("the tokenizer's chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((start, end))
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    pos = 0

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    for start, end in spans:
        prompt = enc(full[pos:start])
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        turn = enc(full[start:end])
        # train through the end-of-turn token; what the template appends after it (a newline) is not trained
        cut = len(turn)
        if eos is not None and eos in turn:
            cut = len(turn) - turn[::-1].index(eos)
        ids += turn
        labels += turn[:cut] + [IGNORE_INDEX] * (len(turn) - cut)
        pos = end
    tail = enc(full[pos:])
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels, "length": len(ids)}


def tokenize_text(tokenizer, text: str, max_length: int) -> list[dict]:
    """Plain text (no chat template) as windows of <= max_length tokens with a label on every token.

    The text ends with the end-of-sequence token. A text longer than max_length is split into windows that
    overlap by one token, so every token except the very first is a target once (the first token of a row
    is never predicted); nothing is dropped. Windows of fewer than two tokens train nothing and are skipped.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    stride = max(1, max_length - 1)
    windows = []
    for start in range(0, max(1, len(ids) - 1), stride):
        piece = ids[start : start + max_length]
        if len(piece) >= 2:
            windows.append({"input_ids": piece, "labels": list(piece), "length": len(piece)})
    return windows


# ---------------------------------------------------------------------------------------------- mixing


def sample_replay(earlier: list[dict], n_current: int, fraction: float, seed: int | str) -> list[dict]:
    """round(fraction * n_current) rows drawn without replacement from earlier stages' training rows."""
    if fraction <= 0 or not earlier:
        return []
    n = min(round(fraction * n_current), len(earlier))
    return random.Random(f"replay:{seed}").sample(earlier, n)


# ---------------------------------------------------------------------------------------------- batching


def _chunks(seq: list, size: int) -> list[list]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def plan_epoch(
    lengths: list[int], batch_size: int, *, seed: int | str, epoch: int, group_by_length: bool, mega_batch_factor: int
) -> list[list[int]]:
    """One epoch of batches (lists of example indices), seeded.

    group_by_length: shuffle, cut into mega-batches of `mega_batch_factor` batches, sort each by length and cut
    into batches (similar lengths together -> little padding), shuffle the batch order, longest batch first so
    an out-of-memory shows up at step 1.
    """
    rng = random.Random(f"{seed}:epoch:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return _chunks(order, batch_size)
    batches = []
    for mega in _chunks(order, batch_size * mega_batch_factor):
        mega.sort(key=lambda i: -lengths[i])
        batches += _chunks(mega, batch_size)
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def plan_batches(
    lengths: list[int],
    batch_size: int,
    n_batches: int,
    *,
    seed: int | str,
    group_by_length: bool,
    mega_batch_factor: int = 16,
) -> list[list[int]]:
    """At least n_batches batches: consecutive seeded epochs, cut to exactly n_batches."""
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < n_batches:
        plan += plan_epoch(
            lengths,
            batch_size,
            seed=seed,
            epoch=epoch,
            group_by_length=group_by_length,
            mega_batch_factor=mega_batch_factor,
        )
        epoch += 1
    return plan[:n_batches]


def padding_efficiency(lengths: list[int], plan: list[list[int]]) -> float:
    """Real tokens / padded tokens when every batch of `plan` is padded to its longest row."""
    return sum(lengths[i] for b in plan for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in plan)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: positions into rows whose total length <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(examples: list[dict], *, pad_id: int, packing: bool = False, max_length: int | None = None) -> dict:
    """Tensors for one micro-batch, padded to the batch's longest row (right padding).

    packing=True concatenates examples into rows of <= max_length tokens with position_ids restarting at 0 for
    every example and no attention_mask: transformers then builds a block-diagonal causal mask (flash-attention
    uses the same position_ids as varlen boundaries), so no token attends across examples. Padding gets its
    own restarting positions and -100 labels, so it is a separate (ignored) segment.
    """
    if packing:
        cap = max(max_length or 0, max(e["length"] for e in examples))
        groups = [[examples[j] for j in row] for row in pack_rows([e["length"] for e in examples], cap)]
    else:
        groups = [[e] for e in examples]
    width = max(sum(e["length"] for e in g) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(groups), width), dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    for r, group in enumerate(groups):
        col = 0
        for e in group:
            n = e["length"]
            input_ids[r, col : col + n] = torch.tensor(e["input_ids"])
            lab = torch.tensor(e["labels"])
            lab[0] = IGNORE_INDEX  # never a target (unpacked, position 0 is never predicted either)
            labels[r, col : col + n] = lab
            attention_mask[r, col : col + n] = 1
            position_ids[r, col : col + n] = torch.arange(n)
            col += n
        position_ids[r, col:] = torch.arange(width - col)
    batch = {"input_ids": input_ids, "labels": labels}
    if packing:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attention_mask
    batch["num_tokens"] = int(attention_mask.sum())
    batch["num_padded"] = int(input_ids.numel())
    return batch
