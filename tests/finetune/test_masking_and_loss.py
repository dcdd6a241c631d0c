"""Assistant-only labels (every assistant turn incl. its end-of-turn token) and the masked loss."""

from __future__ import annotations

import torch
from tiny_model import make_tiny_model, make_tiny_tokenizer

from finetune.data import IGNORE_INDEX, collate, tokenize_conversation
from finetune.train import CausalLMLoss

CONVO = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I am fine."},
    {"role": "user", "content": "What is a bygglov?"},
    {"role": "assistant", "content": "A building permit."},
]


def _trained_spans(tok, ids, labels):
    """Decoded text of each maximal run of trained tokens."""
    spans, cur = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_labels_cover_exactly_the_assistant_turns_and_their_end_token():
    tok = make_tiny_tokenizer()
    ex = tokenize_conversation(tok, CONVO)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == tok(tok.apply_chat_template(CONVO, tokenize=False), add_special_tokens=False)["input_ids"]
    assert _trained_spans(tok, ids, labels) == ["I am fine.<|im_end|>", "A building permit.<|im_end|>"]
    # every label is either -100 or equal to its input id
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    # the system/user turns, the "assistant\n" headers and the newline after <|im_end|> are not trained
    prompt_end = len(tok.apply_chat_template(CONVO[:2], add_generation_prompt=True, return_dict=False))
    assert set(labels[:prompt_end]) == {IGNORE_INDEX}
    assert labels[-1] == IGNORE_INDEX and tok.decode([ids[-1]]) == "\n"


def test_truncation_keeps_the_prefix_and_drops_examples_without_targets():
    tok = make_tiny_tokenizer()
    full = tokenize_conversation(tok, CONVO)
    cut = tokenize_conversation(tok, CONVO, max_length=full["length"] - 3)
    assert cut["input_ids"] == full["input_ids"][: full["length"] - 3]
    prompt_len = len(tok.apply_chat_template(CONVO[:2], add_generation_prompt=True, return_dict=False))
    assert tokenize_conversation(tok, CONVO, max_length=prompt_len) is None


def test_masked_loss_equals_a_hand_computation_and_the_full_forward():
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok)
    examples = [
        tokenize_conversation(tok, CONVO),
        tokenize_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
    ]
    batch = collate(examples, pad_id=tok.pad_token_id)
    loss_sum, n = CausalLMLoss(model)(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    # by hand: position t predicts token t+1 wherever the label of t+1 is not -100
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for row, ex in enumerate(examples):
        for t in range(ex["length"] - 1):
            target = ex["labels"][t + 1]
            if target != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[row, t], -1)[target])
    assert int(n) == len(terms) == sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in examples)
    torch.testing.assert_close(loss_sum, torch.stack(terms).sum(), rtol=1e-5, atol=1e-5)
    # the library's own shifted loss (mean) agrees
    ref = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss.float()
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-5)
    # the fast path (LM head on target positions only) and the generic path agree
    slow = CausalLMLoss(model, prompt_learning=True)
    s2, n2 = slow(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(s2, loss_sum)
    assert int(n2) == int(n)


def test_the_chunked_fused_head_loss_gives_the_plain_loss_and_gradients(monkeypatch):
    """Loss and every gradient (hidden states, a trainable head's weight and bias) as F.cross_entropy gives them,
    with chunks far smaller than the positions, so chunk edges are crossed."""
    import torch.nn.functional as F

    from finetune import train

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    monkeypatch.setattr(train, "HEAD_CHUNK_BYTES", 4 * 50 * 5)  # 5 positions per chunk
    fused = train.head_loss(head, hidden, targets)
    (2.5 * fused).backward()  # a scaled upstream gradient, as the loop's division by the token count gives
    got = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    (2.5 * ref).backward()
    torch.testing.assert_close(fused, ref)
    for g, t in zip(got, (hidden, head.weight, head.bias), strict=True):
        torch.testing.assert_close(g, t.grad)
    with torch.no_grad():  # evaluation: the loss only
        torch.testing.assert_close(train.head_loss(head, hidden, targets), ref.detach())
