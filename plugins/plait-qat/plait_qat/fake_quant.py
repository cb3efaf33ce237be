"""torchao's QAT on a loaded model: prepare (swap linear layers for
fake-quantized ones), switch fake quantization on late, convert back.

Prepare is ``torchao.quantization.quantize_`` with a ``QATConfig`` built from
the explicit fake-quantize configs of the chosen layout (as Axolotl does, so
``group_size`` reaches the quantizer). Fake-quantized layers are subclasses of
``nn.Linear`` holding the same weight parameter, so the state dict keeps its
keys: checkpoints and the saved model are plain full-precision weights.
"""

from __future__ import annotations

import torch

from plait.errors import ConfigError

#: names of peft's adapter submodules: the adapter trains in full precision, its base is fake-quantized
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _is_adapter(fqn: str) -> bool:
    return any(part in ADAPTER_PARTS for part in fqn.split("."))


def qat_config(qat, *, for_embedding: bool = False):
    """torchao's ``QATConfig`` (prepare step) for the ``qat:`` block."""
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.fake_quantize_config import (
        Float8FakeQuantizeConfig,
        Int4WeightFakeQuantizeConfig,
        IntxFakeQuantizeConfig,
    )

    weight, activation = qat.weight_dtype, None if for_embedding else qat.activation_dtype
    if weight == "mxfp4":
        from torchao.prototype.qat import MXFakeQuantizeConfig

        mx = MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=32)
        return QATConfig(weight_config=mx, activation_config=mx)
    if weight == "nvfp4":
        from torchao.prototype.qat import NVFP4FakeQuantizeConfig

        nv = NVFP4FakeQuantizeConfig()
        return QATConfig(weight_config=nv, activation_config=nv)
    activation_config = None
    if activation == "int8":
        activation_config = IntxFakeQuantizeConfig(dtype=torch.int8, granularity="per_token", is_symmetric=False)
    elif activation == "float8_e4m3fn":
        activation_config = Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)
    if weight == "int4":
        # the int4 scheme's scales depend on what the matmul's other side is: float8 inputs or high precision
        input_dtype = torch.float8_e4m3fn if activation == "float8_e4m3fn" else torch.bfloat16
        weight_config = Int4WeightFakeQuantizeConfig(group_size=qat.group_size, activation_dtype=input_dtype)
    else:  # float8_e4m3fn (validate_config admits no other pair)
        weight_config = Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)
    return QATConfig(weight_config=weight_config, activation_config=activation_config)


def linear_targets(model) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers QAT fake-quantizes: every ``nn.Linear`` but peft's adapter matrices."""
    return [(name, module) for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not _is_adapter(name)]


def check_group_size(qat, targets) -> None:
    """int4 groups (and micro-scaling blocks) must tile every layer's input."""
    size = qat.group_size if qat.weight_dtype == "int4" else {"nvfp4": 16, "mxfp4": 32}.get(qat.weight_dtype)
    if size is None:
        return
    bad = [(name, module.in_features) for name, module in targets if module.in_features % size]
    if bad:
        shown = ", ".join(f"{name} ({n})" for name, n in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise ConfigError(f"config key 'qat.group_size': {size} does not divide the input size of {len(bad)} "
                          f"linear layers: {shown}; accepted: a divisor of every layer's input size")


def prepare(model, qat) -> dict[str, str]:
    """Fake-quantize ``model``'s linear layers (and its embedding with
    ``quantize_embedding``) in place; ``{what: scheme}`` for the run log."""
    from torchao.quantization import quantize_

    from plait_qat.config import scheme_of

    targets = linear_targets(model)
    check_group_size(qat, targets)
    names = {name for name, _ in targets}
    quantize_(model, qat_config(qat), filter_fn=lambda module, fqn: fqn in names)
    changes = {f"{len(targets)} linear layers": f"torchao fake quantization, {scheme_of(qat)}"}
    if qat.quantize_embedding:
        embeddings = [name for name, module in model.named_modules()
                      if type(module) is torch.nn.Embedding and not _is_adapter(name)]
        quantize_(model, qat_config(qat, for_embedding=True),
                  filter_fn=lambda module, fqn: fqn in set(embeddings))
        changes[f"{len(embeddings)} embeddings"] = f"torchao fake quantization, int4 weights (group {qat.group_size})"
    return changes


def fake_quantizers(model) -> list:
    """The weight and activation fake quantizers of ``model`` that can be switched off."""
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    found = []
    for module in model.modules():
        if isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding)):
            for quantizer in (module.weight_fake_quantizer, getattr(module, "activation_fake_quantizer", None)):
                if quantizer is not None and hasattr(quantizer, "enabled"):
                    found.append(quantizer)
    return found


def start_after(model, steps: int, step_of):
    """Fake quantization off until ``step_of()`` (optimizer steps done) reaches
    ``steps``, then on: checked before every forward, so a resumed run is in
    the right state from its first step, on every rank alike. Returns the
    forward pre-hook's handle."""
    quantizers = fake_quantizers(model)

    def gate(module, args):
        enabled = step_of() >= steps
        for quantizer in quantizers:
            quantizer.enabled = enabled

    return model.register_forward_pre_hook(gate)


def convert(model, qat) -> None:
    """torchao's convert step without a target config: every fake-quantized
    layer becomes the plain ``nn.Linear`` / ``nn.Embedding`` it wraps (same
    weight), as Axolotl leaves the model after training."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
    if qat.quantize_embedding:
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Embedding))
