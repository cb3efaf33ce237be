"""The ``qat:`` block, named and meant as in Axolotl, and the rules on it.

Axolotl's ``qat:`` fake-quantizes the model's linear layers while it trains
(torchao's QAT "prepare" step): every forward rounds the weights, and for
some layouts the activations, onto the grid of the target low-precision
format, so the trained weights learn to survive the real quantization done
afterwards. The weights themselves stay in full precision.

Which weight / activation pairs exist follows Axolotl's table
(``axolotl.utils.quantization``); a pair torchao's QAT has no fake quantizer
for is refused here, before any model work. Whether this machine can run a
layout (torchao installed, NVFP4's Blackwell matmuls) is a machine fact
(:class:`plait.errors.MachineFactError`): ``plait config validate`` notes it,
``plait train`` refuses.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator

from plait.config import StrictModel
from plait.errors import ConfigError, MachineFactError

#: the dtype names a config may use -> the layout they mean (Axolotl's aliases for float8)
DTYPE_ALIASES = {"int4": "int4", "int8": "int8", "float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn",
                 "float8": "float8_e4m3fn", "nvfp4": "nvfp4", "mxfp4": "mxfp4"}

#: the one block size each micro-scaling layout has (group_size must be it, or unset)
BLOCK_SIZES = {"nvfp4": 16, "mxfp4": 32}

#: (activation_dtype, weight_dtype) -> what the fake quantization does, for the log and the docs
SUPPORTED_PAIRS = {
    (None, "int4"): "int4 weights (per group), activations unquantized",
    ("int8", "int4"): "int8 activations (per token, asymmetric) and int4 weights (per group)",
    ("float8_e4m3fn", "int4"): "float8 activations and int4 weights (per group)",
    ("float8_e4m3fn", "float8_e4m3fn"): "float8 activations and weights (per row)",
    ("nvfp4", "nvfp4"): "NVFP4 activations and weights (blocks of 16)",
    (None, "mxfp4"): "MXFP4 activations and weights (blocks of 32)",
    ("mxfp4", "mxfp4"): "MXFP4 activations and weights (blocks of 32)",
}

#: pairs Axolotl names but torchao's QAT cannot fake-quantize -> why
REFUSED_PAIRS = {
    (None, "int8"): "torchao's QAT has no int8 weight-only scheme",
    ("int8", "int8"): "torchao's QAT has no int8-activation / int8-weight scheme",
    ("int4", "int4"): "torchao's QAT has no int4-activation / int4-weight scheme",
}

#: the torchao release whose QATConfig(weight_config=..., activation_config=...) API this plugin uses
TORCHAO_MIN = "0.15"


def _dtype(value: Any) -> Optional[str]:
    if value is None:
        return None
    name = DTYPE_ALIASES.get(str(value))
    if name is None:
        raise ValueError(f"{value!r} is not a quantization dtype; accepted: {', '.join(DTYPE_ALIASES)}")
    return name


class QatBlock(StrictModel):
    """Axolotl's ``qat:`` block: fake quantization while training (torchao QAT)."""

    weight_dtype: str = Field(
        "int8", description="Layout the linear weights are fake-quantized to: int4, int8, float8_e4m3fn (fp8, "
        "float8), nvfp4 or mxfp4. Default int8 (Axolotl's), which needs an activation_dtype to form a scheme.")
    activation_dtype: Optional[str] = Field(
        None, description="Layout the linear layers' inputs are fake-quantized to (same names as weight_dtype); "
        "unset: activations stay in the compute dtype (mxfp4 weights fake-quantize activations too).")
    group_size: Optional[int] = Field(
        32, ge=1, description="Weights per quantization group along the input dimension (int4); nvfp4 needs 16, "
        "mxfp4 32. It must divide every fake-quantized layer's input size.")
    quantize_embedding: Optional[bool] = Field(
        False, description="Also fake-quantize the input embedding's weights (int4 weight layouts only; "
        "embeddings have no activation quantization).")
    fake_quant_after_n_steps: Optional[int] = Field(
        None, ge=0, description="Train the first N optimizer steps without fake quantization, then switch it on "
        "(unset: from the first step). Works for int4 and float8 layouts.")

    _dtypes = field_validator("weight_dtype", "activation_dtype", mode="before")(classmethod(
        lambda cls, value: _dtype(value)))


