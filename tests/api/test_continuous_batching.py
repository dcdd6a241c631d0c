"""The continuous-batching engine: requests join a running batch between decode steps and leave when done, and
every row still decodes exactly as it would alone (greedy, seeded sampling, chunked prefill, mixed stages)."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import STAGES, prompt_ids
from tiny_model import make_tiny_model, make_tiny_tokenizer

from pipeline import generate
from pipeline.generate import Generator, SamplingParams, detokenize_step
from pipeline.stage_models import StageModels
from raglora.errors import RagloraError

REPEAT_30 = SamplingParams(max_new_tokens=30, repetition_penalty=1.3)
LONG_QUESTION = "Do I need a building permit for an extension of my house? " * 4  # ~120 prompt tokens


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def base_models(tok):
    """The tiny model with sharpened attention: its random init attends almost uniformly, so a wrong position
    id or mask would barely change its tokens; scaled query/key projections make both matter."""
    model = make_tiny_model(tok)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return StageModels(model, tok, None)


def _sizes(gen: Generator) -> list[int]:
    sizes: list[int] = []
    gen.on_batch = lambda size, stage, seconds: sizes.append(size)
    return sizes


def _wait_tokens(handle, n: int, timeout: float = 30) -> None:
    deadline = time.perf_counter() + timeout
    while len(handle.token_ids) < n and not handle.done:
        assert time.perf_counter() < deadline, "generation did not advance"
        time.sleep(0.001)


def _alone(models, prompt, stage=None, params=None):
    """The request run by itself (batching off): the finished handle, with its text and token ids."""
    gen = Generator(models, batching=False)
    try:
        handle = gen.submit(prompt, stage=stage, params=params)
        handle.result(timeout=60)
        return handle
    finally:
        gen.close()


def test_staggered_joins_equal_one_at_a_time(base_models, tok, monkeypatch):
    """Two prompts of different lengths prefilled together (left-padded), then one longer and one shorter than
    the running rows joining while they decode, with different max_new_tokens: every request gets exactly the
    tokens it gets alone."""
    runs = [
        (prompt_ids(tok, "hello"), SamplingParams(max_new_tokens=80, no_repeat_ngram_size=0)),
        (prompt_ids(tok, "What does a permit cost in Stockholm, roughly, for a small extension?"), REPEAT_30),
        (prompt_ids(tok, LONG_QUESTION), SamplingParams(max_new_tokens=12)),
        (prompt_ids(tok, "hi"), SamplingParams(max_new_tokens=5)),
    ]
    assert len(runs[1][0]) - len(runs[0][0]) > 10 and len(runs[2][0]) > len(runs[1][0]) + 20
    alone = [_alone(base_models, p, params=s) for p, s in runs]
    assert len(alone[0].token_ids) == 80  # the first row outlives the others' whole lives
    gen = Generator(base_models, batching=True, max_batch_size=8, batch_wait_ms=100)
    sizes = _sizes(gen)
    seen = _record_logits(monkeypatch)
    try:
        together = [gen.submit(p, params=s) for p, s in runs[:2]]
        _wait_tokens(together[0], 5)
        longer = gen.submit(*runs[2][:1], params=runs[2][1])
        _wait_tokens(longer, 3)
        shorter = gen.submit(runs[3][0], params=runs[3][1])
        handles = [*together, longer, shorter]
        results = [h.result(timeout=60) for h in handles]
    finally:
        gen.close()
    assert [h.token_ids for h in handles] == [a.token_ids for a in alone]
    assert [r.text for r in results] == [a.text for a in alone]
    first = handles[0]
    assert sizes[0] == 2  # the first two were prefilled together
    assert all(h.first_token_at < first.finished_at for h in handles[2:])  # the others joined while it decoded
    assert max(sizes) >= 3 and sizes[-1] == 1  # rows joined, then left again
    _assert_logits_equal_unbatched(base_models.base, seen)


def _record_logits(monkeypatch) -> list:
    """Every (handle, answer length, logits) the engine chooses a token from."""
    seen = []
    choose = generate.choose_tokens

    def spy(rows, logits):
        seen.extend((r.handle, len(r.tokens), logits[i].clone()) for i, r in enumerate(rows))
        return choose(rows, logits)

    monkeypatch.setattr(generate, "choose_tokens", spy)
    return seen


def _assert_logits_equal_unbatched(model, seen) -> None:
    """Each row's logits at each step equal one unpadded, uncached forward over its prompt and answer so far:
    positions, masks, merged and trimmed caches all right (greedy tokens alone would miss small errors)."""
    assert seen
    worst = 0.0
    with torch.no_grad():
        for handle, n, logits in seen:
            ref = model(torch.tensor([handle.prompt_ids + handle.token_ids[:n]])).logits[0, -1]
            worst = max(worst, float((ref - logits).abs().max()))
    assert worst < 1e-4


def test_a_request_joins_a_running_batch(base_models, tok):
    gen = Generator(base_models, batching=True, max_batch_size=8, batch_wait_ms=0)
    sizes = _sizes(gen)
    try:
        long = gen.submit(prompt_ids(tok, "hello"), params=SamplingParams(max_new_tokens=80, no_repeat_ngram_size=0))
        _wait_tokens(long, 10)
        short = gen.submit(prompt_ids(tok, "hi"), params=SamplingParams(max_new_tokens=6))
        short.result(timeout=30)
        assert not long.done  # the first was still decoding when the second finished
        long.result(timeout=30)
    finally:
        gen.close()
    assert long.batch_size == short.batch_size == 2
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1


def test_chunked_prefill_equals_whole_prompt_and_keeps_streams_running(base_models, tok, monkeypatch):
    """A long prompt prefilled 8 tokens per step gives the tokens of a whole-prompt prefill, and a running row
    gets a token every step meanwhile (it stalls one chunk per step, not the whole prompt)."""
    prompt = prompt_ids(tok, LONG_QUESTION)
    params = SamplingParams(max_new_tokens=16)
    whole = _alone(base_models, prompt, params=params)
    chunked = Generator(base_models, batching=True, prefill_chunk_tokens=8, batch_wait_ms=0)
    sizes = _sizes(chunked)
    seen = _record_logits(monkeypatch)
    try:
        runner = chunked.submit(prompt_ids(tok, "hello"), params=SamplingParams(max_new_tokens=80))
        _wait_tokens(runner, 3)
        mark = len(sizes)
        joiner = chunked.submit(prompt, params=params)
        assert joiner.result(timeout=30).text == whole.text
        assert joiner.token_ids == whole.token_ids
        runner.result(timeout=30)
    finally:
        chunked.close()
    alone_steps = sizes[mark:].index(2)  # decode steps of the runner alone while the joiner was prefilled
    assert alone_steps >= (len(prompt) - chunked.prefix_tokens_reused) // 8 - 2  # the system prompt was reused
    _assert_logits_equal_unbatched(base_models.base, seen)


def test_a_shared_prompt_start_is_reused_not_prefilled_again(base_models, tok, adapters_dir, monkeypatch):
    """A prompt that starts like the previous one of its stage (the same system prompt) copies that start's
    K/V instead of prefilling it, with the logits of a full forward; another stage's K/V are never reused."""
    first, second = prompt_ids(tok, "Do I need a permit for a deck?"), prompt_ids(tok, LONG_QUESTION)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= generate.PREFIX_MIN_TOKENS
    params = SamplingParams(max_new_tokens=12)
    expected = _alone(base_models, second, params=params)
    gen = Generator(base_models, batching=False)
    seen = _record_logits(monkeypatch)
    try:
        gen.generate(first, params=params)
        assert gen.prefix_tokens_reused == 0
        again = gen.submit(second, params=params)
        again.result(timeout=30)
    finally:
        gen.close()
    assert gen.prefix_tokens_reused == shared
    assert again.token_ids == expected.token_ids
    _assert_logits_equal_unbatched(base_models.base, seen)

    staged = Generator(StageModels(make_tiny_model(tok), tok, adapters_dir), batching=False)
    try:
        staged.generate(first, stage="general", params=params)
        other = staged.generate(second, stage="domain", params=params)
        assert staged.prefix_tokens_reused == 0
        same = staged.generate(second, stage="general", params=params)
        assert staged.prefix_tokens_reused == shared
    finally:
        staged.close()
    assert other.text == _alone(staged.models, second, stage="domain", params=params).text
    assert same.text == _alone(staged.models, second, stage="general", params=params).text


