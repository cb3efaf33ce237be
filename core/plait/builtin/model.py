"""Core's default tokenizer and model loading (any Hugging Face causal LM)."""

from __future__ import annotations

from plait.chat_templates import NAMED_CHAT_TEMPLATES, check_chat_template_names, resolve_chat_template
from plait.hookspecs import hookimpl
from plait.model.loading import fit_to_tokenizer, pretrained_kwargs


@hookimpl
def chat_templates():
    return dict(NAMED_CHAT_TEMPLATES)


@hookimpl
def validate_config(cfg):
    check_chat_template_names(cfg)


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
        from plait.model.recompute import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs)
    return model
