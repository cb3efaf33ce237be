"""Swap a model's modules for kernel-backed ones, by family, through public means:
module replacement (norm, MLP), a subclass of the attention module whose forward
uses the fused rotary kernel, and ``nn.Module.compile`` per decoder layer.

Class names come from the family registry (``plait.families.find_family``)
when a plugin describes the model's family; otherwise from
:data:`FALLBACK_FAMILIES`, so llama/mistral/qwen2 work without plait-models.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from torch import nn

from plait_kernels.backends import get_backend
from plait_kernels.lora_linear import is_lora
from plait_kernels.lora_mlp import PlaitLoRAGLUMLP, is_lora_mlp
from plait_kernels.lora_mlp_fold import fold_gate_up
from plait_kernels.modules import (GATED_NORM_CLASSES, ROPE_ATTENTION_CLASSES, PlaitGatedRMSNorm, PlaitGLUMLP,
                                   PlaitRMSNorm, gated_norm_group_size, rope_attention_class)

log = logging.getLogger(__name__)

#: model_type -> (norm class, MLP class, activation, decoder layer class, attention class)
FALLBACK_FAMILIES = {
    "llama": ("LlamaRMSNorm", "LlamaMLP", "swiglu", "LlamaDecoderLayer", "LlamaAttention"),
    "mistral": ("MistralRMSNorm", "MistralMLP", "swiglu", "MistralDecoderLayer", "MistralAttention"),
    "qwen2": ("Qwen2RMSNorm", "Qwen2MLP", "swiglu", "Qwen2DecoderLayer", "Qwen2Attention"),
}

#: transformers ``hidden_act`` values -> our gated activation
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_tanh": "geglu"}


def runs_in_one_process() -> bool:
    """Whether this run is a single process (no data, tensor or sharded
    parallelism): the launcher's ``WORLD_SIZE`` or the initialized group's."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() == 1
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def on_in_one_process(cfg, key: str) -> bool:
    """A switch that is on by default in a single-process run: unset, on when
    :func:`runs_in_one_process`; ``true`` asks for it anywhere, ``false`` turns it off."""
    asked = getattr(cfg, key, None)
    return asked or (asked is None and runs_in_one_process())


@dataclass(frozen=True)
class Targets:
    """What to swap in one model: class names, the norm's offset, the MLP activation."""

    norm_class: str | None
    norm_offset: float | None  # None: decide per module (Gemma-named norms use 1.0)
    mlp_class: str | None
    activation: str | None  # "swiglu" | "geglu" | None (not a gated MLP we fuse)
    layer_class: str | None
    attention_class: str | None = None
    #: the family's ``mlp_output_feeds_residual`` (see plait.families.ModelFamily)
    mlp_output_feeds_residual: bool = False


def find_targets(cfg, model) -> Targets:
    """Ask the family registry; fall back to :data:`FALLBACK_FAMILIES`."""
    model_type = getattr(model.config, "model_type", None)
    hidden_act = ACTIVATIONS.get(getattr(model.config, "hidden_act", None))
    family = None
    pm = getattr(cfg, "plugin_manager", None)
    if pm is not None and model_type:
        from plait.families import find_family

        family = find_family(pm, model_type)
    if family is not None:
        return Targets(family.norm_class, getattr(family, "norm_offset", None), family.mlp_class,
                       family.mlp_activation or hidden_act, family.decoder_layer_class,
                       getattr(family, "attention_class", None), getattr(family, "mlp_output_feeds_residual", False))
    norm_class, mlp_class, _, layer_class, attention_class = FALLBACK_FAMILIES.get(model_type, (None,) * 5)
    # the config says which activation the MLP really uses; all three fallback
    # layouts add the MLP output straight to the residual
    return Targets(norm_class, None, mlp_class, hidden_act, layer_class, attention_class,
                   mlp_output_feeds_residual=mlp_class is not None)


def _set_child(root, dotted: str, new, replaced) -> None:
    # ``replaces_class`` tells readers of the module tree (plait-models' report
    # of missing optimisations) which family class this module stands in for
    new.replaces_class = type(replaced).__name__
    parent_name, _, attr = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _is_glu_mlp(module) -> bool:
    """The three-projection layout PlaitGLUMLP computes (MoE experts and fused
    gate_up projections have other layouts and are left alone)."""
    return all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))


def _norm_offset(module) -> float:
    # without a registry answer: Gemma-family norms scale by (1 + weight)
    return 1.0 if type(module).__name__.startswith("Gemma") else 0.0


