"""The hookimpls of plait-vision.

Every hook answers only when ``processor_type`` is set, so installing the
plugin changes nothing for text-only runs. Heavy imports stay inside the
functions (``plait --help`` must not import torch).
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_vision.config import VisionConfig

    return VisionConfig


@hookimpl
def validate_config(cfg):
    from plait_vision.config import check_config

    check_config(cfg)


@hookimpl
def chat_templates():
    from plait_vision.templates import TEMPLATES

    return dict(TEMPLATES)


@hookimpl
def tokenizer_loaded(cfg, tokenizer):
    """A tokenizer without a chat template takes its processor's (processors
    keep the model's template beside, not inside, the tokenizer files)."""
    if not cfg.processor_type or tokenizer.chat_template:
        return
    from plait_vision.processor import load_processor, processor_source

    processor = load_processor(processor_source(cfg), cfg.processor_type, bool(cfg.trust_remote_code))
    if getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template


@hookimpl(tryfirst=True)
def tokenize(cfg, dataset_cfg, tokenizer, batch):
    if not cfg.processor_type or (dataset_cfg.type or "").partition(".")[0] != "chat_template":
        return None
    from plait_vision.processor import processor_for
    from plait_vision.tokenize import tokenize as tokenize_rows

    return tokenize_rows(cfg, dataset_cfg, tokenizer, batch, processor_for(cfg, tokenizer))


@hookimpl(tryfirst=True)
def collate(cfg, rows, tokenizer):
    if not cfg.processor_type:
        return None
    from plait_vision.collate import collate_vision
    from plait_vision.processor import processor_for

    return collate_vision(cfg, rows, tokenizer, processor_for(cfg, tokenizer))


@hookimpl(tryfirst=True)
def load_model(cfg, tokenizer):
    if not cfg.processor_type:
        return None
    from plait_vision.model import load_vision_model

    return load_vision_model(cfg, tokenizer)


@hookimpl(tryfirst=True)
def load_adapter(cfg, model):
    if not cfg.processor_type or cfg.adapter not in ("lora", "qlora"):
        return None
    from plait_vision.model import attach_vision_lora

    return attach_vision_lora(cfg, model)


@hookimpl(hookwrapper=True)
def save_model(cfg, model, tokenizer, path):
    """After the model is saved, write the processor's image settings and chat
    template beside it, so ``AutoProcessor.from_pretrained(path)`` (and
    ``plait inference --image``) work on the result."""
    outcome = yield
    if not cfg.processor_type:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    from plait_vision.processor import processor_for, save_processor

    save_processor(processor_for(cfg, tokenizer), outcome.get_result() or path)


@hookimpl
def encode_prompt(cfg, tokenizer, text, images):
    """The processor's inputs for ``plait inference --image``: images opened
    and resized as in training, placeholders expanded."""
    if not cfg.processor_type:
        return None
    from plait.errors import ConfigError

    from plait_vision.images import ImageError, open_image, reference
    from plait_vision.processor import processor_for

    try:
        opened = [open_image(reference(path, None), cfg.image_size, cfg.image_resize_algorithm) for path in images]
    except ImageError as exc:
        raise ConfigError(f"--image: {exc}") from None
    processor = processor_for(cfg, tokenizer)
    return dict(processor(text=[text], images=[opened], add_special_tokens=False, return_tensors="pt"))
