"""Named chat templates: core's, every plugin's (the ``chat_templates`` hook),
and what a ``chat_template`` value stands for. Part of the published plugin
API: a format plugin resolves a dataset's ``chat_template`` with
:func:`lookup_chat_template`."""

from __future__ import annotations

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
#: Axolotl's ``chat_template: jinja``: the template is the text of ``chat_template_jinja``
JINJA_CHOICE = "jinja"



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
    if value == JINJA_CHOICE:
        raise jinja_missing_error(key)
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


def jinja_missing_error(key: str):
    """The :class:`ConfigError` for ``chat_template: jinja`` without the template text."""
    from plait.errors import ConfigError

    return ConfigError(f"{key}: 'jinja' means the template is given in chat_template_jinja, which is not set; "
                       f"set chat_template_jinja to the jinja text, or name a template")


def check_chat_template_names(cfg) -> None:
    """Fail at validation, before any tokenizer or model work, when the run's or
    a dataset's ``chat_template`` names no known template (jinja passes)."""
    pm = getattr(cfg, "plugin_manager", None)
    entries = [("config key 'chat_template'", cfg.chat_template, cfg.chat_template_jinja)]
    for list_key in ("datasets", "test_datasets"):
        for entry in getattr(cfg, list_key, None) or []:
            # a key of chat formats' entries (plait-formats' ChatTemplateEntry); other formats lack it
            value = getattr(entry, "chat_template", None)
            jinja = getattr(entry, "chat_template_jinja", None) or cfg.chat_template_jinja
            entries.append((f"config key 'chat_template' of dataset {entry.path!r}", value, jinja))
    names = None
    for key, value, jinja in entries:
        if value == JINJA_CHOICE:
            if not jinja:
                raise jinja_missing_error(key)
            continue
        wanted = template_name(value) if value not in (None, TOKENIZER_DEFAULT) else None
        if wanted is None:
            continue
        names = named_chat_templates(pm) if names is None else names
        if wanted not in names:
            raise unknown_template_error(key, value, names)


def resolve_chat_template(cfg, tokenizer) -> str | None:
    """The jinja template ``chat_template``/``chat_template_jinja`` ask for
    (names from every plugin, through :func:`lookup_chat_template`)."""
    if cfg.chat_template_jinja:
        return cfg.chat_template_jinja
    return lookup_chat_template(cfg.plugin_manager, cfg.chat_template, tokenizer)
