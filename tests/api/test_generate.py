"""The generator: batched == one-at-a-time greedy, stage switching without reloads, stacked == merged,
repetition control equal to transformers' logits processors on the answer tokens."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import STAGES, prompt_ids
from tiny_model import make_tiny_model, make_tiny_tokenizer

from pipeline.generate import Generator, SamplingParams, eos_token_ids
from pipeline.stage_models import StageModels, discover_stages
from raglora.errors import RagloraError

QUESTIONS = ["hello", "Do I need a building permit for an extension?", "What does a permit cost in Stockholm, roughly?"]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def stacked(tok, adapters_dir):
    models = StageModels(make_tiny_model(tok), tok, adapters_dir)
    gen = Generator(models, batching=True, max_batch_size=8, batch_wait_ms=50)
    yield gen
    gen.close()


def test_discovers_stages_in_order_with_parents(adapters_dir):
    stages = discover_stages(adapters_dir)
    assert [s.name for s in stages] == list(STAGES)
    assert stages[2].chain == STAGES


def test_missing_parent_is_a_clear_error(tmp_path, adapters_dir):
    import shutil

    shutil.copytree(adapters_dir / "domain", tmp_path / "domain")
    with pytest.raises(RagloraError, match="general"):
        discover_stages(tmp_path)


@pytest.mark.parametrize("stage", [None, *STAGES])
def test_batched_equals_sequential_greedy(stacked, tok, stage):
    params = SamplingParams(max_new_tokens=12)
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    sequential = [stacked.generate(p, stage=stage, params=params).text for p in prompts]
    handles = [stacked.submit(p, stage=stage, params=params) for p in prompts]
    results = [h.result(timeout=30) for h in handles]
    assert [r.text for r in results] == sequential
    assert max(r.batch_size for r in results) > 1  # they really ran together
    assert len({len(p) for p in prompts}) == 3  # and needed left padding


def test_stages_change_outputs_and_switching_does_not_reload(stacked, tok):
    params = SamplingParams(max_new_tokens=10)
    p = prompt_ids(tok, QUESTIONS[1])
    loads = stacked.models.adapter_loads
    outs = {stage: stacked.generate(p, stage=stage, params=params).text for stage in [None, *STAGES]}
    again = {stage: stacked.generate(p, stage=stage, params=params).text for stage in reversed([None, *STAGES])}
    assert outs == again
    assert len(set(outs.values())) == 4  # each adapter (stack) changes the output
    assert stacked.models.adapter_loads == loads == len(STAGES)


def test_mixed_stage_batch_is_grouped(stacked, tok):
    params = SamplingParams(max_new_tokens=8)
    p = prompt_ids(tok, QUESTIONS[0])
    expected = {s: stacked.generate(p, stage=s, params=params).text for s in [None, "domain"]}
    handles = [stacked.submit(p, stage=s, params=params) for s in [None, "domain", None, "domain"]]
    assert [h.result(timeout=30).text for h in handles] == [expected[h.stage] for h in handles]


def test_stacked_adapters_equal_pre_merged_copies(tok, adapters_dir, stacked):
    merged = Generator(StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="merged"), batching=False)
    try:
        params = SamplingParams(max_new_tokens=10)
        for stage in STAGES:
            p = prompt_ids(tok, QUESTIONS[2])
            assert (
                merged.generate(p, stage=stage, params=params).text
                == stacked.generate(p, stage=stage, params=params).text
            )
    finally:
        merged.close()


def test_per_request_max_tokens_and_stream_deltas(stacked, tok):
    p = prompt_ids(tok, QUESTIONS[1])
    short = stacked.submit(p, params=SamplingParams(max_new_tokens=3))
    long = stacked.submit(p, params=SamplingParams(max_new_tokens=9))
    deltas = list(long)
    assert "".join(deltas) == long.result().text
    r_short, r_long = short.result(timeout=30), long.result(timeout=30)
    assert r_short.completion_tokens <= 3 and r_long.completion_tokens <= 9
    assert r_short.finish_reason in ("length", "stop")
    assert r_long.ttft_s is not None and r_long.ttft_s > 0


def test_sampling_params_are_honoured_and_seeded(stacked, tok):
    p = prompt_ids(tok, QUESTIONS[0])
    a = stacked.generate(p, params=SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)).text
    b = stacked.generate(p, params=SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)).text
    greedy = stacked.generate(p, params=SamplingParams(max_new_tokens=10)).text
    assert a == b
    assert a != greedy


def test_cancel_stops_generation(tok):
    gen = Generator(StageModels(make_tiny_model(tok), tok, None), batching=False)
    try:
        handle = gen.submit(prompt_ids(tok, "hi"), params=SamplingParams(max_new_tokens=400))
        handle.cancel()
        result = handle.result(timeout=30)
        assert result.finish_reason == "cancelled"
        assert result.completion_tokens < 400
    finally:
        gen.close()


def test_batching_off_runs_one_at_a_time(tok):
    gen = Generator(StageModels(make_tiny_model(tok), tok, None), batching=False)
    try:
        handles = [gen.submit(prompt_ids(tok, q), params=SamplingParams(max_new_tokens=4)) for q in QUESTIONS]
        assert all(h.result(timeout=30).batch_size == 1 for h in handles)
    finally:
        gen.close()


def test_close_drains_queued_requests_and_refuses_new(tok):
    gen = Generator(StageModels(make_tiny_model(tok), tok, None), batching=True, batch_wait_ms=1)
    handles = [gen.submit(prompt_ids(tok, q), params=SamplingParams(max_new_tokens=4)) for q in QUESTIONS]
    closer = threading.Thread(target=gen.close)
    closer.start()
    closer.join(30)
    assert all(h.done and h.finish_reason in ("stop", "length") for h in handles)
    with pytest.raises(RagloraError, match="shutting down"):
        gen.submit(prompt_ids(tok, "hi"))


def test_unknown_stage_is_rejected(stacked, tok):
    with pytest.raises(RagloraError, match="not available"):
        stacked.submit(prompt_ids(tok, "hi"), stage="nope")


# -- repetition control ------------------------------------------------------------------------------------------

REPEAT = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}


def _reference_greedy(model, tok, prompt: list[int], max_new_tokens: int, penalty: float, ngram: int) -> list[int]:
    """One prompt, no padding, no KV cache: full forward per token, transformers' own processors on the answer."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    eos = eos_token_ids(model, tok)
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            scores = model(torch.tensor([prompt + answer])).logits[:, -1, :]
            seen = torch.tensor([answer], dtype=torch.long)
            if answer:
                scores = RepetitionPenaltyLogitsProcessor(penalty)(seen, scores)
                scores = NoRepeatNGramLogitsProcessor(ngram)(seen, scores)
            token = int(scores.argmax(-1))
            if token in eos:
                break
            answer.append(token)
    return answer


