"""``gemma4_hybrid_attn_impl``: two attention backends in one model.

Gemma 4's global (``full_attention``) layers have a head dimension of 512,
which flash-attn cannot run; its sliding-window layers have a small one. With
the key on (Axolotl's meaning), the sliding layers keep the model's backend
(``flash_attention_2``) and the global layers run torch's SDPA.

transformers reads the attention function of each attention module from that
module's ``config._attn_implementation``, so a global layer gets a copy of the
config naming :data:`GLOBAL_BACKEND`. The model still builds its masks in the
flash-attn form (``None``, or a ``[batch, keys]`` padding mask, with packed rows
told apart by varlen offsets ``cu_seq_lens_q`` or ``position_ids`` restarting
at 0), which SDPA cannot read:
:func:`hybrid_sdpa_forward` turns that into SDPA's ``[batch, 1, queries, keys]``
mask (causal, padding, and rows of a packed sequence kept apart) and passes a
mask that is already 4-D through unchanged.
"""

from __future__ import annotations

#: the attention function global layers run (registered with transformers under this name)
GLOBAL_BACKEND = "plait_hybrid_sdpa"


def document_ids(position_ids):
    """``[batch, seq]`` ids of the packed row each token belongs to: a new row
    starts wherever ``position_ids`` go back to 0 (``0 1 2 0 1`` -> ``0 0 0 1 1``)."""
    import torch

    starts = (position_ids == 0).to(torch.int64)
    starts[:, 0] = 1
    return torch.cumsum(starts, dim=1)


def segment_ids(cu_seq_lens, batch: int, width: int):
    """``[batch, width]`` segment ids from varlen offsets over the flattened
    batch (Plait's packed flash-attn batches carry them as ``cu_seq_lens_q``)."""
    import torch

    tokens = torch.arange(batch * width, device=cu_seq_lens.device)
    return torch.searchsorted(cu_seq_lens[1:].to(torch.int64), tokens, right=True).view(batch, width)


def sdpa_mask_from_flash_form(attention_mask, position_ids, q_len: int, kv_len: int, device, cu_seq_lens=None,
                              batch: int = 1):
    """SDPA's boolean ``[batch, 1, q_len, kv_len]`` mask (True = attend) from
    what a flash-attn model passes its layers: causal (the last query sees the
    last key), the padding of a 2-D ``attention_mask``, and attention only
    within each packed row, known from ``cu_seq_lens`` (varlen offsets) or
    from ``position_ids`` restarting at 0."""
    import torch

    offset = kv_len - q_len  # queries are the last q_len of the kv_len positions
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, q, k]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -kv_len:].to(device=device, dtype=torch.bool)
    docs = None
    if cu_seq_lens is not None and q_len == kv_len and int(cu_seq_lens[-1]) == batch * q_len:
        docs = segment_ids(cu_seq_lens.to(device), batch, q_len)
    elif position_ids is not None and position_ids.shape[-1] == kv_len == q_len:
        docs = document_ids(position_ids.to(device))
    if docs is not None:
        mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])
    return mask


def hybrid_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention for a layer of a model whose masks are in
    the flash-attn form (see the module docstring); a 4-D mask passes as is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or attention_mask.dim() == 2:
        attention_mask = sdpa_mask_from_flash_form(attention_mask, kwargs.get("position_ids"), query.shape[-2],
                                                   key.shape[-2], query.device, kwargs.get("cu_seq_lens_q"),
                                                   query.shape[0])
    kwargs.pop("is_causal", None)  # the mask above says it
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)


def register_hybrid_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GLOBAL_BACKEND, hybrid_sdpa_forward)


def decoder_with_layer_types(model):
    """``(layers, layer_types)`` of the text decoder of ``model`` (a causal LM,
    a multimodal wrapper holding ``language_model``, or peft around either)."""
    seen = set()
    stack = [model]
    while stack:
        module = stack.pop(0)
        if id(module) in seen or module is None:
            continue
        seen.add(id(module))
        layer_types = getattr(getattr(module, "config", None), "layer_types", None)
        if hasattr(module, "layers") and layer_types is not None:
            return module.layers, layer_types
        stack += [getattr(module, name, None) for name in ("model", "language_model", "base_model")]
    return None, None


def apply_hybrid_attention(model) -> str:
    """Give every non-sliding attention layer of ``model`` the
    :data:`GLOBAL_BACKEND` function; returns the run-log line. A model without
    sliding and global layers (no ``layer_types``) is an error naming the key."""
    import copy

    from plait.errors import ConfigError

    layers, layer_types = decoder_with_layer_types(model)
    if layers is None or "sliding_attention" not in layer_types:
        raise ConfigError(f"config key 'gemma4_hybrid_attn_impl': {type(model).__name__} has no sliding-window and "
                          f"global attention layers (its config has no layer_types with sliding_attention) to give "
                          f"two backends; remove the key")
    register_hybrid_sdpa()
    sliding_backend = None
    switched = 0
    for layer, layer_type in zip(layers, layer_types):
        attention = layer.self_attn
        if layer_type == "sliding_attention":
            sliding_backend = attention.config._attn_implementation
            continue
        own = copy.copy(attention.config)  # a shallow copy: only this layer's backend changes
        own._attn_implementation = GLOBAL_BACKEND
        attention.config = own
        switched += 1
    return (f"gemma4_hybrid_attn_impl: {switched} global attention layers run SDPA (masks rebuilt from the "
            f"flash-attn form), {len(layers) - switched} sliding-window layers {sliding_backend}")
