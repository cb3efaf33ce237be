"""The attention backend a model actually runs with.

The config asks for a backend (``sdpa`` by default; ``flash_attention``,
``flex_attention``, ``varlen_attention``, ``eager_attention`` choose another),
but not every architecture implements every backend: transformers refuses, in
the model's ``__init__`` and before any weight is read, e.g. SDPA for BLOOM or
CPM-Ant. :func:`load_with_supported_attention` then loads with the next backend
the model accepts (down to ``eager``, which every model has), logs why, and
records the choice in the config (:func:`use_attention_backend`), so packing
builds the inputs that backend needs and ``plait config explain`` shows it.
"""

from __future__ import annotations

import logging

from plait.model.names import ATTENTION_FLAGS  # the config flag that selects each backend

log = logging.getLogger("plait.model")



def attention_fallbacks(wanted: str) -> list[str]:
    """Backends to try, in order: the one asked for, then SDPA, then eager.

    Varlen backends fall back to mask-based ones, which isolate packed rows too
    (:func:`plait.data.packing.packed_attention_inputs`)."""
    order = [wanted, "sdpa", "eager"]
    return list(dict.fromkeys(order))


def is_attention_refusal(exc: BaseException) -> bool:
    """Whether ``from_pretrained`` failed because the model does not implement
    the requested attention backend (transformers' message names it)."""
    text = str(exc)
    return isinstance(exc, (ValueError, ImportError, NotImplementedError)) and (
        "attn_implementation" in text or "scaled_dot_product_attention" in text
        or "does not support" in text and "ttention" in text)


#: the varlen kernel's largest head (the FlashAttention kernel torch ships)
VARLEN_MAX_HEAD_DIM = 256
#: model types whose attention adds per-head sink logits, which the varlen kernel has no input for
ATTENTION_SINK_MODEL_TYPES = ("gpt_oss",)


def varlen_refusal(cfg, model_config, cuda: bool) -> str | None:
    """Why torch's varlen kernel cannot run this model's packed attention in
    this run, or ``None`` when it can (what ``plait_varlen`` supports)."""
    import torch

    from plait.model.forward import text_config
    from plait.model.loading import compute_dtype
    from plait.model.varlen import varlen_module_found

    if not cuda:
        return "there is no CUDA GPU (the kernel is CUDA only)"
    if not varlen_module_found():
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if compute_dtype(cfg) not in (torch.bfloat16, torch.float16) and not (cfg.bf16 or cfg.fp16):
        return "the run computes in float32 and the kernel runs in bf16/fp16 only"
    if model_config is None:
        return "base_model's config could not be read"
    text = text_config(model_config)
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim and head_dim > VARLEN_MAX_HEAD_DIM:
        return f"its head_dim {head_dim} is above the kernel's {VARLEN_MAX_HEAD_DIM}"
    if getattr(text, "attention_dropout", 0.0):
        return f"its attention_dropout is {text.attention_dropout} and the kernel has no dropout"
    if getattr(text, "attn_logit_softcapping", None):
        return "it soft-caps its attention logits (attn_logit_softcapping)"
    if getattr(text, "model_type", None) in ATTENTION_SINK_MODEL_TYPES:
        return "its attention has sink logits"
    return None


def route_packed_sdpa_to_varlen(cfg) -> None:
    """``sdpa_varlen: true``: packed SDPA runs through torch's varlen kernel
    (``plait_varlen``) where :func:`varlen_refusal` finds nothing against it;
    elsewhere SDPA keeps the block mask, which isolates packed rows as well, and
    the log says why. Called by the loaders before ``from_pretrained``."""
    if not (cfg.sdpa_varlen and cfg.sample_packing and cfg.attn_implementation == "sdpa"):
        return
    import torch

    from plait.model.loading import base_model_config

    why = varlen_refusal(cfg, base_model_config(cfg), torch.cuda.is_available())
    if why:
        log.info("sdpa_varlen: packed rows keep SDPA with the block mask: %s", why)
        return
    log.info("sdpa_varlen: packed rows run through torch's varlen kernel (attn_implementation plait_varlen)")
    use_attention_backend(cfg, "plait_varlen")


def use_attention_backend(cfg, backend: str, plugin: str = "core") -> None:
    """Set the config's attention flags so ``cfg.attn_implementation`` is ``backend``."""
    # keys that name a backend without a flag: they would contradict the new flag on re-validation
    if getattr(cfg, "flash_optimum", None):
        cfg.set_by_plugin("flash_optimum", None, plugin)
    if cfg.attn_implementation not in ATTENTION_FLAGS:  # a hub kernel
        cfg.set_by_plugin("attn_implementation", backend, plugin)
    # flags off first: the config allows one attention flag at a time, checked on every assignment
    for name, flag in sorted(ATTENTION_FLAGS.items(), key=lambda item: item[0] == backend):
        if flag in type(cfg).model_fields and getattr(cfg, flag, None) != (name == backend):
            cfg.set_by_plugin(flag, name == backend, plugin)


def load_with_supported_attention(cfg, load):
    """``load(attn_implementation=...)`` with the first backend of
    :func:`attention_fallbacks` the model accepts; the config follows the
    choice. A refusal of every backend is re-raised (it names the model)."""
    wanted = cfg.attn_implementation
    refusals = []
    from plait.model.loading import loading_contexts

    for backend in attention_fallbacks(wanted):
        try:
            with loading_contexts(cfg):  # plugins' changes to how the model is built (hookspecs.loading_context)
                model = load(attn_implementation=backend)
        except Exception as exc:  # noqa: BLE001 - only attention refusals are retried
            if not is_attention_refusal(exc):
                raise
            refusals.append((backend, exc))
            continue
        if backend != wanted:
            why = " ".join(str(refusals[-1][1]).split())[:200]
            log.warning("attention: %s does not support %r (%s); using %r", type(model).__name__, wanted, why,
                        backend)
            use_attention_backend(cfg, backend)
        return model
    raise refusals[-1][1]
