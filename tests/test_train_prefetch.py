"""The loop's step prefetch (next window collated on a worker thread) and the
all-ones attention mask left on the host."""

from __future__ import annotations

import threading

import pytest
import torch

from plait.model.batch import drop_full_attention_mask, drop_right_padding_mask
from plait.train.prefetch import StepPrefetcher


def test_prefetch_returns_every_window_in_order_and_collates_started_ones_on_the_worker():
    threads = {}

    def collate_window(window):
        threads[window] = threading.current_thread().name
        return [f"batch of {window}"]

    windows = ["w0", "w1", "w2"]
    prefetch = StepPrefetcher(collate_window)
    try:
        got = []
        for i in range(3):
            got.append(prefetch.get(0, windows, i))
            prefetch.start(0, windows, i + 1)  # what the loop does as the step's last backward begins
    finally:
        prefetch.close()
    assert got == [["batch of w0"], ["batch of w1"], ["batch of w2"]]
    assert threads["w0"] == threading.current_thread().name  # nothing was started before the first
    assert threads["w1"].startswith("plait-collate") and threads["w2"].startswith("plait-collate")


def test_a_started_window_of_another_epoch_or_index_is_not_used():
    calls = []
    prefetch = StepPrefetcher(lambda window: calls.append(window) or [window])
    try:
        assert prefetch.get(0, ["a", "b"], 0) == ["a"]
        prefetch.start(0, ["a", "b"], 1)
        assert prefetch.get(1, ["c", "d"], 1) == ["d"]  # a new epoch (or a resume): collated here
        prefetch.start(1, ["c", "d"], 2)  # past the epoch's end: nothing to start
    finally:
        prefetch.close()
    assert calls.count("d") == 1


def test_a_data_error_in_the_worker_surfaces_at_its_step():
    def collate_window(window):
        if window == "bad":
            raise ValueError("row 3 of data.jsonl: bad")
        return [window]

    prefetch = StepPrefetcher(collate_window)
    try:
        assert prefetch.get(0, ["ok", "bad"], 0) == ["ok"]
        prefetch.start(0, ["ok", "bad"], 1)
        with pytest.raises(ValueError, match="row 3 of data.jsonl"):
            prefetch.get(0, ["ok", "bad"], 1)
    finally:
        prefetch.close()


def test_an_all_ones_mask_is_dropped_and_every_other_mask_kept():
    ids = torch.arange(8).view(2, 4)
    full = {"input_ids": ids, "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    assert "attention_mask" not in drop_full_attention_mask(full)
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert drop_full_attention_mask(padded) is padded
    packed = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 2, 2], [1, 1, 1, 2]])}  # segment ids
    assert drop_full_attention_mask(packed) is packed
    four_d = {"input_ids": ids, "attention_mask": torch.ones(2, 1, 4, 4, dtype=torch.bool)}
    assert drop_full_attention_mask(four_d) is four_d


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny causal LM in eval mode and two rows of 12 random token ids."""
    from transformers import AutoModelForCausalLM

    from plait.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("mask") / "m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def test_dropping_the_all_ones_mask_leaves_the_logits_unchanged(tiny_lm):
    model, ids = tiny_lm
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        unmasked = model(**drop_full_attention_mask({"input_ids": ids,
                                                        "attention_mask": torch.ones_like(ids)})).logits
    assert torch.equal(masked, unmasked)


def test_a_right_padding_mask_is_dropped_and_every_other_mask_kept():
    ids = torch.arange(12).view(3, 4)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])}
    assert "attention_mask" not in drop_right_padding_mask(right)
    for mask in ([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]],   # left padding: positions would shift
                 [[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]],   # a hole
                 [[1, 1, 2, 2], [1, 1, 1, 2], [1, 1, 1, 1]]):  # packed segment ids
        batch = {"input_ids": ids, "attention_mask": torch.tensor(mask)}
        assert drop_right_padding_mask(batch) is batch
    four_d = {"input_ids": ids, "attention_mask": torch.ones(3, 1, 4, 4, dtype=torch.bool)}
    assert drop_right_padding_mask(four_d) is four_d


def test_dropping_a_right_padding_mask_leaves_the_real_tokens_logits_unchanged(tiny_lm):
    # causal attention: no real token looks at the padding after it
    model, ids = tiny_lm
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(**drop_right_padding_mask({"input_ids": ids, "attention_mask": mask})).logits
    real = mask.bool()
    torch.testing.assert_close(unmasked[real], masked[real], rtol=1e-5, atol=1e-5)
