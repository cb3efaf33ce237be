"""bench/train_peak_cpu.py's --max-seq search: the longest sequence whose counted peak
(one SFT LoRA step on fake tensors, plait-preference's live-bytes count) fits a budget."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def train_peak_cpu():
    sys.path.insert(0, str(BENCH))
    try:
        import train_peak_cpu

        yield train_peak_cpu
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("budget", [10_000, 123_457, 3_000_000, 99])
def test_search_finds_the_boundary_of_a_growing_peak(train_peak_cpu, budget):
    # a peak that grows with the length, with a fixed part: the answer fits and the next multiple does not,
    # whether the first probe fits (doubling up) or not (halving down), and 0 when nothing fits
    peak = lambda seq: 300 + 7 * seq  # noqa: E731
    seen = []
    longest, peaks = train_peak_cpu.search_max_seq(peak, budget, start=2048, granule=64, report=seen.append)
    assert longest % 64 == 0
    assert peaks == {seq: peak(seq) for seq in peaks} and len(seen) == len(peaks)
    assert peak(longest + 64) > budget
    if longest:
        assert peak(longest) <= budget
    else:
        assert peak(64) > budget


def test_search_with_a_host_budget_stops_where_the_host_is_full(train_peak_cpu):
    # the device fits everything up to 10 MB; the host (2 bytes a token) only up to 3000 bytes: 1472
    longest, _ = train_peak_cpu.search_max_seq(lambda seq: seq, 10**7, start=1024, granule=64, report=lambda _: None,
                                               host_of=lambda seq: 2 * seq, host_budget_bytes=3000)
    assert longest == 1472


def test_search_on_counted_peaks_of_a_fake_step(train_peak_cpu):
    # the smoke shape's SFT LoRA step at micro batch 1 (one step: no AdamW state), counted on fake tensors:
    # a budget between the peaks at 512 and 1024 tokens gives 512, and 1024 (the next multiple) does not fit
    pytest.importorskip("plait_kernels")
    pytest.importorskip("plait_preference")
    pytest.importorskip("triton")
    import throughput

    counted = {}

    def peak_of(seq):
        if seq not in counted:
            counted[seq] = train_peak_cpu.fake_sft_peak(throughput.SHAPES["smoke"], micro_batch=1, seq=seq, steps=1)
        return counted[seq]["peak_bytes"]

    assert peak_of(512) < peak_of(1024)  # the peak grows with the length
    budget = (peak_of(512) + peak_of(1024)) // 2
    longest, peaks = train_peak_cpu.search_max_seq(peak_of, budget, start=512, granule=512, report=lambda line: None)
    assert longest == 512
    assert peaks[512] <= budget < peaks[1024]
    assert sorted(peaks) == [512, 1024]
    groups = dict(counted[512]["groups"])
    assert sum(groups.values()) == counted[512]["peak_bytes"]  # the composition adds up to the peak


def test_a_quantized_base_is_refused(train_peak_cpu):
    pytest.importorskip("plait_preference")
    import throughput

    with pytest.raises(ValueError, match="load_in_4bit"):
        train_peak_cpu.fake_sft_peak(throughput.SHAPES["smoke"], micro_batch=1, seq=64,
                                     keys={"adapter": "qlora", "load_in_4bit": True})


def test_offload_moves_each_layer_input_off_the_count(train_peak_cpu):
    # gradient_checkpointing: offload parks every checkpointed layer's input ([seq, hidden] bf16) in host
    # memory: it is counted as host bytes (at least those inputs), none without offload. (At this 2-layer
    # shape the device peak is not lower: the fetched copies outweigh the two parked inputs.)
    pytest.importorskip("plait_kernels")
    pytest.importorskip("plait_preference")
    pytest.importorskip("triton")
    import throughput

    dims, seq = throughput.SHAPES["smoke"], 512
    kept = train_peak_cpu.fake_sft_peak(dims, micro_batch=1, seq=seq, steps=1)
    offloaded = train_peak_cpu.fake_sft_peak(dims, micro_batch=1, seq=seq, steps=1, offload=True)
    layer_input = seq * dims["hidden_size"] * 2
    assert kept["host_peak_bytes"] == 0
    assert offloaded["host_peak_bytes"] >= dims["num_hidden_layers"] * layer_input