def test_incremental_detokenisation_equals_full_decode(tok):
    """Multi-byte text (emoji bytes split over tokens) streams without U+FFFD, waits for a character's last byte,
    adds up to the full decode, and never decodes more than a short window per token."""
    text = "Hej åäö 😀 — ok ✓ 中文 🙂 fin." * 3
    ids = tok.encode(text)
    windows: list[int] = []

    class Counting:
        def decode(self, token_ids, **kwargs):
            windows.append(len(token_ids))
            return tok.decode(token_ids, **kwargs)

    deltas, offsets, held = [], (0, 0), 0
    for n in range(1, len(ids) + 1):
        delta, *offsets = detokenize_step(Counting(), ids[:n], *offsets)
        held += delta == ""
        deltas.append(delta)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert held > 0  # some tokens ended inside a character and waited
    assert max(windows) <= 8 < len(ids)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_incremental_ngram_ban_equals_transformers_processor(n):
    """The engine keeps the n-gram ban per row incrementally; it bans what NoRepeatNGramLogitsProcessor bans on
    the answer so far, at every length."""
    from transformers import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(n)
    answer = torch.randint(0, 6, (60,), generator=g).tolist()  # a small alphabet: many repeated n-grams
    row = generate._Row(generate.GenerationHandle([1], None, SamplingParams(no_repeat_ngram_size=n)), "cpu")
    banned_any = False
    for token in answer:
        row.append(token)
        scores = NoRepeatNGramLogitsProcessor(n)(torch.tensor([row.tokens]), torch.zeros(1, 6))
        expected = set(torch.nonzero(scores[0] == -float("inf")).flatten().tolist())
        assert set(row.banned()) == expected
        banned_any |= bool(expected)
    assert banned_any