class QuantizationBlock(StrictModel):
    """Axolotl's ``quantization:`` block: post-training quantization by ``plait quantize``."""

    weight_dtype: str = Field(
        "int8", description="Layout the linear weights are quantized to (names as in qat.weight_dtype); default "
        "int8, which needs an activation_dtype to form a scheme.")
    activation_dtype: Optional[str] = Field(
        None, description="Layout the linear layers' inputs are quantized to at run time; unset: weight-only.")
    group_size: Optional[int] = Field(
        32, ge=1, description="Weights per quantization group (int4); must divide every layer's input size.")
    quantize_embedding: Optional[bool] = Field(
        None, description="Also quantize the input embedding (int4 weight-only, as Axolotl).")

    _dtypes = field_validator("weight_dtype", "activation_dtype", mode="before")(classmethod(
        lambda cls, value: _dtype(value)))


class QatKeys(StrictModel):
    """Keys plait-qat owns."""

    qat: Optional[QatBlock] = Field(
        None, description="Quantization-aware training (Axolotl's qat: block): the linear layers are "
        "fake-quantized by torchao while training; the saved model holds full-precision weights, ready for "
        "post-training quantization with the same layout (plait quantize).")
    quantization: Optional[QuantizationBlock] = Field(
        None, description="Post-training quantization (Axolotl's quantization: block), done by `plait quantize "
        "CONFIG` on the trained model in output_dir, not by training; without it `plait quantize` uses qat:.")


#: (activation_dtype, weight_dtype) -> post-training scheme in words, and what it needs beyond torchao on this machine
PTQ_PAIRS = {
    (None, "int4"): ("int4 weight-only (per group)", "mslk"),
    ("int8", "int4"): ("int8 dynamic activations, int4 weights (per group)", None),
    ("float8_e4m3fn", "float8_e4m3fn"): ("float8 dynamic activations and weights", "cuda89"),
    ("float8_e4m3fn", "int4"): ("float8 dynamic activations, int4 weights", "cuda89"),
    ("nvfp4", "nvfp4"): ("NVFP4 weights", "blackwell"),
    (None, "nvfp4"): ("NVFP4 weights", "blackwell"),
}


def validate_ptq(block, key: str) -> None:
    """The post-training pair ``block`` asks for exists and this machine can run it."""
    import importlib.util

    pair = (block.activation_dtype, block.weight_dtype)
    if pair not in PTQ_PAIRS:
        why = ("torchao's MXFP4 weights cannot be stored as safetensors" if "mxfp4" in pair
               else REFUSED_PAIRS.get(pair, "not a post-training scheme of torchao").replace("QAT", "quantization"))
        accepted = "; ".join(f"{a or 'unset'} / {w}" for a, w in PTQ_PAIRS)
        raise ConfigError(f"config key {key!r}: activation_dtype {pair[0] or 'unset'} with weight_dtype {pair[1]} "
                          f"is not accepted for post-training quantization ({why}); accepted: {accepted}")
    if block.weight_dtype == "nvfp4" and block.group_size not in (None, 16):
        raise ConfigError(f"config key '{key}.group_size': {block.group_size} is not accepted with weight_dtype nvfp4, "
                          "whose scales cover blocks of 16; accepted: 16")
    check_machine(block, key)
    needs = PTQ_PAIRS[pair][1]
    if needs == "mslk" or block.quantize_embedding:
        if importlib.util.find_spec("mslk") is None:
            raise MachineFactError(f"config key {key!r}: torchao's int4 weight-only tensors need the mslk package, "
                                   "which is not installed; pip install mslk, or use activation_dtype int8 with "
                                   "weight_dtype int4 (runs on the CPU)")
    elif needs == "cuda89":
        import torch

        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if capability is None or capability < (8, 9):
            raise MachineFactError(f"config key {key!r}: torchao's float8 dynamic quantization needs a CUDA GPU of "
                                   f"compute capability 8.9 or newer (Ada, Hopper); this machine has "
                                   f"{'compute capability %d.%d' % capability if capability else 'no CUDA GPU'}")


