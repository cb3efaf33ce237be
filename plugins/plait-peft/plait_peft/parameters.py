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


def _wrapper_chains(model):
    """``(parent, child_name, [wrappers outermost first], base)`` for every
    stack of peft ``ParamWrapper``s over a parametrized module."""
    chains = []
    for parent in model.modules():
        if type(parent).__name__ == "ParamWrapper":
            continue  # only the outermost wrapper of a stack
        for child_name, child in parent.named_children():
            chain = []
            while type(child).__name__ == "ParamWrapper":
                chain.append(child)
                child = child.base_layer
            if chain and getattr(child, "parametrizations", None):
                chains.append((parent, child_name, chain, child))
    return chains


def nest_in_definition_order(model):
    """Stack peft's ``ParamWrapper``s over a parametrized module in the order
    the module defines its parameters, first parameter innermost.

    peft nests one wrapper per adapted parameter of a module, and an
    adapter's state-dict keys follow the nesting (``experts.lora_A`` is the
    outer wrapper's, ``experts.base_layer.lora_A`` the inner one's). It
    stacks a plain module's parameters in definition order but a
    parametrized module's (4-bit experts) in sorted name order, so an adapter
    trained over 4-bit experts would not load onto the unquantized base
    (``plait merge-lora``, plain peft) nor the other way round. Re-stacking in
    definition order (the order plait-bnb quantized them in, kept by
    ``parametrizations``) gives both the same keys. Returns ``model``."""
    for parent, child_name, chain, base in _wrapper_chains(model):
        order = list(base.parametrizations)
        inner_first = sorted(chain, key=lambda w: order.index(w.parameter_name))
        below = base
        for wrapper in inner_first:
            wrapper._modules["base_layer"] = below
            below = wrapper
        setattr(parent, child_name, below)
    return model


def has_parametrized_targets(model, adapter_dir) -> bool:
    """Whether the saved adapter in ``adapter_dir`` adapts a parameter that is
    parametrized in ``model`` (4-bit experts), by its ``target_parameters``."""
    import json
    from pathlib import Path

    try:
        saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    targets = saved.get("target_parameters") or []
    for module_name, module, name in logical_parameters(model):
        key = f"{module_name}.{name}"
        if name in (getattr(module, "parametrizations", None) or {}) and any(
                key == t or key.endswith("." + t) for t in targets):
            return True
    return False


def load_saved_adapter(model, adapter_dir, autocast_adapter: bool):
    """The saved adapter on ``model``, trainable, with its wrappers over
    parametrized parameters stacked as when it was saved
    (:func:`nest_in_definition_order`): peft's ``from_pretrained`` would load
    the weights before the stack could be put right, so the adapter is built
    from its config, re-stacked, then its weights are loaded."""
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not has_parametrized_targets(model, adapter_dir):
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True,
                                               autocast_adapter_dtype=autocast_adapter)
        return keep_base_parametrizations(peft_model)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter)
    nest_in_definition_order(keep_base_parametrizations(peft_model))
    result = set_peft_model_state_dict(peft_model, load_peft_weights(adapter_dir))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the adapter in {adapter_dir} does not fit this model: missing {missing[:4]}, "
                           f"unexpected {list(result.unexpected_keys)[:4]}")
    return peft_model
