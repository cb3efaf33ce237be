"""``quantize_moe_experts``: the fused expert weights of MoE blocks in 4 or 8 bits.

In transformers 5 the experts of an MoE block (Qwen3-MoE, Qwen3.5-MoE,
Mixtral, GLM4-MoE, ...) are not ``nn.Linear`` layers but one 3-D parameter per
projection (``experts.gate_up_proj`` ``[experts, 2 * inter, hidden]``,
``experts.down_proj``), so ``BitsAndBytesConfig`` leaves them in the compute
dtype while it quantizes every linear layer. They are most of an MoE's
weights: a QLoRA run over Qwen3-30B-A3B would keep ~28 B parameters in bf16.

Here each such parameter is replaced by its packed bitsandbytes form, and a
``torch.nn.utils.parametrize`` parametrization dequantizes it whenever the
module reads it (``self.gate_up_proj`` in the experts' forward). The module's
code, its experts kernel (``experts_implementation``) and peft's
``target_parameters`` (LoRA on the parameter, applied on top of the
dequantized value) all keep working unchanged. Dequantized values are cached
for the duration of one forward of the experts module, as bitsandbytes does
for its own parameter-level 4-bit, so a weight read twice is unpacked once.

Which parameters: floating parameters with three or more dimensions held by a
module whose qualified name contains ``expert`` (the same rule as Axolotl's),
never the router or a shared expert's ``nn.Linear`` (those are quantized by
``BitsAndBytesConfig`` already).

Unlike Axolotl (which quantizes while transformers copies weights to a CUDA
device), this runs right after loading, on any device bitsandbytes supports:
the stored weights are packed, the load itself still peaks at the unpacked
size of the largest expert tensor set.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("plait.bnb")


def expert_parameters(model) -> list[tuple[str, object, str]]:
    """``(module_name, module, parameter_name)`` of every fused expert weight
    of ``model`` that is still a plain floating tensor."""
    found = []
    for module_name, module in model.named_modules():
        if "expert" not in module_name.lower() or "parametrizations" in module_name:
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.ndim >= 3 and param.is_floating_point():
                found.append((module_name, module, name))
    return found


def _enable_cache(module, args):
    import torch.nn.utils.parametrize as P

    P._cache_enabled += 1


def _disable_cache(module, args, output):
    import torch.nn.utils.parametrize as P

    # always_call: a checkpointed recompute can stop mid-forward; the counter must not leak upwards
    P._cache_enabled = max(0, P._cache_enabled - 1)
    if not P._cache_enabled:
        P._cache = {}


def _cache_during_forward(module) -> None:
    """Unpack each quantized weight once per forward of ``module``, not once per read."""
    if getattr(module, "_plait_dequant_cache_hooks", False):
        return
    module.register_forward_pre_hook(_enable_cache)
    module.register_forward_hook(_disable_cache, always_call=True)
    module._plait_dequant_cache_hooks = True


class Int8RowwiseDequantize(torch.nn.Module):
    """A parametrization: int8 values times their row's absmax / 127
    (LLM.int8's row-wise scheme over the last dimension), returned in ``dtype``."""

    def __init__(self, row_stats, dtype):
        super().__init__()
        self.register_buffer("row_stats", row_stats)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, quantized):
        import bitsandbytes.functional as F

        shape = quantized.shape
        rows = F.int8_vectorwise_dequant(quantized.reshape(-1, shape[-1]), self.row_stats)
        return rows.reshape(shape).to(self.dtype)


def quantize_parameter_4bit(module, name: str, quant_type: str, double_quant: bool, storage) -> None:
    """Replace ``module.<name>`` by its 4-bit packed form (``storage`` dtype)
    and dequantize it on read through bitsandbytes' ``Bnb4bitParametrization``."""
    import torch.nn.utils.parametrize as P
    import bitsandbytes.functional as F
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    weight = getattr(module, name)
    packed, state = F.quantize_4bit(weight.data, compress_statistics=double_quant, quant_type=quant_type,
                                    quant_storage=storage)
    setattr(module, name, torch.nn.Parameter(packed, requires_grad=False))
    P.register_parametrization(module, name, Bnb4bitParametrization(state), unsafe=True)


def quantize_parameter_8bit(module, name: str) -> None:
    """Replace ``module.<name>`` by int8 values with one absmax per row of its last dimension."""
    import torch.nn.utils.parametrize as P
    import bitsandbytes.functional as F

    weight = getattr(module, name)
    dtype = weight.dtype
    rows = weight.data.reshape(-1, weight.shape[-1]).to(torch.float16)
    values, row_stats, _ = F.int8_vectorwise_quant(rows)
    setattr(module, name, torch.nn.Parameter(values.reshape(weight.shape), requires_grad=False))
    P.register_parametrization(module, name, Int8RowwiseDequantize(row_stats, dtype), unsafe=True)


def quantize_experts(model, quantization_config) -> list[str]:
    """Quantize every fused expert weight of ``model`` as ``quantization_config``
    (the run's ``transformers.BitsAndBytesConfig``) quantizes its linear
    layers: 4-bit with its quant type, double quantization and storage dtype,
    or 8-bit row-wise. Returns the qualified names it quantized."""
    done = []
    for module_name, module, name in expert_parameters(model):
        if quantization_config.load_in_4bit:
            storage = quantization_config.bnb_4bit_quant_storage
            storage = getattr(torch, storage) if isinstance(storage, str) else storage
            quantize_parameter_4bit(module, name, quantization_config.bnb_4bit_quant_type,
                                    quantization_config.bnb_4bit_use_double_quant, storage)
        else:
            quantize_parameter_8bit(module, name)
        _cache_during_forward(module)
        done.append(f"{module_name}.{name}")
    bits = 4 if quantization_config.load_in_4bit else 8
    if done:
        log.info("quantize_moe_experts: %d fused expert weights stored in %d bits", len(done), bits)
    else:
        log.warning("quantize_moe_experts: this model has no fused 3-D expert weights; nothing was quantized")
    return done


def is_quantized_parameter(module, name: str) -> bool:
    """Whether ``module.<name>`` is read through one of the dequantizing parametrizations above."""
    import torch.nn.utils.parametrize as P

    if not P.is_parametrized(module, name):
        return False
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    return any(isinstance(p, (Bnb4bitParametrization, Int8RowwiseDequantize)) for p in module.parametrizations[name])
