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
    """``(model, tokenizer, source)`` in eval mode: the trained model when one is saved, else the base."""
    import torch

    from plait.pipeline import setup_tokenizer

    source = trained_path(cfg, path)
    if source is not None and is_model_dir(source) and not is_adapter_dir(source):
        cfg = cfg.model_copy(update={"base_model": str(source), "tokenizer_config": None})
    elif source is not None:
        if (source / "tokenizer_config.json").is_file():
            cfg = cfg.model_copy(update={"tokenizer_config": str(source)})
    tokenizer = setup_tokenizer(cfg, pm)
    model = pm.hook.load_model(cfg=cfg, tokenizer=tokenizer)
    if source is not None and is_adapter_dir(source):
        if "lora_model_dir" not in type(cfg).model_fields:
            raise ConfigError(f"{source} holds a LoRA adapter; install plait-peft to load it")
        adapter_cfg = cfg.model_copy(update={"lora_model_dir": str(source),
                                             "adapter": cfg.adapter or "lora"})
        model = pm.hook.load_adapter(cfg=adapter_cfg, model=model)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # a quantized model, and one the config placed itself (device_map / max_memory), stay where they were loaded
    placed = getattr(cfg, "device_map", None) is not None or getattr(cfg, "max_memory", None) is not None
    if not (placed or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        model = model.to(device)
    model.eval()
    return model, tokenizer, source
