"""The chunked log-probabilities: values and gradients against autograd through
full logits, and the memory of a DPO step against an SFT step of the same tokens.

Tolerance: 1e-5 (float32 on a CPU; chunking changes only summation order).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def reference_logps(hidden, weight, targets, bias=None, softcap=None):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk,bias,softcap", [(None, False, None), (7, True, None), (5, True, 3.0)])
def test_chunked_logps_and_gradients_equal_full_logits(chunk, bias, softcap):
    from plait_preference.logps import chunked_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (23,))
    upstream = torch.randn(23)
    ours = chunked_token_logps(hidden, weight, targets, chunk, bias=b, softcap=softcap)
    (ours * upstream).sum().backward()
    leaves = [hidden, weight] + ([b] if bias else [])
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    expected = reference_logps(hidden, weight, targets, b, softcap)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for name, g, x in zip(("hidden", "weight", "bias"), got, leaves):
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_logps_under_bf16_autocast_equal_full_logits():
    """Autocast's bf16 matmuls, float32 reductions, as the plain autograd path:
    the log-probs and the hidden states' gradient come out equal; the head's
    gradient sums its chunks in float32 (the weight's dtype) where the full
    product rounds once to bf16, so it agrees to bf16's precision."""
    from plait_preference.logps import chunked_token_logps

    torch.manual_seed(2)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    upstream = torch.randn(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_token_logps(hidden, weight, targets, 7)
        (ours * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_logps(hidden, weight, targets)
        (expected * upstream).sum().backward()
    assert ours.dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=0, atol=float(weight.grad.abs().max()) * 2**-7)


def test_chunked_logps_frozen_head_and_no_grad():
    from plait_preference.logps import chunked_token_logps

    torch.manual_seed(1)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # a LoRA run's head: frozen
    targets = torch.randint(0, 30, (9,))
    chunked_token_logps(hidden, weight, targets, 4).sum().backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        assert chunked_token_logps(hidden, weight, targets, 4).grad_fn is None
    empty = chunked_token_logps(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,)


def tiny_lora(vocab):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))


@pytest.mark.slow
def test_dpo_step_peak_memory_at_most_an_sft_step():
    """A DPO step (policy and reference forwards, log-probs, backward) holds no
    more CPU memory at its peak than an SFT step (core's chunked cross-entropy)
    on the same tokens: the head's logits dominate both at a 16k vocabulary,
    and the preference log-probs keep one chunk's buffer where the plain autograd
    recompute of a 2048-token chunk kept about four (508 MiB against the SFT
    step's 384 MiB in bench/preference_memory_cpu.py before the change)."""
    import random

    from plait.model.forward import forward_hidden
    from plait.model.head import chunked_linear_cross_entropy
    from plait.testing import build_run_config
    from plait_preference.logps import SEGMENT_KEYS
    from plait_preference.objective import PreferenceObjective
    from plait_preference.rows import CHOSEN, REJECTED, segments_row
    from plait_preference.testing import step_peak_bytes

    vocab = 16000
    cfg, pm = build_run_config({"base_model": "unused", "rl": "dpo", "adapter": "lora", "lora_target_linear": True})
    rng = random.Random(0)
    rows = []
    for _ in range(2):
        prompt, chosen, rejected = ([rng.randrange(3, vocab) for _ in range(n)] for n in (32, 128, 128))
        row = segments_row(prompt, [chosen, rejected], [CHOSEN, REJECTED])
        rows.append({**row, "seq_lens": row["extras"]["seq_lens"], "extras": [row["extras"]]})
    batch = pm.hook.collate(cfg=cfg, rows=rows, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=1))
    model = tiny_lora(vocab)
    model.train()
    objective = PreferenceObjective(cfg, model)
    assert objective.reference == "adapter_off"
    run = SimpleNamespace(model=model, device=torch.device("cpu"), pm=pm, cfg=cfg)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", *SEGMENT_KEYS)}

    def dpo():
        objective.loss(run, batch, training=True)[0].backward()

    def sft():
        hidden, head, _ = forward_hidden(model, inputs)
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        chunked_linear_cross_entropy(flat, head.weight, batch["labels"][:, 1:].reshape(-1))[0].backward()

    for step in (dpo, sft):  # warm: gradient buffers of the LoRA weights exist before measuring
        step()
    sft_peak, dpo_peak = step_peak_bytes(sft), step_peak_bytes(dpo)
    logits_bytes = 512 * vocab * 4  # float32 logits of the step's 512 response tokens
    assert sft_peak >= 2 * logits_bytes  # the measurement sees the logits
    assert dpo_peak <= sft_peak, (dpo_peak / 2**20, sft_peak / 2**20)
    assert dpo_peak <= 1.5 * logits_bytes, (dpo_peak / 2**20, logits_bytes / 2**20)


@pytest.mark.parametrize("vocab, tokens", [(128256, 256), (32000, 1024), (151936, 128), (2**20, 32), (10**9, 16)])
def test_chunks_are_whole_matmul_tiles_within_the_logits_budget(vocab, tokens):
    from plait_preference.logps import CHUNK_ELEMENTS, chunk_tokens

    assert chunk_tokens(vocab) == tokens
    # within the float32 budget, except the 16-token floor of an absurd vocabulary
    assert chunk_tokens(vocab) * vocab <= CHUNK_ELEMENTS or tokens == 16
