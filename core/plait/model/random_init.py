"""``reinit_weights: true``: train ``base_model``'s architecture from random weights.

Axolotl's key for pretraining from scratch: the model is built from the
checkpoint's ``config.json`` (with ``model_config`` overrides) and initialised
by transformers' own ``_init_weights``, under the run's ``seed``. No weight
file is read, so ``base_model`` may be a folder holding only a config, or a
hub name of any size.
"""

from __future__ import annotations

#: keys that read or quantize a checkpoint's weights, which a fresh model does not have
WEIGHT_LOADING_KEYS = ("load_in_4bit", "load_in_8bit", "gptq", "model_quantization_config", "lora_model_dir")
#: keys whose runs a plugin's load_model answers (vision-language, reward models), not core's causal LM loader
OTHER_LOADER_KEYS = ("processor_type", "reward_model", "process_reward_model")


def check_reinit_weights(cfg) -> None:
    """Refuse reinit_weights beside a key that needs the checkpoint's weights."""
    if not getattr(cfg, "reinit_weights", None):
        return
    from plait.errors import ConfigError

    clashing = [key for key in WEIGHT_LOADING_KEYS if getattr(cfg, key, None)]
    if clashing:
        raise ConfigError(f"config key 'reinit_weights': true starts from random weights, and {', '.join(clashing)} "
                          f"{'needs' if len(clashing) == 1 else 'need'} the checkpoint's own weights; remove "
                          f"reinit_weights, or {'that key' if len(clashing) == 1 else 'those keys'}")
    other_loader = [key for key in OTHER_LOADER_KEYS if getattr(cfg, key, None)]
    if other_loader:
        raise ConfigError(f"config key 'reinit_weights': true builds a causal language model from random weights; "
                          f"with {other_loader[0]} a plugin loads another kind of model, which it does not cover. "
                          f"Remove reinit_weights")


def build_randomly_initialised(cfg, model_class, kwargs: dict, attn_implementation: str):
    """``model_class`` built from ``base_model``'s config with fresh weights,
    in the dtype, attention and config entries (model_config, rotary scaling)
    ``kwargs`` (``pretrained_kwargs``) ask for."""
    from plait.errors import ConfigError
    from plait.model.loading import config_taking_entries

    # cls_model_config: pretrained_kwargs already built it, with the entries on it
    config = kwargs.get("config") or config_taking_entries(cfg, dict(kwargs))
    if config is None:
        raise ConfigError(f"config key 'base_model': {cfg.base_model!r} has no config.json that transformers can "
                          f"read, which reinit_weights builds the model from")
    build = getattr(model_class, "from_config", None) or model_class._from_config
    extra = {"trust_remote_code": cfg.trust_remote_code} if hasattr(model_class, "from_config") else {}
    return build(config, dtype=kwargs["dtype"], attn_implementation=attn_implementation, **extra)
