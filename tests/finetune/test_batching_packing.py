"""Length-grouped batch plans, packing boundaries, and no attention leakage between packed examples."""

from __future__ import annotations

import random

import torch
from tiny_model import make_tiny_model, make_tiny_tokenizer

from finetune.data import IGNORE_INDEX, collate, pack_rows, plan_batches, plan_epoch, tokenize_conversation
from finetune.train import CausalLMLoss


def _padded(plan, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in plan)


def test_grouped_plan_is_seeded_covers_every_example_and_pads_less():
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(200)]
    a = plan_epoch(lengths, 8, seed=1, epoch=0, group_by_length=True, mega_batch_factor=5)
    assert a == plan_epoch(lengths, 8, seed=1, epoch=0, group_by_length=True, mega_batch_factor=5)
    assert a != plan_epoch(lengths, 8, seed=1, epoch=1, group_by_length=True, mega_batch_factor=5)
    assert sorted(i for b in a for i in b) == list(range(200))
    assert max(lengths[i] for i in a[0]) == max(lengths)  # longest batch first (OOM shows at step 1)
    plain = plan_epoch(lengths, 8, seed=1, epoch=0, group_by_length=False, mega_batch_factor=5)
    assert _padded(a, lengths) < 0.75 * _padded(plain, lengths)
    # within a mega-batch, batches are sorted by length: each batch's spread is small
    assert sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) < sum(
        max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain
    )


def test_plan_spans_epochs_to_reach_the_requested_number_of_batches():
    plan = plan_batches([5] * 10, 4, 7, seed=0, group_by_length=True)
    assert len(plan) == 7  # 3 batches per epoch -> parts of 3 epochs
    assert sorted(i for b in plan[:3] for i in b) == list(range(10))


def test_pack_rows_respects_capacity_and_keeps_everything():
    lengths = [50, 40, 30, 30, 20, 10, 90]
    rows = pack_rows(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 3


def _examples(tok):
    convos = [
        [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "I am fine, thanks."}],
        [{"role": "user", "content": "What is a bygglov?"}, {"role": "assistant", "content": "A building permit."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    return [tokenize_conversation(tok, [{"role": "system", "content": "Help."}, *c]) for c in convos]


def test_packed_batch_has_restarting_positions_and_masked_boundaries():
    tok = make_tiny_tokenizer()
    ex = _examples(tok)
    batch = collate(ex, pad_id=tok.pad_token_id, packing=True, max_length=200)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert len(starts) == 3 and batch["num_tokens"] == sum(e["length"] for e in ex)
    for s in starts:
        assert batch["labels"][0, s] == IGNORE_INDEX  # nothing predicts across a boundary
    # capacity forces two rows; padding gets its own restarting positions and no labels
    batch = collate(ex, pad_id=tok.pad_token_id, packing=True, max_length=ex[0]["length"] + ex[2]["length"])
    assert batch["input_ids"].shape[0] == 2
    assert batch["num_padded"] > batch["num_tokens"]


def test_packing_has_no_cross_example_attention_leakage():
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok)
    ex = _examples(tok)
    packed = collate(ex, pad_id=tok.pad_token_id, packing=True, max_length=400)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        col = 0
        for e in ex:
            alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits
            torch.testing.assert_close(logits[:, col : col + e["length"]], alone, rtol=1e-5, atol=1e-5)
            col += e["length"]
        # the loss over the packed batch equals the loss over the padded batch
        loss = CausalLMLoss(model)
        padded = collate(ex, pad_id=tok.pad_token_id)
        s1, n1 = loss(packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
        s2, n2 = loss(padded["input_ids"], padded["labels"], attention_mask=padded["attention_mask"])
    assert int(n1) == int(n2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


def test_leakage_would_be_detected():
    """Control: without restarting positions the second example does see the first (so the test has teeth)."""
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok)
    a, b = _examples(tok)[:2]
    ids = torch.tensor([a["input_ids"] + b["input_ids"]])
    with torch.no_grad():
        joined = model(input_ids=ids, use_cache=False).logits[:, a["length"] :]
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits
    assert not torch.allclose(joined, alone, atol=1e-4)
