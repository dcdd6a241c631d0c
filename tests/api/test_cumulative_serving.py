"""The `cumulative` adapter strategy: one adapter per stage (its whole chain), rows of any stage in one forward."""

from __future__ import annotations

import pytest
import torch
from helpers import STAGES
from tiny_model import make_tiny_model, make_tiny_tokenizer

from pipeline.stage_models import StageModels
from raglora.errors import RagloraError


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def merged(adapters_dir, tok):
    return StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="merged")


@pytest.fixture(scope="module")
def cumulative(adapters_dir, tok):
    return StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="cumulative")


def _prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy(models: StageModels, stage: str | None, ids: torch.Tensor, n: int = 8) -> list[int]:
    out = ids
    with models.use(stage) as module:
        for _ in range(n):
            nxt = module(input_ids=out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1] :].tolist()


@torch.no_grad()
def test_cumulative_gives_the_merged_logits_and_greedy_tokens_for_every_stage_and_the_base(merged, cumulative):
    ids = _prompt(0, 14)
    greedy = {}
    for stage in [None, *STAGES]:
        with merged.use(stage) as m, cumulative.use(stage) as c:
            torch.testing.assert_close(c(input_ids=ids).logits, m(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        greedy[stage] = _greedy(cumulative, stage, ids)
        assert greedy[stage] == _greedy(merged, stage, ids), stage
    assert len({tuple(g) for g in greedy.values()}) > 1  # the stages do change the output (the test can fail)


@torch.no_grad()
def test_use_rows_gives_each_row_of_a_mixed_batch_what_it_gets_alone_with_left_padding_and_a_cache(cumulative):
    from transformers import DynamicCache

    assert cumulative.mixes_stages
    stages = ["subdomain", None, "general", "domain", "general"]
    lengths = [9, 5, 12, 7, 12]
    width = max(lengths)
    ids = torch.zeros(len(stages), width, dtype=torch.long)
    mask = torch.zeros(len(stages), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = _prompt(10 + i, n)[0]
        mask[i, width - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.randint(3, 300, (len(stages), 1), generator=torch.Generator().manual_seed(99))

    def run(module, kwargs, rows):
        cache = DynamicCache()
        first = module(input_ids=ids[rows], attention_mask=mask[rows], position_ids=pos[rows], cache=cache,
                       use_cache=True, **kwargs).logits  # fmt: skip
        second = module(
            input_ids=step[rows],
            attention_mask=torch.cat([mask[rows], torch.ones(len(rows), 1, dtype=torch.long)], dim=1),
            position_ids=pos[rows, -1:] + 1,
            cache=cache,
            use_cache=True,
            **kwargs,
        ).logits
        return first, second

    with cumulative.use_rows(stages) as (module, kwargs):
        assert kwargs["adapter_names"][1] == "__base__"
        mixed_first, mixed_second = run(module, kwargs, list(range(len(stages))))
    for i, stage in enumerate(stages):
        with cumulative.use(stage) as module:
            first, second = run(module, {}, [i])
        n = lengths[i]  # positions that are padding differ by design (masked garbage); compare the real tokens
        torch.testing.assert_close(mixed_first[i, -n:], first[0, -n:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mixed_second[i], second[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed_second[2], mixed_second[1], atol=1e-3)


def test_switching_stages_and_mixing_rows_loads_no_adapter_again(cumulative):
    loads = cumulative.adapter_loads
    assert loads == len(STAGES)  # one cumulative adapter per stage, built in memory at start
    ids = _prompt(3, 6)
    with torch.no_grad():
        for stage in [*STAGES, None, *reversed(STAGES)]:
            with cumulative.use(stage) as module:
                module(input_ids=ids)
        with cumulative.use_rows([None, *STAGES]) as (module, kwargs):
            module(input_ids=ids.repeat(len(STAGES) + 1, 1), **kwargs)
    assert cumulative.adapter_loads == loads


def test_stack_and_merged_refuse_mixed_rows_in_one_line_but_run_rows_of_one_stage(adapters_dir, tok, merged):
    stack = StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="stack")
    ids = _prompt(5, 6)
    for models in (stack, merged):
        assert not models.mixes_stages
        mixed = models.use_rows(["general", "domain"])
        with pytest.raises(RagloraError, match="runs one stage per forward, got rows of domain, general"):
            mixed.__enter__()
        with torch.no_grad(), models.use_rows(["domain", "domain"]) as (module, kwargs):
            assert kwargs == {}
            rows = module(input_ids=ids.repeat(2, 1)).logits
        with torch.no_grad(), models.use("domain") as module:
            torch.testing.assert_close(rows[1], module(input_ids=ids).logits[0])
    with pytest.raises(RagloraError, match="stage adapter 'nope' is not available"):
        merged.use_rows(["nope", None]).__enter__()


def test_an_unknown_strategy_names_the_three(adapters_dir, tok):
    with pytest.raises(RagloraError, match="stack, merged, cumulative"):
        StageModels(make_tiny_model(tok), tok, adapters_dir, strategy="stacked")
