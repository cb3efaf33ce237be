"""``plait_varlen``: PyTorch's own variable-length attention for packed batches.

``torch.nn.attention.varlen.varlen_attn`` (CUDA only, a FlashAttention kernel
shipped with torch) takes packed ``[tokens, heads, head_dim]`` tensors and the
cumulative segment offsets ``cu_seq_lens``; every segment attends only to
itself. Core's packing collate emits those offsets (``cu_seq_lens_q/k``,
``max_length_q/k``) for this backend exactly as for ``flash_attention_2``, and
transformers forwards them to the attention function as keyword arguments.

Layout decision: a micro-batch is ``[B, W]`` bins and the offsets cover the
*flattened* batch (``B * W`` tokens, the padding tail of each bin being its own
segment), so ``B > 1`` works: ``[B, H, W, D]`` becomes ``[B * W, H, D]``, one
kernel call, and the output is folded back to ``[B, W, H, D]``. The offsets must
end at ``B * W``; anything else is refused rather than guessed.

Causality: ``varlen_attn`` is *not* causal by default (``window_size=(-1, -1)``
is full attention); it is causal only when ``window_size == (-1, 0)`` -- compared
as a tuple, so the tuple is passed as is. A model's ``sliding_window`` becomes
``(sliding_window - 1, 0)``, the same left window transformers gives flash-attn.

Without ``cu_seq_lens_q`` the function refuses: transformers builds no mask for
this backend (:func:`register_varlen_attention` registers a mask function that
returns None), so padding could not be told apart from tokens.
"""

from __future__ import annotations

import weakref

ATTENTION_NAME = "plait_varlen"


def varlen_available() -> bool:
    """Whether torch ships ``torch.nn.attention.varlen`` and a CUDA GPU is present."""
    import torch

    return varlen_module_found() and torch.cuda.is_available()


