"""``gemma4_hybrid_attn_impl``: the global layers run SDPA, the sliding ones
the model's backend; the masks SDPA needs are rebuilt from the flash-attn form.

flash-attn needs a GPU, so on the CPU the sliding layers' backend is eager
(the same mask path: a 4-D mask passes through) and the flash-attn mask form
(``None`` or ``[batch, keys]``, packed rows told apart by ``position_ids``) is
fed to the global layers' function directly. Tolerance: SDPA and eager sum
the same float32 products in another order, 1e-5."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError
from plait.model.hybrid_attention import GLOBAL_BACKEND, apply_hybrid_attention, hybrid_sdpa_forward
from plait.testing import build_run_config, make_tiny_model

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gemma3") / "model", family="gemma3_text", num_hidden_layers=4,
                           layer_types=LAYER_TYPES, sliding_window=4, head_dim=16)


def load(path, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def test_global_layers_run_sdpa_and_the_logits_stay_the_same(tiny_gemma3):
    reference = load(tiny_gemma3, "eager")
    hybrid = load(tiny_gemma3, "eager")
    line = apply_hybrid_attention(hybrid)
    assert line.startswith("gemma4_hybrid_attn_impl: 2 global attention layers run SDPA")
    backends = [layer.self_attn.config._attn_implementation for layer in hybrid.model.layers]
    assert backends == ["eager", GLOBAL_BACKEND, "eager", GLOBAL_BACKEND]
    calls = []
    from transformers import AttentionInterface

    AttentionInterface.register(GLOBAL_BACKEND, lambda module, *a, **k: calls.append(module.layer_idx)
                                or hybrid_sdpa_forward(module, *a, **k))  # counts the calls
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 12, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    try:
        with torch.no_grad():
            want = reference(input_ids=ids, attention_mask=mask).logits
            got = hybrid(input_ids=ids, attention_mask=mask).logits
    finally:
        AttentionInterface.register(GLOBAL_BACKEND, hybrid_sdpa_forward)
    assert calls == [1, 3]  # the global layers, once each
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], rtol=1e-5, atol=1e-5)


def test_the_flash_form_masks_become_sdpa_masks():
    """What a flash-attn model hands a global layer: no mask (packed rows known
    by position_ids restarting) or a [batch, keys] padding mask."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    # two packed rows, 4 and 3 tokens: each attends only to its own earlier tokens
    packed, _ = hybrid_sdpa_forward(module, q, k, v, None, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]]),
                                    scaling=8 ** -0.5)
    for rows in (slice(0, 4), slice(4, 7)):
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                                                 is_causal=True, scale=8 ** -0.5)
        torch.testing.assert_close(packed[:, rows], alone.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # the same rows given as varlen offsets (Plait's packed flash-attn batches), position_ids not restarting
    offsets, _ = hybrid_sdpa_forward(module, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 4, 7], dtype=torch.int32),
                                     position_ids=torch.arange(7)[None], scaling=8 ** -0.5)
    torch.testing.assert_close(offsets, packed, rtol=0, atol=0)
    # a decoding step (one query over the cached keys): the query is the last position, it sees every key
    step, _ = hybrid_sdpa_forward(module, q[:, :, -1:], k, v, None, scaling=8 ** -0.5)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=8 ** -0.5)
    torch.testing.assert_close(step[:, 0], full.transpose(1, 2)[:, -1], rtol=1e-5, atol=1e-5)
    # padding on the left: the padded keys are never attended to
    padded, _ = hybrid_sdpa_forward(module, q, k, v, torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), scaling=8 ** -0.5)
    alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], is_causal=True,
                                                             scale=8 ** -0.5)
    torch.testing.assert_close(padded[:, 2:], alone.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_the_key_needs_flash_attention_2_and_a_model_with_both_layer_kinds(tmp_path):
    with pytest.raises(ConfigError, match=r"'gemma4_hybrid_attn_impl': true runs the sliding-window layers with "
                                          r"flash_attention_2 .* attn_implementation is 'sdpa'"):
        build_run_config({"base_model": "m", "gemma4_hybrid_attn_impl": True, "attn_implementation": "sdpa"})
    llama = make_tiny_model(tmp_path / "llama")
    with pytest.raises(ConfigError, match="has no sliding-window and global attention layers"):
        apply_hybrid_attention(load(llama, "eager"))