def test_engine_text_equals_decoded_tokens(base_models, tok):
    gen = Generator(base_models, batching=True, batch_wait_ms=20)
    try:
        handles = [
            gen.submit(prompt_ids(tok, q), params=SamplingParams(max_new_tokens=40))
            for q in ("hello", "åäö 😀?", "Is a deck a building?")
        ]
        streamed = ["".join(h) for h in handles]
    finally:
        gen.close()
    assert streamed == [h.text for h in handles] == [tok.decode(h.token_ids, skip_special_tokens=True) for h in handles]


def test_cancel_leaves_the_batch(base_models, tok):
    params = SamplingParams(max_new_tokens=60, no_repeat_ngram_size=0)
    keep_prompt = prompt_ids(tok, "hello")
    expected = _alone(base_models, keep_prompt, params=params)
    gen = Generator(base_models, batching=True, batch_wait_ms=50)
    sizes = _sizes(gen)
    try:
        keep = gen.submit(keep_prompt, params=params)
        drop = gen.submit(prompt_ids(tok, "hi"), params=SamplingParams(max_new_tokens=400))
        _wait_tokens(drop, 5)
        drop.cancel()
        result = drop.result(timeout=30)
        assert result.finish_reason == "cancelled" and result.completion_tokens < 60
        assert keep.result(timeout=30).text == expected.text
    finally:
        gen.close()
    assert sizes[0] == 2 and sizes[-1] == 1


def test_seeded_sampling_does_not_depend_on_batch_mates(base_models, tok):
    p = prompt_ids(tok, "What does a permit cost?")
    params = SamplingParams(max_new_tokens=20, temperature=1.3, top_p=0.9, seed=11, no_repeat_ngram_size=0)
    alone = _alone(base_models, p, params=params)
    gen = Generator(base_models, batching=True, batch_wait_ms=50)
    try:
        mates = [
            gen.submit(prompt_ids(tok, "hello"), params=SamplingParams(max_new_tokens=30)),
            gen.submit(prompt_ids(tok, "hi"), params=SamplingParams(max_new_tokens=30, temperature=1.0, seed=3)),
        ]
        sampled = gen.submit(p, params=params)
        result = sampled.result(timeout=30)
        other_seed = gen.generate(p, params=SamplingParams(**{**params.__dict__, "seed": 12}))
        [m.result(timeout=30) for m in mates]
    finally:
        gen.close()
    assert result.batch_size > 1
    assert result.text == alone.text
    assert other_seed.text != alone.text  # the seed is what fixes it


