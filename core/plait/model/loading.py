"""What every model loader shares: checking ``base_model``/``tokenizer_config``
sources and explaining a failed load, the compute dtype, the
``from_pretrained`` arguments, fitting the embeddings to the tokenizer. Core's
``load_model`` and other loaders (plait-bnb, plait-vision) build on these."""

from __future__ import annotations


#: what ``base_model`` (and ``tokenizer_config``) accept, for error messages
ACCEPTED_SOURCES = ("a local directory with config.json, the weights and tokenizer files "
                    "(tokenizer.json or tokenizer_config.json), or a Hugging Face hub name when a network is available")


def looks_like_path(value: str) -> bool:
    """A value meant as a local directory rather than a hub name: absolute,
    ``./``, ``../``, ``~``, or an existing directory."""
    import os

    return (os.path.isabs(value) or value.startswith(("./", "../", "~", ".\\", "..\\")) or value in (".", "..")
            or os.path.isdir(value))


def check_model_sources(cfg, keys=("base_model", "tokenizer_config")) -> None:
    """Fail before any model work when ``base_model`` or ``tokenizer_config``
    names a local path that does not exist (transformers would otherwise try
    it as a hub name and fail with a confusing message)."""
    import os

    from plait.errors import ConfigError

    for key in keys:
        value = getattr(cfg, key, None)
        if not value or not looks_like_path(value):
            continue
        if not os.path.exists(value):
            raise ConfigError(f"config key {key!r}: {value!r} does not exist (a local path; resolved: "
                              f"{os.path.abspath(value)})\naccepted: {ACCEPTED_SOURCES}")
        if not os.path.isdir(value):
            raise ConfigError(f"config key {key!r}: {value!r} is a file, not a directory\naccepted: {ACCEPTED_SOURCES}")


#: files one of which a local directory needs, per thing loaded from it
NEEDED_FILES = {
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model"),
    "model": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"),
}


def missing_files(source: str, what: str) -> list[str]:
    """What a local directory lacks to load ``what`` ("tokenizer" or "model") from it."""
    import os

    if not os.path.isdir(source):
        return []
    needs = [NEEDED_FILES["tokenizer"]] if what == "tokenizer" else [NEEDED_FILES["model"], NEEDED_FILES["weights"]]
    return [" or ".join(names) for names in needs if not any(os.path.isfile(os.path.join(source, n)) for n in names)]


def source_error(key: str, source: str, what: str, exc: BaseException):
    """A :class:`ConfigError` for a ``from_pretrained`` that failed on ``source``:
    what a local directory lacks, else transformers' reason in one line."""
    from plait.errors import ConfigError

    missing = missing_files(source, what)
    if missing:
        reason = f"the directory has no {'; no '.join(missing)}"
    else:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
    return ConfigError(f"config key {key!r}: cannot load the {what} from {source!r}: {reason}\n"
                       f"accepted: {ACCEPTED_SOURCES}")


def compute_dtype(cfg):
    """The dtype weights are loaded in, from ``torch_dtype``/``bf16``/``fp16``."""
    import torch

    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        return getattr(torch, cfg.torch_dtype)
    if cfg.fp16:
        return torch.float16
    if cfg.bf16 is True or cfg.bf16 == "full":
        return torch.bfloat16
    if cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pretrained_kwargs(cfg) -> dict:
    """Arguments to ``from_pretrained`` every loader shares (dtype, attention,
    remote code); turns TF32 on when asked. Quantizing loaders add theirs."""
    import torch

    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from plait.model.choice import route_packed_sdpa_to_varlen

    route_packed_sdpa_to_varlen(cfg)
    if cfg.varlen_attention:
        # "plait_varlen" must be registered before from_pretrained checks the name;
        # here, so every loader that uses these kwargs (core's, plait-bnb's) gets it
        from plait.model.varlen import register_varlen_attention

        register_varlen_attention()
    kwargs = dict(dtype=compute_dtype(cfg), attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code, revision=cfg.revision_of_model)
    from plait.model.transformers_kernels import kernel_kwargs

    kwargs.update(kernel_kwargs(cfg))
    from plait.model.load_options import load_kwargs

    # model_quantization_config / gptq (quantization_config=) and device_map / max_memory
    kwargs.update(load_kwargs(cfg))
    # Axolotl's model_kwargs, then model_config: from_pretrained sets config entries it is given by name
    kwargs.update(cfg.overrides_of_model_kwargs)
    kwargs.update(cfg.overrides_of_model_config)
    from plait.model.rope_scaling import rope_kwargs

    rope = rope_kwargs(cfg)
    if rope:  # a scaling dict passed as it is would replace the base's rotary parameters (rope_theta too)
        kwargs.pop("rope_scaling", None)
        kwargs.update(rope)
    if getattr(cfg, "cls_model_config", None):
        config = config_taking_entries(cfg, kwargs)
        if config is not None:  # else from_pretrained says why the source cannot be read
            kwargs["config"] = config
    return kwargs


