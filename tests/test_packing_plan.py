"""The packing plan: fill, determinism, ranks, and refusals (no model needed)."""

import math
import random

import pytest

from plait.data.packing import pack_bins, plan_packed_batches, sample_packing_efficiency, use_packing
from plait.errors import DataError


def realistic_lengths(n=2000, seed=0):
    """Many short rows, a few long ones: lognormal around 200 tokens, clipped to 30..1500."""
    rng = random.Random(seed)
    return [max(30, min(1500, int(rng.lognormvariate(math.log(200), 0.9)))) for _ in range(n)]


def flat_bins(plan):
    return [b for mb in plan for b in mb]


def test_bins_fit_and_cover_every_row_once():
    lengths = realistic_lengths()
    plan = plan_packed_batches(lengths, 4096, 4, seed=1, epoch=0)
    bins = flat_bins(plan)
    assert all(sum(lengths[i] for i in b) <= 4096 for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(1 <= len(mb) <= 4 for mb in plan) and all(len(mb) == 4 for mb in plan[:-1])


def test_efficiency_on_realistic_lengths_is_at_least_98_percent():
    lengths = realistic_lengths()
    assert max(lengths) > 1000 and sorted(lengths)[len(lengths) // 2] < 300  # the shape we claim
    plan = plan_packed_batches(lengths, 4096, 2, seed=0, epoch=0)
    efficiency = sample_packing_efficiency(plan, lengths, 4096)
    assert efficiency >= 0.98, efficiency
    # the bound: no plan can use fewer bins than ceil(tokens / sequence_len)
    assert len(flat_bins(plan)) <= math.ceil(sum(lengths) / 4096) + 1


def test_plan_is_deterministic_and_epoch_changes_it():
    lengths = realistic_lengths(500, seed=3)
    first = plan_packed_batches(lengths, 2048, 2, seed=7, epoch=0)
    assert first == plan_packed_batches(lengths, 2048, 2, seed=7, epoch=0)
    assert first != plan_packed_batches(lengths, 2048, 2, seed=7, epoch=1)
    assert first != plan_packed_batches(lengths, 2048, 2, seed=8, epoch=0)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_get_equal_steps_and_disjoint_rows(world_size):
    lengths = realistic_lengths(700, seed=5)
    plans = [plan_packed_batches(lengths, 2048, 2, seed=0, epoch=2, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert len({len(p) for p in plans}) == 1  # same number of micro-batches everywhere
    assert len({len(flat_bins(p)) for p in plans}) == 1
    rows = [sorted(i for b in flat_bins(p) for i in b) for p in plans]
    seen = [i for r in rows for i in r]
    assert len(seen) == len(set(seen))  # disjoint
    # what is dropped is less than one bin per rank, and the emptiest bins
    single = flat_bins(plan_packed_batches(lengths, 2048, 2, seed=0, epoch=2))
    assert len(single) - sum(len(flat_bins(p)) for p in plans) == len(single) % world_size
    dropped_tokens = sum(lengths) - sum(lengths[i] for i in seen)
    assert dropped_tokens < world_size * 2048


def test_single_process_drops_nothing_and_tiny_data_fails_clearly():
    assert sorted(i for b in flat_bins(plan_packed_batches([5, 6, 7], 16, 1, 0, 0)) for i in b) == [0, 1, 2]
    with pytest.raises(DataError, match="fewer than the 4 ranks"):
        plan_packed_batches([5, 6, 7], 16, 1, 0, 0, rank=0, world_size=4)


def test_overlong_row_is_a_data_error_naming_the_row():
    with pytest.raises(DataError, match="row 1 has 40 tokens.*sequence_len=32"):
        pack_bins([10, 40, 5], 32)


def test_max_rows_per_bin():
    bins = pack_bins([1] * 50, 100, max_rows_per_bin=8)
    assert max(len(b) for b in bins) == 8 and len(bins) == 7


def test_best_fit_fills_exactly_when_it_can():
    # 6+4, 7+3, 5+5 fill bins of 10 exactly; first-fit on this order would not need to
    bins = pack_bins([6, 4, 7, 3, 5, 5], 10)
    assert len(bins) == 3


def test_eval_follows_eval_sample_packing():
    class Cfg:
        sample_packing = True
        eval_sample_packing = None

    cfg = Cfg()
    assert use_packing(cfg, "train") and use_packing(cfg, "eval")
    cfg.eval_sample_packing = False
    assert use_packing(cfg, "train") and not use_packing(cfg, "eval")


def test_a_failed_packed_batch_is_described_even_without_a_message():
    from plait.data.packing import _describe_failure

    def get_masks(lengths):
        if lengths is not None:
            raise AssertionError  # what a bare assert raises outside pytest (XLM's mask check): no message

    try:
        get_masks([3, 4])
    except AssertionError as exc:
        described = _describe_failure(exc)
    assert described.startswith("AssertionError in get_masks() of test_packing_plan.py, line ")
    assert _describe_failure(ValueError("mask  of\n rank 3")) == "ValueError: mask of rank 3"