def _repeats_an_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_repetition_control_equals_transformers_processors_on_the_answer(tok):
    """Batched with left padding, the generator's penalty and n-gram ban equal HF's RepetitionPenaltyLogitsProcessor
    and NoRepeatNGramLogitsProcessor run on each answer alone (the prompt and the padding are not penalised)."""
    model = make_tiny_model(tok)
    gen = Generator(StageModels(model, tok, None), batching=True, max_batch_size=8, batch_wait_ms=50)
    try:
        prompts = [prompt_ids(tok, q) for q in QUESTIONS]
        params = SamplingParams(max_new_tokens=24, **REPEAT)
        handles = [gen.submit(p, params=params) for p in prompts]
        results = [h.result(timeout=60) for h in handles]
        assert max(r.batch_size for r in results) > 1 and len({len(p) for p in prompts}) == 3
        expected = [_reference_greedy(model, tok, p, 24, penalty=1.3, ngram=2) for p in prompts]
        assert [h.token_ids for h in handles] == expected
        off = SamplingParams(max_new_tokens=24, repetition_penalty=1.0, no_repeat_ngram_size=0)
        plain = [gen.generate(p, params=off).text for p in prompts]
        assert plain != [r.text for r in results]  # the control changed what the random model writes
    finally:
        gen.close()


def test_no_repeat_ngram_stops_a_loop(stacked, tok):
    p = prompt_ids(tok, QUESTIONS[0])
    off = stacked.submit(p, params=SamplingParams(max_new_tokens=40, no_repeat_ngram_size=0))
    on = stacked.submit(p, params=SamplingParams(max_new_tokens=40, no_repeat_ngram_size=3))
    off.result(timeout=60), on.result(timeout=60)
    assert _repeats_an_ngram(off.token_ids, 3)  # the random model loops when nothing stops it
    assert not _repeats_an_ngram(on.token_ids, 3)


def test_default_sampling_does_not_loop(stacked, tok):
    """Serving and evaluation decode with SamplingParams' defaults: they carry the measured repetition control."""
    p = prompt_ids(tok, QUESTIONS[0])
    n = SamplingParams().no_repeat_ngram_size
    assert n > 0
    off = stacked.submit(p, params=SamplingParams(max_new_tokens=60, no_repeat_ngram_size=0))
    default = stacked.submit(p, params=SamplingParams(max_new_tokens=60))
    off.result(timeout=60), default.result(timeout=60)
    assert _repeats_an_ngram(off.token_ids, n)
    assert not _repeats_an_ngram(default.token_ids, n)


@pytest.mark.parametrize("stage", [None, "subdomain"])
def test_batched_equals_sequential_with_repetition_control(stacked, tok, stage):
    params = SamplingParams(max_new_tokens=16, **REPEAT)
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    sequential = [stacked.generate(p, stage=stage, params=params).text for p in prompts]
    handles = [stacked.submit(p, stage=stage, params=params) for p in prompts]
    assert [h.result(timeout=30).text for h in handles] == sequential
    assert max(h.batch_size for h in handles) > 1


@pytest.mark.parametrize("bad", [{"repetition_penalty": 0.0}, {"no_repeat_ngram_size": -1}])
def test_bad_repetition_settings_are_clear_errors(bad):
    with pytest.raises(RagloraError, match=next(iter(bad))):
        SamplingParams(**bad)
