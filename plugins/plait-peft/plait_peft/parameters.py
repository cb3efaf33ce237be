"""LoRA on parameters (peft ``target_parameters``): naming them, and keeping
peft's wrapper working over a parameter that is already parametrized.

A transformers 5 MoE keeps its experts as fused 3-D parameters
(``mlp.experts.gate_up_proj``), which ``target_modules`` cannot reach; peft's
``ParamWrapper`` adds ``B @ A`` to the parameter through a
``torch.nn.utils.parametrize`` parametrization for the duration of each
forward. plait-bnb's ``quantize_moe_experts`` stores the same parameters
packed behind a dequantizing parametrization, so LoRA then stacks on top.
"""

from __future__ import annotations

from plait.errors import ConfigError


def logical_parameters(model):
    """``(module_name, module, parameter_name)`` of every parameter of ``model``
    by the name its module reads it under: a parametrized parameter
    (plait-bnb's ``quantize_moe_experts`` packs expert weights behind a
    dequantizing parametrization) appears as ``experts.gate_up_proj``, not
    as ``experts.parametrizations.gate_up_proj.original``."""
    for module_name, module in model.named_modules():
        if ".parametrizations." in f".{module_name}.":
            continue
        names = [name for name, _ in module.named_parameters(recurse=False)]
        names += list(getattr(module, "parametrizations", {}) or {})
        for name in names:
            yield module_name, module, name


def parameter_targets(cfg, model, experts: list[str]) -> list[str]:
    """peft ``target_parameters``: ``lora_target_parameters`` and ``experts``
    (the suffixes ``lora_target_experts`` asks for), each a name or dotted suffix.

    peft matches a suffix only on a parameter that is not parametrized yet; a
    parametrized one (4-bit experts) it matches by its module's full name.
    So a suffix that falls on such a parameter is given to peft as every full
    name it matches, and a target matching nothing is an error, not peft's
    warning in a log."""
    from plait_peft.config import target_parameter_names

    wanted = target_parameter_names(cfg)
    wanted += [t for t in experts if t not in wanted]
    if not wanted:
        return []
    found: dict[str, list[tuple[str, bool]]] = {t: [] for t in wanted}
    for module_name, module, name in logical_parameters(model):
        key = f"{module_name.replace('.base_layer', '')}.{name}"
        for target in wanted:
            if key == target or key.endswith("." + target):
                found[target].append((key, name in (getattr(module, "parametrizations", None) or {})))
    missing = [t for t, hits in found.items() if not hits]
    if missing:
        raise ConfigError(f"config key 'lora_target_parameters': {missing} match no parameter of this "
                          f"{model.config.model_type} model; name a parameter or a dotted suffix of one, such as "
                          "mlp.experts.gate_up_proj")
    targets: list[str] = []
    for target, hits in found.items():
        if not any(parametrized for _, parametrized in hits):
            targets.append(target)
        targets += [key for key, parametrized in hits if parametrized and key not in targets]
    return targets


def keep_base_parametrizations(model):
    """Make peft's ``ParamWrapper`` remove its own LoRA proxy after each forward
    when the parameter carries another parametrization (4-bit experts).

    peft 0.21 registers one of two proxy types (``_LoraParameterProxy``, or
    ``_LoraFactorsProxy`` for a float32 parameter of several experts) but, when
    the parameter has another parametrization below it, takes off only the
    first type; the factored proxy then stays and the next forward fails. The
    wrappers of such parameters get a removal that takes off the last proxy of
    either type. Returns ``model``."""
    import types

    from peft.tuners.lora import layer as lora_layer

    proxies = tuple(getattr(lora_layer, name) for name in ("_LoraParameterProxy", "_LoraFactorsProxy")
                    if hasattr(lora_layer, name))

    def remove_own_proxy(wrapper):
        stack = wrapper.get_base_layer().parametrizations[wrapper.parameter_name]
        for index in reversed(range(len(stack))):
            if isinstance(stack[index], proxies):
                del stack[index]
                return
        raise RuntimeError(f"no LoRA parametrization on {wrapper.parameter_name}: peft's ParamWrapper changed")

    for module in model.modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        base = module.get_base_layer()
        if module.parameter_name in (getattr(base, "parametrizations", None) or {}):
            module._remove_parametrizations = types.MethodType(remove_own_proxy, module)
    return model