def _norm_eps(module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(module, attr):
            return float(getattr(module, attr))
    return 1e-6


def kernel_label(backend: str, op: str) -> str:
    """How the report names a kernel: ``plait triton rms_norm``, ``liger swiglu``."""
    return f"plait {backend} {op}" if backend in ("triton", "torch") else f"{backend} {op}"


def patch(cfg, model, chosen: dict[str, str | None], experts: bool = False) -> dict[str, str]:
    """Apply the backends in ``chosen`` to ``model`` in place; return what changed.
    ``experts``: give peft's LoRA on fused MoE experts the routed path
    (:func:`plait_kernels.lora_experts.install_routed_lora_experts`), ending in
    the Triton combine when ``cfg.moe_combine_kernel`` is true, with the LoRA
    terms folded into the grouped matmuls when ``cfg.lora_experts_fold`` is,
    the routing weights in the gate unless ``cfg.moe_weight_in_gate`` is false."""
    targets = find_targets(cfg, model)
    norm_class, offset, mlp_class, activation = (targets.norm_class, targets.norm_offset, targets.mlp_class,
                                                 targets.activation)
    report: Counter = Counter()
    # on by default where one process holds the whole model: a sharding wrapper would copy the
    # weights out of the kept buffer and leave it holding an unsharded copy
    fold_mlp = on_in_one_process(cfg, "lora_mlp_fold")
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if chosen.get("rms_norm_gated") and kind in GATED_NORM_CLASSES:
            report[(kind, swap_gated_norm(model, name, module, chosen["rms_norm_gated"]))] += 1
        elif chosen["rms_norm"] and kind == norm_class and hasattr(module, "weight"):
            backend = chosen["rms_norm"]
            new = PlaitRMSNorm(module.weight, _norm_eps(module), _norm_offset(module) if offset is None else offset,
                               get_backend(backend)["rms_norm"], f"{backend} rms_norm")
            _set_child(model, name, new, module)
            report[(kind, kernel_label(backend, "rms_norm"))] += 1
        elif chosen["glu"] and kind == mlp_class and activation in ("swiglu", "geglu") and _is_glu_mlp(module):
            backend = chosen["glu"]
            glu = get_backend(backend)[activation]
            if backend == "triton" and is_lora_mlp(module) and getattr(cfg, "lora_mlp_kernel", None) is not False:
                # LoRA on all three projections: the fused LoRA MLP (falls back per call when it cannot apply)
                new = PlaitLoRAGLUMLP(module.gate_proj, module.up_proj, module.down_proj, glu,
                                      f"{backend} lora_{activation}_mlp", gelu=activation == "geglu",
                                      output_feeds_residual=targets.mlp_output_feeds_residual)
                if fold_mlp:
                    fold_gate_up(new)  # the stacked gate/up weight kept: no per-call copy of both bases
                op = f"lora_{activation}_mlp"
            else:
                new = PlaitGLUMLP(module.gate_proj, module.up_proj, module.down_proj, glu, f"{backend} {activation}")
                op = activation
            _set_child(model, name, new, module)
            report[(kind, kernel_label(backend, op))] += 1
        elif chosen["rope"] and kind == targets.attention_class and kind not in ROPE_ATTENTION_CLASSES:
            # the family names its attention, but Plait's rotary forward is only
            # checked against the classes in ROPE_ATTENTION_CLASSES
            report[(kind, "the model's own rotary (Plait's fused attention forward is not checked for this class)")] += 1
        elif chosen["rope"] and kind == targets.attention_class:
            backend = chosen["rope"]
            module.__class__ = rope_attention_class(type(module))
            module._plait_rope = get_backend(backend)["rope"]
            # the fused LoRA projections come with Plait's kernels; each call still
            # falls back to peft's modules when a projection cannot take them
            fused = backend == "triton"
            module._plait_lora_qkv = (fused and getattr(cfg, "lora_qkv_kernel", None) is not False
                                      and all(is_lora(getattr(module, n)) for n in ("q_proj", "k_proj", "v_proj")))
            module._plait_lora_o = fused and getattr(cfg, "lora_o_kernel", None) is not False and is_lora(module.o_proj)
            ops = ["rope"] + (["lora_qkv"] if module._plait_lora_qkv else []) + (["lora_o"] if module._plait_lora_o else [])
            report[(kind, kernel_label(backend, " + ".join(ops)))] += 1
    if getattr(cfg, "liger_rms_norm_gated", None) and not any(kind in GATED_NORM_CLASSES for kind, _ in report):
        # Axolotl's key is for the linear-attention layers of hybrid models; others have no gated norm
        report[("RMSNormGated", "none in this model: liger_rms_norm_gated changes nothing")] = 1
    if getattr(cfg, "liger_layer_norm", None):
        swapped = swap_layer_norms(model)
        report[("LayerNorm", "liger layer_norm" if swapped else "none in this model: liger_layer_norm changes "
                                                                  "nothing")] = swapped or 1
    if experts:
        from plait_kernels.lora_experts import install_routed_lora_experts, left_to_peft, not_folded

        # both on by default: together 1.28x the unfolded path on an H100 (bench/RESULTS.md, stop 23); the fold
        # only where one process holds the whole model, as its buffers would outlive a sharding wrapper's
        combine = getattr(cfg, "moe_combine_kernel", None) is not False
        fold = on_in_one_process(cfg, "lora_experts_fold")
        weight_in_gate = getattr(cfg, "moe_weight_in_gate", None) is not False
        # the experts' SiLU gate by Plait's Triton GLU, unless plait_kernels asks for PyTorch code only
        triton_glu = cfg.plait_kernels != "torch"
        label = "plait torch lora_experts (LoRA on the routed tokens, grouped matmuls)"
        if not weight_in_gate:
            label = label.replace("grouped matmuls)", "grouped matmuls, routing weights on the down projection)")
        if combine:
            label += " + plait triton moe_combine (on CUDA tensors)"
        if triton_glu:
            label += " + plait triton swiglu (on CUDA tensors)"
        unfolded = not_folded(model) if fold else []  # asked before folding: why a module would stay unfolded
        folded_label = label.replace("grouped matmuls", "LoRA folded into the grouped matmuls")
        # before compiling: the compiled layers trace the routed forward
        for kind in install_routed_lora_experts(model, combine_kernel=combine, fold=fold, triton_glu=triton_glu,
                                                weight_in_gate=weight_in_gate):
            report[(kind, folded_label if fold else label)] += 1
        for kind, why in unfolded:
            report[(kind, folded_label)] -= 1
            report[(kind, f"{label}, LoRA not folded: {why}")] += 1
        for kind, why in left_to_peft(model):
            report[(kind, f"peft's LoRA experts, not lora_experts_kernel: {why}")] += 1
    if cfg.torch_compile:
        compile_backend = cfg.torch_compile_backend or "inductor"
        mode = getattr(cfg, "torch_compile_mode", None)
        compiled = compile_layers(model, targets.layer_class, compile_backend, mode)
        if compiled:
            label = f"torch.compile ({compile_backend}{', ' + mode if mode else ''}), per layer"
            report[(targets.layer_class, label)] = compiled
    summary = {f"{kind} x{count}": kernel for (kind, kernel), count in report.items() if count}
    for what, kernel in summary.items():
        log.debug("plait-kernels: %s -> %s", what, kernel)  # the loop prints the returned report
    return summary


def swap_gated_norm(model, name: str, module, backend: str) -> str:
    """Replace one gated RMSNorm of :data:`GATED_NORM_CLASSES` by the fused one
    (the same weight); returns the kernel's label, or why the module stays."""
    if getattr(module, "activation", "silu") not in ("silu", "swish"):
        return f"the model's own (its gate is {module.activation}, the kernel's is silu)"
    norm_before_gate = GATED_NORM_CLASSES[type(module).__name__]
    group_size = gated_norm_group_size(module)
    new = PlaitGatedRMSNorm(module.weight, _norm_eps(module), group_size, norm_before_gate,
                            get_backend(backend)["rms_norm_gated"], f"{backend} rms_norm_gated")
    _set_child(model, name, new, module)
    return kernel_label(backend, "rms_norm_gated")


def swap_layer_norms(model) -> int:
    """Replace every ``torch.nn.LayerNorm`` with liger-kernel's, sharing its
    weight and bias; returns how many (Axolotl's ``liger_layer_norm``)."""
    norms = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.LayerNorm and module.elementwise_affine]
    if not norms:
        return 0
    from plait_kernels.selection import _cuda_available, interpreter_enabled

    if not _cuda_available() and not interpreter_enabled():
        from plait.errors import ConfigError

        raise ConfigError(f"config key 'liger_layer_norm': this model has {len(norms)} LayerNorm modules and "
                          "liger-kernel's LayerNorm needs a CUDA device; none is available, so remove the key here")
    from liger_kernel.transformers import LigerLayerNorm

    count = 0
    for name, module in norms:
        new = LigerLayerNorm(module.normalized_shape[-1], eps=module.eps, bias=module.bias is not None)
        new.weight = module.weight
        if module.bias is not None:
            new.bias = module.bias
        _set_child(model, name, new, module)
        count += 1
    return count


def compile_layers(model, layer_class: str | None, backend: str, mode: str | None = None) -> int:
    """Compile each decoder layer on its own (regional compilation).

    Every layer has the same code, so after the first one compiles the rest
    reuse its graph: cold start is one layer's compile, not the whole model's.
    ``nn.Module.compile`` compiles in place, so parameter names do not change.
    ``mode`` is torch.compile's (Axolotl's ``torch_compile_mode``).
    """
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if (layer_class and name == layer_class) or (not layer_class and name.endswith("DecoderLayer")):
            module.compile(backend=backend, **({"mode": mode} if mode else {}))
            count += 1
    return count