def scheme_of(qat: QatBlock) -> str:
    """What ``qat`` fake-quantizes, in words (the pair must be supported)."""
    return SUPPORTED_PAIRS[(qat.activation_dtype, qat.weight_dtype)]


def validate(cfg) -> None:
    """Rules inside the ``qat:`` block and with the rest of the config; raises
    ConfigError (a bad pair, a bad group size) or MachineFactError (this
    machine cannot run it)."""
    if getattr(cfg, "quantization", None) is not None:
        validate_ptq(cfg.quantization, "quantization")
    qat = getattr(cfg, "qat", None)
    if qat is None:
        return
    pair = (qat.activation_dtype, qat.weight_dtype)
    if pair in REFUSED_PAIRS or pair not in SUPPORTED_PAIRS:
        why = REFUSED_PAIRS.get(pair, "not a scheme torchao's QAT fake-quantizes")
        accepted = "; ".join(f"{a or 'unset'} / {w}" for a, w in SUPPORTED_PAIRS)
        raise ConfigError(f"config key 'qat': activation_dtype {pair[0] or 'unset'} with weight_dtype {pair[1]} is "
                          f"not accepted ({why}); accepted activation / weight pairs: {accepted}")
    block = BLOCK_SIZES.get(qat.weight_dtype)
    if block is not None and qat.group_size not in (None, block):
        raise ConfigError(f"config key 'qat.group_size': {qat.group_size} is not accepted with weight_dtype "
                          f"{qat.weight_dtype}, whose scales cover blocks of {block}; accepted: {block}")
    if qat.weight_dtype == "int4" and qat.group_size is None:
        raise ConfigError("config key 'qat.group_size': int4 weights are quantized per group; set a group size "
                          "(32, 64, 128, 256 are usual) that divides the layers' input sizes")
    if qat.quantize_embedding and qat.weight_dtype != "int4":
        raise ConfigError(f"config key 'qat.quantize_embedding': true is not accepted with weight_dtype "
                          f"{qat.weight_dtype}; torchao fake-quantizes embeddings to int4 only (accepted: "
                          "weight_dtype int4, or quantize_embedding false)")
    if qat.fake_quant_after_n_steps is not None and qat.weight_dtype in BLOCK_SIZES:
        raise ConfigError(f"config key 'qat.fake_quant_after_n_steps': torchao's {qat.weight_dtype} layers have no "
                          "switch to start fake quantization late; accepted: unset (fake quantization from the "
                          "first step), or an int4 / float8 weight_dtype")
    check_machine(qat)


def check_machine(qat, key: str = "qat") -> None:
    """torchao installed and recent enough; NVFP4 only where its fp4 matmuls run.

    Looked up without importing torchao (its import loads native kernels)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise MachineFactError(f"config key {key!r} needs torchao, which is not installed; "
                               "pip install torchao (or pip install 'plait-qat[torchao]')")
    version = importlib.metadata.version("torchao")
    if _release(version) < _release(TORCHAO_MIN):
        raise MachineFactError(f"config key {key!r} needs torchao >= {TORCHAO_MIN} (its QATConfig API); "
                               f"torchao {version} is installed; pip install -U torchao")
    if qat.weight_dtype == "nvfp4":
        import torch

        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if capability is None or capability < (10, 0):
            where = f"a GPU of compute capability {capability[0]}.{capability[1]}" if capability else "no CUDA GPU"
            raise MachineFactError(f"config key '{key}.weight_dtype': nvfp4 runs torchao's fp4 "
                                   f"matmuls, which need an NVIDIA Blackwell GPU (compute capability 10.0 or "
                                   f"newer); this machine has {where}")


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
