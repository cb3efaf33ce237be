"""Axolotl's ``rope_scaling`` (also as ``overrides_of_model_config: {rope_scaling: ...}``)
merged into the base model's rotary parameters.

transformers 5 keeps a model's rotary settings in one ``rope_parameters`` dict
(``rope_type``, ``rope_theta``, ``factor``, ...). Passed as a config override, a
scaling dict replaces that dict whole, and the model then loads with
``rope_theta`` None. Here the scaling's entries are laid over the base config's
own ``rope_parameters`` (``type`` read as ``rope_type``, Axolotl's older
spelling), and the rotary type is checked against the ones transformers
implements, before any weight is read.
"""

from __future__ import annotations

from plait.errors import ConfigError


def scaling_asked(cfg) -> tuple[str, dict] | None:
    """``(config key, scaling dict)`` when the config asks for rotary scaling."""
    if cfg.rope_scaling:
        if cfg.overrides_of_model_config.get("rope_scaling"):
            raise ConfigError("rope_scaling and overrides_of_model_config.rope_scaling (model_config) are both set; "
                              "keep one")
        return "rope_scaling", dict(cfg.rope_scaling)
    scaling = cfg.overrides_of_model_config.get("rope_scaling")
    return ("overrides_of_model_config.rope_scaling", dict(scaling)) if scaling else None


def merged_rope_parameters(key: str, scaling: dict, base_parameters: dict | None) -> dict:
    """The base model's ``rope_parameters`` with ``scaling`` laid over them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(scaling)
    legacy_type = scaling.pop("type", None)  # Axolotl's older spelling of rope_type
    rope_type = scaling.pop("rope_type", None) or legacy_type
    accepted = sorted({"default", *ROPE_INIT_FUNCTIONS})
    if rope_type not in accepted:
        raise ConfigError(f"config key '{key}': rope type {rope_type!r} is not accepted (give it as type or "
                          f"rope_type); accepted: {', '.join(accepted)}")
    base = dict(base_parameters or {})
    if base and all(isinstance(value, dict) for value in base.values()):
        raise ConfigError(f"config key '{key}': this model keeps rotary parameters per layer type "
                          f"({', '.join(base)}); set them in full with overrides_of_model_config: "
                          f"{{rope_parameters: {{<layer type>: {{...}}}}}}")
    return {**base, **scaling, "rope_type": rope_type}


#: the config entry rotary scaling is passed to from_pretrained as
ROPE_KEY = "rope_parameters"


def rope_kwargs(cfg) -> dict:
    """``{"rope_parameters": ...}`` for ``from_pretrained`` when the config asks for
    rotary scaling (the base model's config is read for its own parameters), else ``{}``."""
    asked = scaling_asked(cfg)
    if asked is None:
        return {}
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(cfg.base_model_config or cfg.base_model, trust_remote_code=cfg.trust_remote_code,
                                      revision=cfg.revision_of_model)
    return {ROPE_KEY: merged_rope_parameters(*asked, getattr(base, ROPE_KEY, None))}
