"""What every model loader shares: the compute dtype, the ``from_pretrained``
arguments, fitting the embeddings to the tokenizer. Core's ``load_model`` and
quantizing loaders (plait-bnb) both build on these."""

from __future__ import annotations


def compute_dtype(cfg):
    """The dtype weights are loaded in, from ``torch_dtype``/``bf16``/``fp16``."""
    import torch

    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        return getattr(torch, cfg.torch_dtype)
    if cfg.fp16:
        return torch.float16
    if cfg.bf16 is True or cfg.bf16 == "full":
        return torch.bfloat16
    if cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pretrained_kwargs(cfg) -> dict:
    """Arguments to ``from_pretrained`` every loader shares (dtype, attention,
    remote code); turns TF32 on when asked. Quantizing loaders add theirs."""
    import torch

    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.varlen_attention:
        # "plait_varlen" must be registered before from_pretrained checks the name;
        # here, so every loader that uses these kwargs (core's, plait-bnb's) gets it
        from plait.model.varlen import register_varlen_attention

        register_varlen_attention()
    return dict(dtype=compute_dtype(cfg), attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code)


def fit_to_tokenizer(cfg, model, tokenizer):
    """Grow the embeddings to the tokenizer's added tokens and turn the KV cache off."""
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        multiple = 32 if cfg.resize_token_embeddings_to_32x else None
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple)
    # a KV cache changes how transformers builds attention masks; never train with one
    model.config.use_cache = False
    return model


#: where :func:`mark_kbit_prepared` records its mark (read it only through :func:`is_kbit_prepared`)
_KBIT_PREPARED = "_plait_kbit_prepared"


def mark_kbit_prepared(model) -> None:
    """Record that a loader prepared this k-bit model for training itself
    (frozen base, input grads, checkpointing), so an adapter plugin skips
    peft's ``prepare_model_for_kbit_training`` and its float32 upcast. The one
    message between a quantizing loader (plait-bnb) and an adapter plugin
    (plait-peft), owned here so neither imports the other."""
    setattr(model, _KBIT_PREPARED, True)


def is_kbit_prepared(model) -> bool:
    """Whether :func:`mark_kbit_prepared` was called on ``model``."""
    return bool(getattr(model, _KBIT_PREPARED, False))
