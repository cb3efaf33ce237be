"""Tensor parallelism with DTensor's ``parallelize_module``.

Each decoder layer's linears are split over the mesh's ``tp`` dimension with a
per-family plan: q/k/v and gate/up column-wise (each rank computes some heads
or some of the intermediate features, no communication), o and down row-wise
(each rank multiplies its slice, one all-reduce). Attention modules of
transformers reshape with ``-1`` heads, so a rank simply sees
``num_heads / tp`` heads without touching any attribute.

A peft LoRA layer is split along with its base: for a column-wise base the
LoRA ``B`` matrix is column-wise and ``A`` replicated; for a row-wise base
``A`` is row-wise and ``B`` replicated. Then ``base(x) + B(A(x))`` adds
tensors with the same layout on every rank.

Every other parameter (embeddings, norms, the head, LoRA matrices that are
not split) becomes a *replicated* DTensor on the same mesh, with hooks that
turn the module's plain inputs into replicated DTensors and its output back.
So every parameter of the model is a DTensor of one mesh, which is what
``torch.optim``'s foreach kernels and ``clip_grad_norm_`` need (they refuse a
mix of DTensor and plain tensors), and FSDP2 on top then shards all of them
over the same 2-D mesh.
"""

from __future__ import annotations

from plait.errors import ConfigError

#: llama-style plan used when no family plugin supplies one: module suffix -> style
DEFAULT_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def tp_plan(cfg, model) -> dict[str, str]:
    """The family's ``tp_plan`` when plait-models registers one, else :data:`DEFAULT_TP_PLAN`."""
    from plait_parallel.layers import family_of

    family = family_of(cfg, model)
    if family is not None and family.tp_plan:
        return dict(family.tp_plan)
    return dict(DEFAULT_TP_PLAN)


def check_divisible(model, tp: int) -> None:
    """Heads, K/V heads and the MLP width must split evenly over ``tp`` ranks."""
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None and value % tp:
            raise ConfigError(f"config key 'tensor_parallel_size': {tp} does not divide the model's {key} = {value}; "
                              f"accepted: a divisor of {value}")


def _style(kind: str):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}[kind]()


def _layer_plan(layer, plan: dict[str, str]) -> dict:
    """Concrete ``parallelize_module`` plan for one decoder layer, peft-aware."""
    import torch.nn as nn

    concrete = {}
    for suffix, kind in plan.items():
        if kind == "sequence":  # sequence-parallel norms: not applied (norms stay replicated)
            continue
        if kind not in ("colwise", "rowwise"):
            raise ConfigError(f"tensor-parallel plan entry {suffix!r}: {kind!r} is not accepted; "
                              f"accepted: colwise, rowwise, sequence")
        try:
            target = layer.get_submodule(suffix)
        except AttributeError:
            continue  # a family plan may list modules some layers lack (dense vs MoE layers)
        base = getattr(target, "base_layer", None)
        if base is None:
            if not isinstance(target, nn.Linear):
                raise ConfigError(f"tensor parallel: {suffix} is a {type(target).__name__}, not a Linear")
            concrete[suffix] = _style(kind)
            continue
        if getattr(target, "use_dora", {}) and any(target.use_dora.values()):
            raise ConfigError("tensor_parallel_size > 1 with DoRA (peft_use_dora) is not supported; use plain LoRA")
        concrete[f"{suffix}.base_layer"] = _style(kind)
        for name in target.lora_A.keys():
            if kind == "colwise":
                concrete[f"{suffix}.lora_B.{name}"] = _style("colwise")
            else:
                concrete[f"{suffix}.lora_A.{name}"] = _style("rowwise")
    return concrete


def apply_tensor_parallel(cfg, model, tp_mesh, layers) -> None:
    """Split every decoder layer in ``layers`` over ``tp_mesh`` (in place)."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_divisible(model, tp_mesh.size())
    plan = tp_plan(cfg, model)
    for layer in layers:
        parallelize_module(layer, tp_mesh, _layer_plan(layer, plan))
    replicate_other_parameters(model, tp_mesh)


def _replicated_inputs(module, inputs, mesh):
    import torch
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(
        DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
        for x in inputs
    )


def _local_outputs(module, outputs, mesh):
    from torch.distributed.tensor import DTensor

    if isinstance(outputs, DTensor):
        return outputs.to_local()
    if isinstance(outputs, tuple):
        return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
    return outputs


def replicate_other_parameters(model, tp_mesh) -> int:
    """Turn every remaining plain parameter into a replicated DTensor on
    ``tp_mesh`` (shared parameters, such as tied embeddings, stay shared);
    returns how many modules were converted."""
    import torch.nn as nn
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor

    converted: dict[int, nn.Parameter] = {}
    count = 0
    for module in list(model.modules()):
        plain = [(n, p) for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if not plain:
            continue
        for name, param in plain:
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(distribute_tensor(param.data, tp_mesh, [Replicate()]),
                                                    requires_grad=param.requires_grad)
            module.register_parameter(name, converted[id(param)])
        distribute_module(module, tp_mesh, input_fn=_replicated_inputs, output_fn=_local_outputs)
        count += 1
    return count
