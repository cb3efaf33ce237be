"""Load the model's processor (image processor + tokenizer + chat template).

Processors of models that also take videos (Qwen2-VL and its successors) have
a video processor, and transformers builds video processors only with
torchvision installed. This plugin trains on images, so where torchvision is
missing such a processor is built without its video processor
(:func:`processor_from_parts`) instead of failing; asking it for videos then
fails inside transformers.

Without torchvision the image processor is the PIL one named by the
checkpoint (:func:`image_processor_for`): transformers 5.17's
``AutoImageProcessor`` cannot even be imported without torchvision, although
most models have a PIL image processor. A model whose image processor exists
only for torchvision gets a ConfigError that names the package to install.

A few processor modules of transformers import the torchvision image
processor's module only for a helper that the PIL image processor's module
also has (Pixtral's, which Mistral 3 uses, in transformers 5.25): without
torchvision such a processor class is a placeholder that cannot be built.
:func:`processor_class_without_torchvision` imports the real class with that
helper taken from the PIL module, and the processor is built from its parts.
"""

from __future__ import annotations

import copy
import functools
import json
import os


def _read_text(path: str) -> str:
    """The file's text, closing it at once (a bare ``open().read()`` leaves the
    handle to the garbage collector: a ResourceWarning in the CLI's output)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def processor_source(cfg) -> str:
    return cfg.tokenizer_config or cfg.base_model


def processor_for(cfg, tokenizer):
    """The run's processor, its tokenizer replaced by the run's ``tokenizer``
    (which carries the configured chat template, special tokens and pad token)."""
    processor = copy.copy(load_processor(processor_source(cfg), cfg.processor_type, bool(cfg.trust_remote_code)))
    processor.tokenizer = tokenizer
    return processor


@functools.lru_cache(maxsize=4)
def load_processor(source: str, processor_type: str, trust_remote_code: bool = False):
    """``processor_type.from_pretrained(source)``; cached per process (the
    tokenize workers and the collator ask for it once per batch)."""
    import transformers
    from plait.errors import ConfigError

    from transformers.utils import is_torchvision_available

    cls = _processor_class(processor_type)
    if not is_torchvision_available():  # with torchvision transformers builds every processor itself
        concrete = _class_for_source(source, trust_remote_code) if cls.__name__ == "AutoProcessor" else cls
        if _built_from_parts(concrete):
            return processor_from_parts(concrete, source, trust_remote_code)
    try:
        processor = cls.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise ConfigError(f"config key 'processor_type': the {processor_type} of {source!r} cannot be built: "
                          f"{_missing_package_hint(exc)}") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'processor_type': cannot load a {processor_type} from {source!r}: "
                          f"{' '.join(str(exc).split())[:300]}") from exc
    if not hasattr(processor, "image_processor") or isinstance(processor, transformers.PreTrainedTokenizerBase):
        raise ConfigError(f"config key 'processor_type': {source!r} has no image processor (got a "
                          f"{type(processor).__name__}); base_model must be a vision-language model with a "
                          f"preprocessor_config.json")
    return processor


def _missing_package_hint(exc: ImportError) -> str:
    """What to install, from transformers' ImportError (a screenful of text)."""
    text = " ".join(str(exc).split())
    if "torchvision" in text.lower():
        return f"it needs torchvision, which is not installed (pip install torchvision); transformers said: {text[:200]}"
    return text[:300]


def image_processor_for(source: str, trust_remote_code: bool = False):
    """The image processor of ``source``.

    With torchvision installed, ``AutoImageProcessor`` picks it. Without it,
    the PIL class of the type ``preprocessor_config.json`` names
    (``Qwen2VLImageProcessor`` -> ``Qwen2VLImageProcessorPil``) is loaded
    directly: transformers 5.17's ``AutoImageProcessor`` module needs
    torchvision to import at all, even where a PIL class exists.
    """
    import transformers
    from plait.errors import ConfigError
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    declared = _declared_image_processor(source)
    if not declared:
        raise ConfigError(f"config key 'processor_type': {source!r} names no image_processor_type in a "
                          f"preprocessor_config.json or processor_config.json, and without torchvision (not "
                          f"installed) transformers cannot pick one; install torchvision (pip install torchvision)")
    base = declared.removesuffix("Fast").removesuffix("Pil")
    # the PIL class by its name; then the plain name, which transformers
    # resolves to the PIL class (with a warning) where torchvision is missing.
    # A class that needs torchvision is a placeholder marked is_dummy.
    for name in (base + "Pil", base):
        cls = getattr(transformers, name, None)
        if cls is not None and not getattr(cls, "is_dummy", False):
            return cls.from_pretrained(source)
    raise ConfigError(f"config key 'processor_type': the image processor of {source!r} ({declared}) exists only for "
                      f"torchvision, which is not installed: pip install torchvision")


def _declared_image_processor(source: str) -> str | None:
    """The image processor class ``source`` names: in preprocessor_config.json,
    or under ``image_processor`` in processor_config.json (where a processor's
    own ``save_pretrained`` puts it in transformers 5)."""
    path = os.path.join(source, "preprocessor_config.json")
    if os.path.isfile(path):
        declared = json.loads(_read_text(path)).get("image_processor_type")
        if declared:
            return declared
    path = os.path.join(source, "processor_config.json")
    if os.path.isfile(path):
        nested = json.loads(_read_text(path)).get("image_processor")
        if isinstance(nested, dict):
            return nested.get("image_processor_type")
    return None


