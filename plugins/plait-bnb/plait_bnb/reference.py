"""Float references for quantized models, for tests and error measurements."""

from __future__ import annotations


def dequantized_weight(module):
    """The float32 weight a bitsandbytes linear layer holds, or None for other modules.

    Call it before the layer's first forward in eval mode on the CPU: on
    AVX512-BF16 machines bitsandbytes then repacks 4-bit weights into a
    CPU-only layout that :func:`bitsandbytes.functional.dequantize_4bit` does
    not read.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if isinstance(module, bnb.nn.Linear4bit):
        return F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        # LLM.int8 quantizes row-wise: int8 values times the row's absmax / 127
        return module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
    return None


def dequantized_model(model_dir, quantized):
    """The float32 model from ``model_dir`` with every bitsandbytes linear weight
    of ``quantized`` (loaded from the same directory) copied in dequantized.

    Its outputs differ from the quantized model's only by the kernels' rounding,
    and from the original model's by the weight quantization error.
    """
    import torch
    from transformers import AutoConfig

    from plait.model.loading import causal_lm_class

    model_class = causal_lm_class(AutoConfig.from_pretrained(model_dir))  # the loader's class for this checkpoint
    reference = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        weight = dequantized_weight(module)
        if weight is not None:
            # peft wraps layers (q_proj.base_layer); the plain model names them q_proj
            target = modules[name.removeprefix("base_model.model.").replace(".base_layer", "")]
            with torch.no_grad():
                target.weight.copy_(weight)
    return reference


def model_device(model) -> "torch.device":
    """Where ``model`` runs: the loader places a quantized model on this
    process's GPU when there is one, the CPU otherwise."""
    return next(model.parameters()).device


def logits_on_cpu(model, ids: "torch.Tensor") -> "torch.Tensor":
    """``model``'s float32 logits for ``ids`` (moved to the model's device),
    brought back to the CPU so a quantized model on a GPU compares with a CPU
    reference."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids.to(model_device(model))).logits.float().cpu()
