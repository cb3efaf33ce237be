"""Load a causal LM with bitsandbytes-quantized linear layers, ready for adapters.

k-bit preparation, and why it is not peft's ``prepare_model_for_kbit_training``
------------------------------------------------------------------------------
peft's helper casts every non-quantized floating parameter (embeddings, an
untied head, norms) from fp16/bf16 to float32. Those weights are frozen under
QLoRA, so float32 buys no optimizer precision; it only costs memory, and most
of it sits in the embedding and head, whose size grows with the vocabulary.
Measured on the CPU (``tests/test_bnb_memory.py``, bf16, 4-bit nf4 with double
quant; Llama with vocab 32000, hidden 256, 2 layers, intermediate 512; bytes of
parameters and buffers):

=========================  =========  ============  ============
model                      plait-bnb  peft helper   peft / plait
=========================  =========  ============  ============
untied head                33.4 MB    66.1 MB       1.98x
tied head                  17.0 MB    33.4 MB       1.97x
=========================  =========  ============  ============

(The 4-bit linear layers are 0.6 MB of that; the rest is the 8.2 M-parameter
embedding and head.)
At Llama-3-8B's shapes the same cast adds 2 x 128256 x 4096 x 2 bytes = 2.1 GB.
So :func:`prepare_for_kbit_training` keeps every non-quantized weight in the
compute dtype (RMSNorm already computes its statistics in float32 internally),
freezes the base, and only turns on what gradients to the adapters need:
input gradients (core's model pipeline then switches gradient checkpointing on).
"""

from __future__ import annotations

import os

def compute_dtype_name(cfg) -> str:
    """``bnb_4bit_compute_dtype``, defaulting to the run's compute dtype."""
    from plait.model.loading import compute_dtype

    if cfg.bnb_4bit_compute_dtype:
        return cfg.bnb_4bit_compute_dtype
    return str(compute_dtype(cfg)).removeprefix("torch.")


def quantization_config(cfg):
    """The ``transformers.BitsAndBytesConfig`` the keys describe."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = dict(load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)
    if cfg.load_in_4bit:
        kwargs.update(
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype_name(cfg)),
        )
        if cfg.bnb_4bit_quant_storage:
            kwargs["bnb_4bit_quant_storage"] = getattr(torch, cfg.bnb_4bit_quant_storage)
    kwargs.update(cfg.bnb_config_kwargs)
    return BitsAndBytesConfig(**kwargs)


def device_map():
    """bitsandbytes quantizes while weights move to their device: put the whole
    model on this process's GPU (``LOCAL_RANK`` under torchrun), or keep it on
    the CPU where bitsandbytes has CPU kernels."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def prepare_for_kbit_training(model, gradient_checkpointing=False):
    """Freeze the quantized base for adapter training without upcasting it.

    ``gradient_checkpointing`` is the config's value (``True``, ``"offload"``...):
    when set, the frozen embeddings' output requires grad, as checkpointed
    blocks need. Checkpointing itself is switched on by core's model pipeline
    (``plait.pipeline.setup_model``), right after this loader returns.
    See the module docstring for the measurement behind keeping embeddings,
    head and norms in the compute dtype.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when the embeddings are frozen
        model.enable_input_require_grads()
    # so an adapter plugin skips peft's upcasting helper
    from plait.model.loading import mark_kbit_prepared

    mark_kbit_prepared(model)
    return model


def load_quantized_model(cfg, tokenizer):
    """``from_pretrained`` of core's causal-LM class for ``base_model``
    (``AutoModelForCausalLM``, or the class a text-only checkpoint of a
    composite model names, :func:`plait.model.loading.causal_lm_class_of`)
    with the quantization config, resized embeddings and the k-bit
    preparation above."""
    from plait.model.choice import load_with_supported_attention
    from plait.model.loading import causal_decoder_kwargs, causal_lm_class_of, fit_to_tokenizer, pretrained_kwargs

    kwargs = pretrained_kwargs(cfg)
    kwargs.pop("attn_implementation")
    kwargs.update(causal_decoder_kwargs(cfg, kwargs))
    # an attention backend the architecture lacks falls back to one it has, as in core's loader
    quantization = quantization_config(cfg)
    # the config's device_map / max_memory (a single-process split) win over this process's device
    placement = kwargs.pop("device_map", None) or device_map()
    # the class core's loader picks: AutoModelForCausalLM refuses Emu3's and Mllama's text-only checkpoints
    model_class = causal_lm_class_of(cfg)
    model = load_with_supported_attention(cfg, lambda **attn: model_class.from_pretrained(
        cfg.base_model, quantization_config=quantization, device_map=placement, **kwargs, **attn))
    if cfg.quantize_moe_experts:
        from plait_bnb.experts import quantize_experts

        # BitsAndBytesConfig reaches nn.Linear layers only; fused 3-D expert weights are parameters
        quantize_experts(model, quantization)
    # embeddings are not quantized, so resizing works as on a plain model
    fit_to_tokenizer(cfg, model, tokenizer)
    return prepare_for_kbit_training(model, cfg.gradient_checkpointing)
