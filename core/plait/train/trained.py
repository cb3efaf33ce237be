"""Load what a run saved in ``output_dir``, for evaluate, inference and merge-lora.

A LoRA run saved an adapter (``adapter_config.json``): the base model is
loaded as the config says and the adapter attached through the
``load_adapter`` hook with ``lora_model_dir`` pointing at the saved one, so
core never imports peft. A full fine-tune saved a whole model, loaded with
``base_model`` pointing at it.
"""

from __future__ import annotations

from pathlib import Path

from plait.errors import ConfigError


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def trained_path(cfg, path: str | Path | None = None) -> Path | None:
    """Where the trained model is: ``path``, else ``output_dir`` when it holds
    one, else ``None`` (use the base model)."""
    if path is not None:
        path = Path(path)
        if not (is_adapter_dir(path) or is_model_dir(path)):
            raise ConfigError(f"{path} holds no saved model (no adapter_config.json, nor config.json + safetensors)")
        return path
    out = Path(cfg.output_dir)
    return out if is_adapter_dir(out) or is_model_dir(out) else None


def load_trained(cfg, pm, path: str | Path | None = None, *, device=None):
    """``(model, tokenizer, source)`` in eval mode: the trained model when one
    is saved, else the base; set up by :func:`plait.pipeline.setup_model`."""
    import torch

    from plait.pipeline import setup_model, setup_tokenizer

    source = trained_path(cfg, path)
    if source is not None and is_model_dir(source) and not is_adapter_dir(source):
        cfg = cfg.model_copy(update={"base_model": str(source), "tokenizer_config": None})
    elif source is not None:
        if (source / "tokenizer_config.json").is_file():
            cfg = cfg.model_copy(update={"tokenizer_config": str(source)})
    tokenizer = setup_tokenizer(cfg, pm)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved_adapter = source if source is not None and is_adapter_dir(source) else None
    model = setup_model(cfg, pm, tokenizer, for_training=False, device=device, saved_adapter=saved_adapter)
    return model, tokenizer, source
