"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large
Models"): the B matrices learn faster than the A matrices.

Axolotl's meaning, which is peft's ``create_loraplus_optimizer``: with
``loraplus_lr_ratio`` set, every trainable ``lora_B`` matrix and every
trainable 1-D parameter train at ``learning_rate x loraplus_lr_ratio``, the
adapters of an embedding layer at ``loraplus_lr_embedding`` (default 1e-6),
everything else at ``learning_rate``. Weight decay keeps Plait's rule
(matrices only); peft's helper would have set it to 0.
"""

from __future__ import annotations

#: peft's and Axolotl's default rate of LoRA adapters on embedding layers
DEFAULT_LR_EMBEDDING = 1e-6


def loraplus_learning_rates(cfg, model) -> dict[str, float]:
    """``{name: lr}`` for the parameters LoRA+ moves off ``learning_rate``."""
    from peft.tuners.lora.layer import Embedding as LoraEmbedding

    ratio = cfg.loraplus_lr_ratio
    embedding_lr = cfg.loraplus_lr_embedding if cfg.loraplus_lr_embedding is not None else DEFAULT_LR_EMBEDDING
    rates: dict[str, float] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # an adapter's weights sit in a ModuleDict/ParameterDict under its tuner layer:
        # <layer>.lora_B.<adapter>.weight or <layer>.lora_embedding_B.<adapter>
        owner = _module(model, name.rsplit(".", 2)[0]) if name.count(".") >= 2 else None
        if isinstance(owner, LoraEmbedding):
            rates[name] = embedding_lr
        elif "lora_B" in name or param.ndim == 1:
            rates[name] = cfg.learning_rate * ratio
    return rates


def _module(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
