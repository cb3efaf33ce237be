"""Find the decoder layers of a (possibly peft-wrapped) causal LM.

FSDP2 shards one decoder layer at a time and tensor parallelism rewrites the
linears inside each; both need the layer class. It comes, in this order, from
``fsdp_config.fsdp_transformer_layer_cls_to_wrap``, from the model family
registered through the ``model_families`` hook (plait-models), or from the
class repeated in the model's largest ``nn.ModuleList`` (``model.model.layers``
in every transformers decoder).
"""

from __future__ import annotations

from plait.errors import ConfigError


def model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_of(cfg, model):
    """The :class:`plait.families.ModelFamily` for ``model``, or ``None``."""
    pm = getattr(cfg, "plugin_manager", None)
    mtype = model_type(model)
    if pm is None or mtype is None:
        return None
    from plait.families import find_family

    return find_family(pm, mtype)


def _largest_repeated_class(model) -> str | None:
    import torch.nn as nn

    best, best_len = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1:
                best, best_len = classes.pop(), len(module)
    return best


def decoder_layer_class(cfg, model, explicit: str | None = None) -> str:
    """Class name of the decoder layer (see the module docstring for the order)."""
    if explicit:
        return explicit
    family = family_of(cfg, model)
    if family is not None and family.decoder_layer_class:
        return family.decoder_layer_class
    found = _largest_repeated_class(model)
    if found is None:
        raise ConfigError("could not find the decoder layers of this model; set "
                          "fsdp_config.fsdp_transformer_layer_cls_to_wrap to the layer class name")
    return found


def decoder_layers(model, class_name: str) -> list:
    """Every module of class ``class_name``, in order; ConfigError when none."""
    layers = [m for m in model.modules() if type(m).__name__ == class_name]
    if not layers:
        names = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise ConfigError(f"config key 'fsdp_config.fsdp_transformer_layer_cls_to_wrap': {class_name!r} matches no "
                          f"module of this model; layer-like classes in it: {', '.join(names) or 'none'}")
    return layers
