"""Core's default tokenizer and model loading (any Hugging Face causal LM)."""

from __future__ import annotations

from plait.hookspecs import hookimpl

#: core's named chat templates, contributed through the ``chat_templates`` hook
#: (plugins add more: :func:`named_chat_templates` is the full set of a run)
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

#: the ``chat_template`` value that keeps the tokenizer's own template
TOKENIZER_DEFAULT = "tokenizer_default"
#: ``tokenizer_default_fallback_<name>``: the tokenizer's template, else the named one
FALLBACK_PREFIX = "tokenizer_default_fallback_"


@hookimpl
def chat_templates():
    return dict(NAMED_CHAT_TEMPLATES)


def _plugin_label(pm, name: str) -> str:
    info = getattr(pm, "info", {}).get(name)
    if info is not None and info.distribution:
        return f"{name!r} (distribution {info.distribution} {info.version})"
    return repr(name)


def named_chat_templates(pm) -> dict[str, str]:
    """Every named chat template of the run, ``{name: jinja}``, asked of all
    plugins through the ``chat_templates`` hook (core's own when ``pm`` is
    ``None``). Two plugins giving one name, a reserved name or a value that is
    not text is a :class:`PluginError` naming the plugin(s)."""
    from plait.errors import PluginError

    if pm is None:
        return dict(NAMED_CHAT_TEMPLATES)
    templates: dict[str, str] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.chat_templates.get_hookimpls():  # one by one, to know who gave what
        if getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False):
            continue
        contributed = impl.function() or {}
        who = _plugin_label(pm, impl.plugin_name)
        if not isinstance(contributed, dict):
            raise PluginError(f"plugin {who}: chat_templates() returned a {type(contributed).__name__}, "
                              f"expected a dict {{name: jinja template}}")
        for name, template in contributed.items():
            if not isinstance(name, str) or not isinstance(template, str) or not name:
                raise PluginError(f"plugin {who}: chat_templates() entry {name!r} must map a name to a jinja "
                                  f"string (got {type(template).__name__})")
            if name == TOKENIZER_DEFAULT or name.startswith(FALLBACK_PREFIX):
                raise PluginError(f"plugin {who}: chat template name {name!r} is reserved "
                                  f"({TOKENIZER_DEFAULT}, {FALLBACK_PREFIX}<name>)")
            if name in owners:
                raise PluginError(f"chat template {name!r} is given by two plugins: {owners[name]} and {who}; "
                                  f"disable one of them (disable_plugins) or have one rename its template")
            templates[name] = template
            owners[name] = who
    return templates


def unknown_template_error(key: str, value: str, names):
    """The :class:`ConfigError` for a ``chat_template`` value that names no
    template: a did-you-mean and every accepted value."""
    from plait.errors import ConfigError, closest

    fallback = value.startswith(FALLBACK_PREFIX)
    wanted = value[len(FALLBACK_PREFIX):] if fallback else value
    choices = sorted(names) if fallback else [TOKENIZER_DEFAULT, *sorted(names)]
    close = closest(wanted, choices)
    hint = f"; did you mean {(FALLBACK_PREFIX if fallback else '') + close!r}?" if close else ""
    what = f"{wanted!r} in {value!r} is not a known template" if fallback else f"{value!r} is not a known template"
    return ConfigError(f"{key}: {what}{hint}\naccepted: {TOKENIZER_DEFAULT}, {', '.join(sorted(names))}, "
                       f"{FALLBACK_PREFIX}<one of those names>, or a jinja string (or use chat_template_jinja)")


def template_name(value: str) -> str | None:
    """The template name a ``chat_template`` value asks for (the part after
    ``tokenizer_default_fallback_``, if any), or ``None`` for a jinja string."""
    if "{%" in value or "{{" in value:
        return None
    return value[len(FALLBACK_PREFIX):] if value.startswith(FALLBACK_PREFIX) else value


def lookup_chat_template(pm, value: str | None, tokenizer, *, key: str = "config key 'chat_template'") -> str | None:
    """The jinja a ``chat_template`` value stands for: ``None`` or
    ``tokenizer_default`` -> the tokenizer's own; a name from any plugin's
    ``chat_templates``; ``tokenizer_default_fallback_<name>`` -> the
    tokenizer's own, else that name's (the name is checked either way, so a
    typo never passes silently); a jinja string as it is. ``key`` says where
    the value came from, for the error an unknown name raises."""
    if value is None or value == TOKENIZER_DEFAULT:
        return tokenizer.chat_template
    wanted = template_name(value)
    if wanted is None:
        return value  # jinja
    names = named_chat_templates(pm)
    if wanted not in names:
        raise unknown_template_error(key, value, names)
    fallback = value.startswith(FALLBACK_PREFIX)
    if fallback and tokenizer.chat_template:
        return tokenizer.chat_template
    if fallback:
        import logging

        logging.getLogger("plait.model").warning(
            "%s: the tokenizer has no chat template; using %r", key, wanted)
    return names[wanted]


def check_chat_template_names(cfg) -> None:
    """Fail at validation, before any tokenizer or model work, when the run's or
    a dataset's ``chat_template`` names no known template (jinja passes)."""
    pm = getattr(cfg, "plugin_manager", None)
    entries = [("config key 'chat_template'", cfg.chat_template)]
    for list_key in ("datasets", "test_datasets"):
        for entry in getattr(cfg, list_key, None) or []:
            # a key of chat formats' entries (plait-formats' ChatTemplateEntry); other formats lack it
            value = getattr(entry, "chat_template", None)
            entries.append((f"config key 'chat_template' of dataset {entry.path!r}", value))
    names = None
    for key, value in entries:
        wanted = template_name(value) if value not in (None, TOKENIZER_DEFAULT) else None
        if wanted is None:
            continue
        names = named_chat_templates(pm) if names is None else names
        if wanted not in names:
            raise unknown_template_error(key, value, names)


@hookimpl
def validate_config(cfg):
    check_chat_template_names(cfg)


def resolve_chat_template(cfg, tokenizer) -> str | None:
    """The jinja template ``chat_template``/``chat_template_jinja`` ask for
    (names from every plugin, through :func:`lookup_chat_template`)."""
    if cfg.chat_template_jinja:
        return cfg.chat_template_jinja
    return lookup_chat_template(cfg.plugin_manager, cfg.chat_template, tokenizer)


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
        from plait.model.varlen import register_varlen_attention

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
        from plait.model.recompute import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs)
    return model