def config_taking_entries(cfg, kwargs: dict):
    """``base_model``'s config (:func:`base_model_config`) with the config entries
    of ``kwargs`` (``pretrained_kwargs``: the model_config overrides and the merged
    rotary parameters) moved onto it, or ``None`` when it cannot be read. For
    building with a config object, which takes no config entries by keyword."""
    config = base_model_config(cfg)
    if config is None:
        return None
    from plait.model.rope_scaling import ROPE_KEY

    for key in [*cfg.overrides_of_model_config, ROPE_KEY]:
        if key in kwargs:
            setattr(config, key, kwargs.pop(key))
    return config


def causal_decoder_kwargs(cfg, kwargs: dict) -> dict:
    """``{"is_decoder": True}`` when ``base_model``'s config says ``is_decoder: false``.

    BERT-style models (bert, roberta, electra, ernie, ...) have a causal-LM
    class (``BertLMHeadModel``) that attends causally only when the config
    says ``is_decoder``; their checkpoints are encoders (false), and loaded
    as they are they attend both ways, so next-token training would read the
    token it predicts (transformers only warns). Configs without the field
    (Llama and nearly every decoder) are left alone (GPT-NeoX has the field
    and ignores it), and so is a value the
    user set through ``model_config`` / ``model_kwargs`` (``kwargs``, the
    other ``from_pretrained`` arguments). For the causal-LM loaders only: a
    classifier (reward model) on a BERT encoder stays bidirectional.
    """
    if "is_decoder" in kwargs:
        return {}
    config = base_model_config(cfg)
    if getattr(config, "is_decoder", None) is False:
        import logging

        logging.getLogger(__name__).warning(
            "%s: loading with is_decoder=True (the checkpoint's config says false, and BERT-style causal LMs "
            "attend both ways unless it is true); pass is_decoder=True when loading the base model for what is "
            "trained here outside Plait.", config.model_type)
        return {"is_decoder": True}
    return {}


def causal_lm_class(config):
    """The transformers class that loads a checkpoint of ``config`` as a causal LM.

    ``AutoModelForCausalLM`` maps config classes to model classes, and a few
    causal LMs of composite models are saved with a config class the mapping
    does not list: ``Emu3ForCausalLM`` and ``MllamaForCausalLM`` hold only the
    text part, so their ``config.json`` is the text config (``Emu3TextConfig``),
    and ``AutoModelForCausalLM`` refuses the checkpoint those classes wrote.
    Such a checkpoint names its class in ``architectures``; when that class is
    one the causal-LM mapping lists and it takes this config class, it is the
    answer. Everything else (remote code included) is ``AutoModelForCausalLM``.
    """
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None) if name in causal_names else None
        if model_class is not None and getattr(model_class, "config_class", None) is type(config):
            return model_class
    return AutoModelForCausalLM


def causal_lm_class_of(cfg):
    """:func:`causal_lm_class` of ``base_model``'s config; ``AutoModelForCausalLM``
    when the config cannot be read (its ``from_pretrained`` then says why)."""
    from transformers import AutoModelForCausalLM

    config = base_model_config(cfg)
    return AutoModelForCausalLM if config is None else causal_lm_class(config)


def base_model_config(cfg):
    """``base_model``'s config as ``AutoConfig`` reads it, or ``None`` when it
    cannot be read: the loaders' own ``from_pretrained`` then reports why."""
    try:
        return config_class(cfg).from_pretrained(cfg.base_model, revision=cfg.revision_of_model,
                                                 trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - from_pretrained reports an unreadable source itself
        return None


def config_class(cfg):
    """The class ``base_model``'s config.json is read with: ``AutoConfig``, or
    the transformers config class ``cls_model_config`` names (Axolotl's key: the
    text part of a composite checkpoint, say, with ``Gemma3TextConfig``)."""
    import transformers

    name = getattr(cfg, "cls_model_config", None)
    return getattr(transformers, name) if name else transformers.AutoConfig


def check_config_class(cfg) -> None:
    """Refuse a ``cls_model_config`` that names no transformers config class."""
    name = getattr(cfg, "cls_model_config", None)
    if not name:
        return
    import transformers

    from plait.errors import ConfigError, did_you_mean

    found = getattr(transformers, name, None)
    if not (isinstance(found, type) and issubclass(found, transformers.PretrainedConfig)):
        known = [n for n in dir(transformers) if n.endswith("Config") and n[0].isupper()]
        raise ConfigError(f"config key 'cls_model_config': {name!r} is not a config class of transformers "
                          f"{transformers.__version__}{did_you_mean(name, known)}; give a class name such as "
                          f"LlamaConfig or Gemma3TextConfig, or remove the key to let AutoConfig choose")


def loading_contexts(cfg):
    """One context manager holding every plugin's :func:`~plait.hookspecs.loading_context`
    open (in hook order); loaders enter it around ``from_pretrained``."""
    import contextlib

    stack = contextlib.ExitStack()
    pm = getattr(cfg, "plugin_manager", None)
    if pm is None:
        return stack
    contexts = [c for c in pm.hook.loading_context(cfg=cfg) if c is not None]

    @contextlib.contextmanager
    def entered():
        with stack:
            for context in contexts:
                stack.enter_context(context)
            yield

    return entered()


def fit_to_tokenizer(cfg, model, tokenizer):
    """Grow the embeddings to the tokenizer's added tokens (``shrink_embeddings``:
    also shrink them to it) and turn the KV cache off."""
    if tokenizer is not None:
        import math

        rows = model.get_input_embeddings().num_embeddings
        multiple = 32 if cfg.resize_token_embeddings_to_32x else None
        wanted = math.ceil(len(tokenizer) / 32) * 32 if multiple else len(tokenizer)
        if len(tokenizer) > rows or (cfg.shrink_embeddings and wanted < rows):
            # Axolotl's default: new rows from the model's initialiser (transformers' own default is the mean)
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple,
                                          mean_resizing=cfg.mean_resizing_embeddings)
    # a KV cache changes how transformers builds attention masks; never train with one
    model.config.use_cache = False
    return model


#: where :func:`mark_kbit_prepared` records its mark (read it only through :func:`is_kbit_prepared`)
_KBIT_PREPARED = "_plait_kbit_prepared"


def mark_kbit_prepared(model) -> None:
    """Record that a loader prepared this k-bit model for training itself
    (frozen base, input grads), so an adapter plugin skips
    peft's ``prepare_model_for_kbit_training`` and its float32 upcast. The one
    message between a quantizing loader (plait-bnb) and an adapter plugin
    (plait-peft), owned here so neither imports the other."""
    setattr(model, _KBIT_PREPARED, True)


def is_kbit_prepared(model) -> bool:
    """Whether :func:`mark_kbit_prepared` was called on ``model``."""
    return bool(getattr(model, _KBIT_PREPARED, False))
