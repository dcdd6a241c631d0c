"""Shared builders for the finetune tests: a tiny model folder, tiny stage datasets, a stub retriever."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from finetune.config import FinetuneConfig, ModelConfig, StageConfig

QA = [
    ("Do I need a building permit for an extension?", "Yes, an extension normally needs a bygglov."),
    ("How long does a permit take?", "The municipality decides within ten weeks."),
    ("Is a permit required for a deck?", "A deck under 1.8 metres needs no permit."),
    ("What does a permit cost?", "The fee depends on the size of the building."),
    ("Can I build a garage without a permit?", "A garage over 15 square metres needs a permit."),
    ("Do I need a permit to demolish?", "Demolition needs a rivningslov."),
    ("What is a friggebod?", "A small building of at most 15 square metres."),
    ("What is an attefallshus?", "A small house of up to 30 square metres."),
]
CHAT = [
    ("Hello, how are you?", "I am fine, thank you."),
    ("What is your name?", "I am a bot."),
    ("Good morning", "Good morning to you too."),
    ("Thanks", "You are welcome."),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def faq_rows(prefix: str = "bygglov", n: int = len(QA)) -> list[dict]:
    rows = []
    for i, (q, a) in enumerate(QA[:n]):
        fid = f"{prefix}-{i:03d}"
        rows.append(
            {
                "id": fid,
                "faq_id": fid,
                "category": prefix,
                "question": q,
                "answer": a,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
        )
    return rows


def chat_rows() -> list[dict]:
    return [
        {"id": f"chat-{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(CHAT)
    ]


def write_stage_data(data_dir: Path) -> Path:
    write_jsonl(data_dir / "general/train.jsonl", chat_rows())
    write_jsonl(data_dir / "general/validation.jsonl", chat_rows()[:2])
    write_jsonl(data_dir / "domain/train.jsonl", faq_rows("bygglov"))
    write_jsonl(data_dir / "domain/validation.jsonl", faq_rows("bygglov", 3))
    write_jsonl(data_dir / "subdomain/train.jsonl", faq_rows("tillbyggnad", 5))
    write_jsonl(data_dir / "subdomain/validation.jsonl", faq_rows("tillbyggnad", 2))
    return data_dir


def tiny_cfg(n_stages: int = 3, max_steps: int = 2, **overrides) -> FinetuneConfig:
    names = ["general", "domain", "subdomain"][:n_stages]
    stages = [
        StageConfig(
            name=n,
            train_file=f"{n}/train.jsonl",
            validation_file=f"{n}/validation.jsonl",
            max_steps=max_steps,
            batch_size=2,
            lr=1e-2,
            warmup_ratio=0.0,
        )
        for n in names
    ]
    values = {"seed": 7, "stages": stages, "save_steps": 1000, "eval_max_examples": 8}
    values.update(overrides)
    return FinetuneConfig(**values)


def tiny_model_cfg(base: Path, **kw) -> ModelConfig:
    """CPU, max_length 256 and short system prompts (written beside the model folder) to keep tests fast."""
    plain = Path(base).parent / "system.txt"
    rag = Path(base).parent / "system_rag.txt"
    plain.write_text("You are a helpful assistant.", encoding="utf-8")
    rag.write_text("Answer only from the numbered context.", encoding="utf-8")
    values = {"system_prompt_file": str(plain), "rag_system_prompt_file": str(rag), "max_length": 256}
    values.update(kw)
    return ModelConfig(base=str(base), device="cpu", **values)


class StubIndex:
    """Anything with `search(query, *, k, mode)`: returns every chunk, the gold-looking ones first."""

    def __init__(self, rows: list[dict]):
        self.chunks = [
            SimpleNamespace(chunk_id=r["id"], source=r["id"], title=r["category"], text=r["answer"]) for r in rows
        ]
        self.manifest = {"stub": len(rows)}
        self.queries: list[str] = []

    def search(self, query: str, *, k: int, mode: str = "hybrid", filters=None):
        self.queries.append(query)
        words = set(query.lower().split())
        ranked = sorted(self.chunks, key=lambda c: -len(words & set(c.text.lower().split())))
        return [SimpleNamespace(chunk=c, score=1.0 / (i + 1)) for i, c in enumerate(ranked[:k])]
