"""Core's default tokenizer and model loading (any Hugging Face causal LM)."""

from __future__ import annotations

from plait.hookspecs import hookimpl

#: chat templates a config can name instead of writing jinja
NAMED_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


def resolve_chat_template(cfg, tokenizer) -> str | None:
    """The jinja template ``chat_template``/``chat_template_jinja`` ask for."""
    from plait.errors import ConfigError

    if cfg.chat_template_jinja:
        return cfg.chat_template_jinja
    name = cfg.chat_template
    if name in (None, "tokenizer_default"):
        return tokenizer.chat_template
    if name in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[name]
    if "{%" in name or "{{" in name:
        return name
    raise ConfigError(
        f"config key 'chat_template': {name!r} is not a known template; accepted: tokenizer_default, "
        f"{', '.join(NAMED_CHAT_TEMPLATES)}, or a jinja string (or use chat_template_jinja)"
    )


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


@hookimpl(trylast=True)
def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = cfg.tokenizer_config or cfg.base_model
    check_model_sources(cfg, (key,))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, use_fast=cfg.tokenizer_use_fast, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:  # missing files, no network, a folder without a tokenizer
        raise source_error(key, source, "tokenizer", exc) from exc
    if cfg.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.special_tokens))
    if cfg.tokens:
        tokenizer.add_tokens(list(cfg.tokens))
    if tokenizer.pad_token is None:
        # a pad token is needed to batch; the EOS is safe because padded labels are -100
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    template = resolve_chat_template(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


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
    if cfg.varlen_attention:
        # "plait_varlen" must be registered before from_pretrained checks the name;
        # here, so every loader that uses these kwargs (core's, plait-bnb's) gets it
        from plait.attention.varlen import register_varlen_attention

        register_varlen_attention()
    return dict(dtype=compute_dtype(cfg), attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code)


def fit_to_tokenizer(cfg, model, tokenizer):
    """Grow the embeddings to the tokenizer's added tokens and turn the KV cache off."""
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        multiple = 32 if cfg.resize_token_embeddings_to_32x else None
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple)
    # a KV cache changes how transformers builds attention masks; never train with one
    model.config.use_cache = False
    return model


@hookimpl(trylast=True)
def load_model(cfg, tokenizer):
    import os

    from transformers import AutoModelForCausalLM

    check_model_sources(cfg, ("base_model",))
    kwargs = pretrained_kwargs(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    except OSError as exc:  # missing config.json or weights, no network
        raise source_error("base_model", cfg.base_model, "model", exc) from exc
    except ValueError as exc:  # a folder whose config.json names no model type transformers knows
        no_config = looks_like_path(cfg.base_model) and not os.path.isfile(os.path.join(cfg.base_model, "config.json"))
        if no_config or "Unrecognized model" in str(exc):
            raise source_error("base_model", cfg.base_model, "model", exc) from exc
        raise  # a setting's problem (attn_implementation, say): transformers' own message is the clearer one
    fit_to_tokenizer(cfg, model, tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           **cfg.gradient_checkpointing_kwargs})
    return model
