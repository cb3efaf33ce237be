"""Tiny random-init models of every family, for tests of this package and of
plugins that use families (copy ``EXTRA_CONFIG``'s entry when adding a family).

Models are built from transformers' own config classes (``AutoConfig.for_model``)
with a tiny shape, so they exercise the real module layout without a hub.
"""

from __future__ import annotations

#: per model type, what AutoConfig needs on top of the shared tiny shape
EXTRA_CONFIG = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "phi3": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    # every layer sparse, as in the released checkpoints
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
}
MODEL_TYPES = list(EXTRA_CONFIG)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)



def build_model(model_type: str, vocab_size: int = 300, seed: int = 0, **overrides):
    """A random-init causal LM of ``model_type`` with the tiny shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=2, **{**SHAPE, **EXTRA_CONFIG[model_type], **overrides})
    torch.manual_seed(seed)
    # gemma2's attention soft-capping is only exact in eager attention
    attn = "eager" if model_type == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def fixed_batch(vocab_size: int = 300, seed: int = 1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (2, 24), generator=generator)


def train_steps(model, params, input_ids, steps: int = 6, lr: float = 1e-2, extra_loss=None) -> list[float]:
    """A few AdamW steps on one fixed batch; returns the losses."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(input_ids=input_ids, labels=input_ids)
        loss = out.loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses
