"""The keys plait-vision owns, named as in Axolotl, and the rules spanning keys."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: PIL resampling filters ``image_resize_algorithm`` accepts
RESIZE_ALGORITHMS = ("bilinear", "bicubic", "lanczos", "nearest")


class VisionConfig(BaseModel):
    """Keys for vision-language fine-tuning."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    processor_type: Optional[str] = Field(
        None, description="Set to train a vision-language model: AutoProcessor, or a transformers processor class "
                          "name (Qwen2VLProcessor, LlavaProcessor, ...). The processor is loaded from base_model "
                          "(or tokenizer_config); the model through AutoModelForImageTextToText.")
    skip_prepare_dataset: Optional[bool] = Field(
        None, description="Accepted for Axolotl compatibility. Plait always prepares (tokenizes, masks, caches) the "
                          "text and keeps image references; pixels are made per micro-batch, never cached.")
    remove_unused_columns: Optional[bool] = Field(
        None, description="Accepted for Axolotl compatibility; the image references always reach the collator.")
    image_size: Optional[Union[int, tuple[int, int]]] = Field(
        None, description="Resize every image first: an int pads to a square of that side keeping the aspect "
                          "ratio (black borders); [width, height] resizes to exactly that.")
    image_resize_algorithm: Optional[Literal[RESIZE_ALGORITHMS]] = Field(
        None, description="PIL resampling for image_size: bilinear (default), bicubic, lanczos, nearest.")
    freeze_mm_modules: Optional[bool] = Field(
        None, description="Freeze the vision tower (the default in Plait, also for full fine-tuning); false trains "
                          "it too. LoRA adapts only the language model unless lora_target_modules is a regex that "
                          "names projector or vision modules.")

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, value):
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError("image_size must be one int or [width, height]")
        return tuple(value) if isinstance(value, list) else value

    @field_validator("image_resize_algorithm", mode="before")
    @classmethod
    def _algorithm(cls, value):
        return value.lower() if isinstance(value, str) else value


def check_config(cfg) -> None:
    """Rules that span keys: only checked when ``processor_type`` is set."""
    from plait.errors import ConfigError

    if not cfg.processor_type:
        if cfg.image_size is not None:
            raise ConfigError("config key 'image_size' is set but processor_type is not; set processor_type: "
                              "AutoProcessor to train a vision-language model")
        return
    if cfg.sample_packing or cfg.eval_sample_packing:
        key = "sample_packing" if cfg.sample_packing else "eval_sample_packing"
        raise ConfigError(f"config key '{key}': true is not supported with processor_type (vision-language models): "
                          "image features are placed by the model over the whole sequence and cannot be kept to "
                          f"one packed row; set {key}: false")
    if cfg.processor_type != "AutoProcessor" and not cfg.processor_type.endswith("Processor"):
        raise ConfigError(f"config key 'processor_type': {cfg.processor_type!r} is not accepted; give AutoProcessor "
                          "or a transformers processor class name ending in 'Processor'")
    if isinstance(cfg.image_size, int) and cfg.image_size < 1 or \
            isinstance(cfg.image_size, tuple) and min(cfg.image_size) < 1:
        raise ConfigError(f"config key 'image_size': {cfg.image_size!r} is not accepted; give a positive int or "
                          "[width, height]")
    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key)):
            if entry.type and entry.type.partition(".")[0] != "chat_template":
                raise ConfigError(f"config key '{list_key}.{index}.type': {entry.type!r} is not supported with "
                                  "processor_type; vision-language data uses type: chat_template (messages whose "
                                  "content lists text and image parts)")