def varlen_module_found() -> bool:
    """Whether this torch ships ``torch.nn.attention.varlen``."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False


def _torch_varlen_attn(query, key, value, *args, enable_gqa=False, **kwargs):
    # imported lazily: the module exists only in recent torch builds
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    if enable_gqa and "enable_gqa" not in inspect.signature(varlen_attn).parameters:
        # torch 2.11's kernel has no grouped-query option: repeat K/V heads to match q
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        enable_gqa = False
    if enable_gqa:
        kwargs["enable_gqa"] = True
    return varlen_attn(query, key, value, *args, **kwargs)


def plait_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                           cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                           sliding_window=None, softcap=None, s_aux=None, kernel=None, **kwargs):
    """transformers attention function for packed batches (``AttentionInterface`` signature).

    ``query`` is ``[B, Hq, W, D]``, ``key``/``value`` ``[B, Hkv, W, D]``
    (``Hq`` a multiple of ``Hkv``: grouped-query attention is passed to the
    kernel with ``enable_gqa``, no ``repeat_kv`` copy). Returns
    ``(attn_output [B, W, Hq, D], None)``. ``attention_mask`` is ignored: the
    segments come from ``cu_seq_lens_q/k``. ``kernel`` defaults to
    ``torch.nn.attention.varlen.varlen_attn``; tests pass a CPU reference with
    the same signature.
    """
    import torch

    if cu_seq_lens_q is None:
        raise RuntimeError(
            "attention 'plait_varlen' (varlen_attention: true) needs cu_seq_lens_q/cu_seq_lens_k from core's "
            "packing collate; this batch has none (was it built by another collate, or called without them?)"
        )
    if kwargs.get("is_causal") is False:
        raise RuntimeError("attention 'plait_varlen' is causal only; this module asked for bidirectional attention")
    if dropout:
        raise RuntimeError("attention 'plait_varlen' has no dropout; set the model's attention_dropout to 0")
    if softcap is not None or s_aux is not None:
        raise RuntimeError("attention 'plait_varlen' supports neither logit softcapping nor attention sinks; "
                           "use flash_attention or eager_attention for this model")
    cu_seq_lens_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    batch, heads_q, width, head_dim = query.shape
    heads_k = key.shape[1]
    tokens = batch * width
    if key.shape[2] != width:
        raise RuntimeError(f"attention 'plait_varlen' is for training without a KV cache: query has {width} "
                           f"positions, key {key.shape[2]}")
    _check_offsets(cu_seq_lens_q, cu_seq_lens_k, batch, width)
    if max_length_q is None:
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    if max_length_k is None:
        max_length_k = int((cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]).max())

    # [B, H, W, D] -> [B, W, H, D] -> [B * W, H, D]; the kernel needs a contiguous head_dim
    def packed(x):
        return x.transpose(1, 2).reshape(tokens, x.shape[1], head_dim).contiguous()

    window = (-1, 0) if sliding_window is None or sliding_window >= max_length_k else (int(sliding_window) - 1, 0)
    dtype = query.dtype
    if kernel is None:
        kernel = _torch_varlen_attn
        # the flash kernel has no fp32; fp32 activations come from autocast or fp32-upcast norms (PEFT)
        half = _half_dtype(query, module)
        query, key, value = query.to(half), key.to(half), value.to(half)
    out = kernel(packed(query), packed(key), packed(value), cu_seq_lens_q.to(torch.int32),
                 cu_seq_lens_k.to(torch.int32), int(max_length_q), int(max_length_k), scale=scaling,
                 window_size=window, enable_gqa=heads_q != heads_k)
    return out.reshape(batch, width, heads_q, head_dim).to(dtype), None


def _half_dtype(query, module):
    """The 16-bit dtype the kernel runs in: the query's, else autocast's, else the module's weights'."""
    import torch

    half = (torch.float16, torch.bfloat16)
    if query.dtype in half:
        return query.dtype
    if torch.is_autocast_enabled(query.device.type) and torch.get_autocast_dtype(query.device.type) in half:
        return torch.get_autocast_dtype(query.device.type)
    weight = next((p for p in (module.parameters() if module is not None else ()) if p.dtype in half), None)
    if weight is not None:
        return weight.dtype
    raise RuntimeError(f"attention 'plait_varlen' runs in bf16/fp16 only, got {query.dtype} activations and "
                       "weights; set bf16: true (or fp16: true), or use sdp_attention for fp32")


#: offsets tensors already checked, by id (weak: an entry goes when its tensor is freed)
_CHECKED = weakref.WeakValueDictionary()


def _check_offsets(cu_q, cu_k, batch: int, width: int) -> None:
    """Refuse offsets that do not end at ``batch * width``.

    Reading the last offset of a CUDA tensor waits for the GPU, so each
    offsets tensor is checked once (at the first layer), not in every layer.
    """
    for cu in (cu_q, cu_k):
        if _CHECKED.get(id(cu)) is cu:
            continue
        end = int(cu[-1])
        if end != batch * width:
            raise RuntimeError(f"cu_seq_lens end at {end} but the batch has {batch} x {width} = {batch * width} "
                               "tokens; the offsets must cover the flattened batch")
        _CHECKED[id(cu)] = cu


def _no_mask(*args, **kwargs):
    """Mask function for ``plait_varlen``: the segments come from cu_seq_lens, so no mask is built."""
    return None


def register_varlen_attention(name: str = ATTENTION_NAME, kernel=None) -> None:
    """Register ``plait_varlen`` with transformers (idempotent); call before ``from_pretrained``.

    ``name``/``kernel`` let tests register the same function under another
    name with :func:`reference_varlen` as its kernel, to run a whole model on the CPU.
    """
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    function = plait_varlen_attention if kernel is None else functools.partial(plait_varlen_attention, kernel=kernel)
    AttentionInterface.register(name, function)
    # a mask function that builds nothing, so transformers never materialises a [B, 1, W, W] mask
    AttentionMaskInterface.register(name, _no_mask)


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """A pure-PyTorch stand-in for ``varlen_attn`` (any device, any dtype): SDPA per segment.

    Supports what :func:`plait_varlen_attention` asks for: full (``(-1, -1)``)
    or causal (``(-1, 0)``) attention, no sliding window. Used by tests to
    check the reshaping and offsets on the CPU; slow (a Python loop over segments).
    """
    import torch
    import torch.nn.functional as F

    if tuple(window_size) not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"reference_varlen: window_size {window_size} is not supported")
    causal = tuple(window_size) == (-1, 0)
    out = torch.empty_like(query)
    bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        # [T, H, D] -> [1, H, T, D] for SDPA
        q, k, v = (x[a:b].transpose(0, 1)[None] for x, a, b in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        out[q0:q1] = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                    enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out
