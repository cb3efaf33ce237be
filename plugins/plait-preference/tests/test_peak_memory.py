"""The live-bytes count of a DPO step on fake tensors (plait_preference.peak_memory, which
bench/preference_peak_cpu.py runs at the 1b bench shape), at a small shape whose peak sits,
as the 1b one's does, in an MLP backward."""

import pytest

pytest.importorskip("plait_kernels")
pytest.importorskip("triton")

#: a Llama whose MLP is wide (intermediate 16x hidden) so its buffers dominate as at 1b (4x, with 128k vocab)
DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=1024, vocab_size=512, tie_word_embeddings=True)
PAIRS, PROMPT, RESPONSE = 2, 48, 49


def test_dpo_step_peak_and_what_is_live_there():
    # The accounting: the frozen weights are counted exactly (bf16) and the groups add up to the peak,
    # the highest of the phases' highs. The cut: at the peak (an MLP backward, here the first layer's, whose
    # backward comes after the second's gradients exist) one [tokens, 2 x intermediate] buffer is live, the
    # saved [gate | up] that the backward overwrites with its gradient, not a second one for the gradient
    # (plait_kernels.lora_mlp); its backward's [tokens, intermediate] d_h is there.
    from plait.pipeline import setup_model
    from plait_preference.peak_memory import fake_dpo_peak

    result = fake_dpo_peak(DIMS, setup_model, pairs=PAIRS, prompt=PROMPT, response=RESPONSE, lora_r=4, lora_alpha=8)
    tokens, hidden, inter, layers = (result["tokens"], DIMS["hidden_size"], DIMS["intermediate_size"],
                                     DIMS["num_hidden_layers"])
    assert tokens == PAIRS * 2 * (PROMPT + RESPONSE)
    groups = dict(result["groups"])
    assert sum(groups.values()) == result["peak_bytes"]
    params = (DIMS["vocab_size"] * hidden + layers * (2 * hidden * hidden + 2 * hidden * hidden // 2
                                                       + 3 * hidden * inter + 2 * hidden) + hidden)
    # gate and up's weights are views of the fused LoRA MLP's stacked buffer (plait_kernels.lora_mlp_fold),
    # whose storage also holds both B's columns: [2 x intermediate, hidden + 2 r] a layer, bf16
    kept_lora_columns = layers * 2 * inter * 2 * 4
    assert groups["weights (frozen)"] == 2 * (params + kept_lora_columns)
    assert "lora_mlp.py:backward" in result["peak_at"]
    sizes = [nbytes for nbytes, _ in result["largest"]]
    assert sizes.count(tokens * 2 * inter * 2) == 1
    assert tokens * inter * 2 in sizes
    assert max(result["phase_peaks"].values()) == result["peak_bytes"]