def _processor_class(processor_type: str):
    from plait.errors import ConfigError

    cls = _transformers_class(processor_type)
    # a placeholder (a class that needs torchvision) raises ImportError on any attribute: from_pretrained says so
    if cls is None or not (getattr(cls, "is_dummy", False) or hasattr(cls, "from_pretrained")):
        raise ConfigError(f"config key 'processor_type': {processor_type!r} is not a transformers processor class; "
                          f"give AutoProcessor or a class such as Qwen2VLProcessor")
    return cls


def _class_for_source(source: str, trust_remote_code: bool):
    """The concrete processor class ``AutoProcessor`` would build for ``source``."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(source, name)
        if os.path.isfile(path):
            declared = json.loads(_read_text(path)).get("processor_class")
            if declared and hasattr(transformers, declared):
                return _transformers_class(declared)
    try:
        model_type = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return _transformers_class(name) if name else None


#: processor classes whose module imports the torchvision image processor's
#: module only for helpers that the PIL image processor's module has too:
#: class name -> (processor module, torchvision module, PIL module)
PIL_TWIN_MODULES = {
    "PixtralProcessor": ("transformers.models.pixtral.processing_pixtral",
                         "transformers.models.pixtral.image_processing_pixtral",
                         "transformers.models.pixtral.image_processing_pil_pixtral"),
}


def _transformers_class(name: str):
    """``transformers.<name>``; without torchvision, the real class of a
    processor in :data:`PIL_TWIN_MODULES` instead of transformers' placeholder."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is not None and getattr(cls, "is_dummy", False) and name in PIL_TWIN_MODULES:
        return processor_class_without_torchvision(name) or cls
    return cls


@functools.lru_cache(maxsize=None)
def processor_class_without_torchvision(name: str):
    """The processor class ``name`` imported with its torchvision image
    module's names taken from the PIL image module (None if that fails).

    The torchvision module is stood in for only while the processor module
    runs its imports, so nothing else sees it; the names the processor module
    takes from it are functions the PIL module defines alike.
    """
    import importlib
    import sys
    import types

    module_name, torchvision_module, pil_module = PIL_TWIN_MODULES[name]
    if torchvision_module in sys.modules:  # torchvision is there after all: nothing to stand in for
        return None
    stand_in = types.ModuleType(torchvision_module)
    stand_in.__dict__.update({k: v for k, v in vars(importlib.import_module(pil_module)).items()
                              if not k.startswith("__")})
    sys.modules[torchvision_module] = stand_in
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    finally:
        del sys.modules[torchvision_module]
    return getattr(module, name, None)


def _built_from_parts(concrete) -> bool:
    """Whether the processor is built by :func:`processor_from_parts` (asked
    without torchvision only): a processor with a video processor, or one whose
    class transformers cannot build from a checkpoint then (:data:`PIL_TWIN_MODULES`)."""
    if concrete is None or getattr(concrete, "is_dummy", False):
        return False  # a placeholder: from_pretrained raises the ImportError that names torchvision
    return concrete.__name__ in PIL_TWIN_MODULES or "video_processor" in concrete.get_attributes()


def processor_from_parts(base, source: str, trust_remote_code: bool = False):
    """The processor class ``base`` built from ``source``'s image processor
    (:func:`image_processor_for`), tokenizer, settings and chat template; a
    video processor is left out (``video_processor=None``).

    transformers checks each sub-processor's class; a subclass of the
    processor accepts ``None`` for the video processor and checks the rest as
    usual. Everything else (image token expansion, chat template) is the
    processor's own code.
    """
    import inspect

    from transformers import AutoTokenizer

    parts = {}
    cls = base
    if "video_processor" in base.get_attributes():
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return base.check_argument_for_proper_class(self, argument_name, argument)

        cls = type(base.__name__, (base,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                             "__module__": base.__module__})
        parts["video_processor"] = None
    kwargs = {}
    config_path = os.path.join(source, "processor_config.json")
    if os.path.isfile(config_path):
        # the processor's settings; its parts (a nested image_processor, ...) are built here
        accepted = set(inspect.signature(base.__init__).parameters) - set(base.get_attributes())
        kwargs = {k: v for k, v in json.loads(_read_text(config_path)).items() if k in accepted}
    template_path = os.path.join(source, "chat_template.jinja")
    if "chat_template" not in kwargs and os.path.isfile(template_path):
        kwargs["chat_template"] = _read_text(template_path)
    return cls(image_processor=image_processor_for(source, trust_remote_code),
               tokenizer=AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code),
               **parts, **kwargs)


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens that stand for image content (placeholders, breaks,
    starts and ends of images): never trained."""
    tokenizer = processor.tokenizer
    ids = set()
    for attr in ("image_token", "boi_token", "eoi_token", "image_break_token", "image_end_token",
                 "vision_start_token", "vision_end_token", "start_image_token", "end_image_token"):
        for owner in (processor, tokenizer):
            token = getattr(owner, attr, None)
            if isinstance(token, str) and token:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if token_id is not None and token_id != tokenizer.unk_token_id:
                    ids.add(token_id)
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    # Qwen-VL's image markers, which its processor does not name as attributes
    for token in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def save_processor(processor, path: str) -> None:
    """Write the processor's files to ``path`` (the tokenizer is already
    there): its own ``save_pretrained``, or for an image-only processor the
    image processor, the chat template and the processor's settings."""
    if getattr(processor, "video_processor", True) is not None:
        processor.save_pretrained(path)
        return
    processor.image_processor.save_pretrained(path)
    settings = {"processor_class": type(processor).__name__}
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump(settings, f, indent=1)
    if processor.chat_template:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(processor.chat_template)
