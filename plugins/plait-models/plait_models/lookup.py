"""Find the family of a run or of a loaded model."""

from __future__ import annotations

from plait.families import ModelFamily, find_family


def base_model_of(model):
    """The transformers model inside DDP and peft wrappers (or ``model`` itself)."""
    if type(model).__name__ == "DistributedDataParallel":
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_of_model(pm, model, model_config_type: str | None = None) -> ModelFamily | None:
    """The family claiming ``model``'s ``config.model_type`` (or the
    ``model_config_type`` override), or ``None`` for the generic path."""
    model_type = model_config_type or getattr(base_model_of(model).config, "model_type", None)
    return find_family(pm, model_type) if model_type else None