def test_mixed_stages_share_a_forward_and_equal_each_alone(tok, adapters_dir):
    models = StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="cumulative")
    assert models.mixes_stages
    params = SamplingParams(max_new_tokens=10)
    p = prompt_ids(tok, "Do I need a building permit for an extension?")
    expected = {s: _alone(models, p, stage=s, params=params).text for s in [None, *STAGES]}
    assert len(set(expected.values())) == 4
    gen = Generator(models, batching=True, batch_wait_ms=50, prefill_chunk_tokens=1024)
    try:
        handles = [gen.submit(p, stage=s, params=params) for s in [None, *STAGES]]
        results = [h.result(timeout=30) for h in handles]
    finally:
        gen.close()
    assert {h.stage: r.text for h, r in zip(handles, results, strict=True)} == expected
    assert all(r.batch_size == 4 for r in results)


def test_one_stage_per_batch_is_served_oldest_first(tok, adapters_dir):
    """Without mixed-stage forwards a waiting request of another stage stops admissions until the batch drains,
    so a newer request of the running stage cannot overtake it."""
    models = StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="stack")
    gen = Generator(models, batching=True, batch_wait_ms=0)
    try:
        first = gen.submit(prompt_ids(tok, "hello"), stage="general", params=SamplingParams(max_new_tokens=60))
        _wait_tokens(first, 3)
        other = gen.submit(prompt_ids(tok, "hi"), stage="domain", params=SamplingParams(max_new_tokens=4))
        same = gen.submit(prompt_ids(tok, "hey"), stage="general", params=SamplingParams(max_new_tokens=4))
        for h in (first, other, same):
            h.result(timeout=30)
    finally:
        gen.close()
    assert other.first_token_at > first.finished_at  # it waited for the general batch to drain
    assert same.first_token_at > other.first_token_at  # and was not overtaken by a newer general request
    assert first.batch_size == other.batch_size == same.batch_size == 1


def test_a_failed_forward_fails_its_rows_and_the_worker_lives_on(tok):
    model = make_tiny_model(tok)
    gen = Generator(StageModels(model, tok, None), batching=True, batch_wait_ms=20)
    fail = {"on": True}

    def boom(module, args):
        if fail["on"]:
            raise RuntimeError("simulated device error")

    hook = model.register_forward_pre_hook(boom)
    try:
        handles = [gen.submit(prompt_ids(tok, q), params=SamplingParams(max_new_tokens=4)) for q in ("a", "b")]
        for h in handles:
            with pytest.raises(RagloraError, match="generation failed"):
                h.result(timeout=30)
        fail["on"] = False
        assert gen.generate(prompt_ids(tok, "hello"), params=SamplingParams(max_new_tokens=4)).completion_tokens > 0
    finally:
        hook.remove()
        gen.close()


def test_kv_cache_rows_leave_and_padding_is_trimmed(base_models, tok):
    """When the longest row leaves, the columns that were padding for everyone else are dropped."""
    gen = Generator(base_models, batching=True, batch_wait_ms=50)
    widths: list[int] = []
    gen.on_batch = lambda size, stage, seconds: widths.append(gen._running.n)
    try:
        short = gen.submit(prompt_ids(tok, "hi"), params=SamplingParams(max_new_tokens=30))
        long = gen.submit(prompt_ids(tok, LONG_QUESTION), params=SamplingParams(max_new_tokens=3))
        long.result(timeout=30), short.result(timeout=30)
    finally:
        gen.close()
    assert len(long.prompt_ids) - len(short.prompt_ids) > 50
    assert max(widths) > len(long.prompt_ids)  # the short row was left-padded to the long prompt's width
    assert widths[-1] <= len(short.prompt_ids) + len(short.token_ids)  # and lost that padding once it left
