"""MetricSums: an objective's metrics summed over micro-batches and read in one
transfer, at the step's end (read_with) or during the next step (read_later,
then read: defer_step_read)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plait.train.metric_sums import MetricSums

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def summed(device: str) -> tuple[MetricSums, torch.Tensor]:
    sums = MetricSums(SimpleNamespace(device=torch.device(device)))
    for chosen, rejected in ((1.5, -0.5), (2.5, 0.25)):
        sums.add({"rewards/chosen": (torch.tensor(chosen, device=device), 2),
                  "rewards/rejected": (torch.tensor(rejected, device=device), 2)})
    return sums, torch.tensor(7.0, dtype=torch.float64, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_read_later_gives_the_values_at_the_time_it_was_asked(device):
    """What the device does after read_later (the next step's work, here an
    in-place change of the loss and the sums) does not reach the values read,
    which equal read_with's, and means() uses them."""
    eager, loss = summed(device)
    expected = eager.read_with([loss])
    late, loss = summed(device)
    if device == "cuda":
        torch.cuda._sleep(50_000_000)  # the stream busy ahead of the copy: a read that did not wait would see none
    pending = late.read_later([loss])
    loss.add_(100.0)  # queued after the copy on a GPU: must not show
    late._vector.add_(100.0)
    assert late.read(pending) == expected == [7.0]
    assert late.means() == eager.means() == {"rewards/chosen": 1.0, "rewards/rejected": -0.0625}
