"""Preference dataset types: each turns one raw row into text.

A pair type gives ``(prompt, chosen, rejected)``, a KTO type ``(prompt,
completion, desirable)``, exactly the strings Axolotl's prompt strategies of
the same name hand to TRL; :mod:`plait_preference.rows` tokenizes them.

Types (the part after the dot selects the layout; the same names serve
``rl: kto`` with ``completion`` and ``label`` in place of chosen/rejected):

``chatml.intel``        question, chosen, rejected (system optional)
``chatml.prompt_pairs`` prompt, chosen, rejected (system optional)
``chatml.default``      prompt|input|question|instruction, chosen|chosen_response, rejected|rejected_response
``chatml.ultra``        prompt, chosen/rejected as [user, assistant] message lists
``chatml.argilla_chat`` chosen/rejected as [user, assistant] message lists
``llama3.*``            the same layouts in Llama 3's header format
``chat_template.default`` ``field_messages`` (default ``messages``; ShareGPT's
                        ``conversations`` with from/value works too), ``field_chosen``,
                        ``field_rejected`` as messages, a message or a string,
                        rendered with the run's chat template
``chat_template.argilla`` chosen/rejected as [user, assistant, ...] message lists
                        (prompt, system optional), rendered with the run's chat
                        template: the turns before the last are the prompt
``bradley_terry.chat_template`` (reward models) system (optional), input, chosen,
                        rejected strings, rendered with the run's chat template
``user_defined.default`` Axolotl's custom preference type (also written as a mapping
                        under ``type:``): columns ``field_prompt`` / ``field_system`` /
                        ``field_chosen`` / ``field_rejected`` (default prompt, system,
                        chosen, rejected) put through ``prompt_format`` ("{prompt}", may
                        hold "{system}"), ``chosen_format`` ("{chosen}"), ``rejected_format``
                        ("{rejected}"); for ``rl: kto`` ``field_completion`` /
                        ``field_label`` and ``completion_format`` ("{completion}"). No chat
                        template: the strings are the text, as in Axolotl
"""

from __future__ import annotations

from string import Formatter
from typing import Optional

from pydantic import Field, field_validator

from plait.errors import BadRowError, ConfigError
from plait.registries import DatasetEntry, DatasetFormat

CHATML = {"system": "<|im_start|>system\n{}<|im_end|>\n", "user": "<|im_start|>user\n{}<|im_end|>\n",
          "assistant_start": "<|im_start|>assistant\n", "end": "<|im_end|>"}
LLAMA3 = {"system": "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
          "user": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
          "assistant_start": "<|start_header_id|>assistant<|end_header_id|>\n\n", "end": "<|eot_id|>"}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
LAYOUTS = ("default", "intel", "prompt_pairs", "ultra", "argilla_chat", "argilla")
#: ShareGPT role names -> chat roles
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "function_call": "assistant", "observation": "tool"}

#: every ``type:`` this plugin declares
TYPES = tuple(f"{base}.{layout}" for base in TEMPLATES for layout in LAYOUTS) + (
    "chat_template.default", "chat_template.argilla", "bradley_terry.chat_template", "user_defined.default")


def _field(row: dict, names, what: str, index: int):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise BadRowError(index, f"has no {what} (looked for {', '.join(names)}; row keys: {sorted(row)})")


def _prompt(fmt: dict, row: dict, text: str) -> str:
    system = fmt["system"].format(row["system"]) if row.get("system") else ""
    return system + fmt["user"].format(text) + fmt["assistant_start"]


def _last_content(value, what: str, index: int) -> str:
    """The text of a response given as a string, a message or a message list (its last)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        for key in ("content", "value", "text"):
            if isinstance(value[-1].get(key), str):
                return value[-1][key]
    raise BadRowError(index, f"{what} must be a string, a message or a list of messages, not {type(value).__name__}")


def template_texts(base: str, layout: str, row: dict, index: int, kto: bool):
    """``chatml.*`` / ``llama3.*``: the prompt and the response texts."""
    fmt = TEMPLATES[base]
    responses = ("completion",) if kto else ("chosen", "rejected")
    if layout in ("ultra", "argilla_chat"):
        first = row.get(responses[0])
        if layout == "argilla_chat" or not row.get("prompt"):
            if not isinstance(first, list) or not first:
                raise BadRowError(index, f"{layout}: '{responses[0]}' must be a [user, assistant] message list")
            prompt_text = _last_content(first[:1], "the first message", index)
        else:
            prompt_text = row["prompt"]
        texts = [_last_content(_field(row, (name,), name, index), name, index) for name in responses]
    else:
        prompt_names = {"intel": ("question",), "prompt_pairs": ("prompt",),
                        "argilla": ("instruction", "prompt")}.get(layout, ("prompt", "input", "question", "instruction"))
        prompt_text = _field(row, prompt_names, "prompt", index)
        texts = [_last_content(_field(row, (name, f"{name}_response"), name, index), name, index)
                 for name in responses]
    return _prompt(fmt, row, prompt_text), [text + fmt["end"] for text in texts]


def _messages(value, entry, index: int, what: str) -> list[dict]:
    """Messages with ``role``/``content`` keys (ShareGPT's from/value and role aliases mapped)."""
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    mapping = entry.message_property_mappings or {}
    role_key, content_key = mapping.get("role"), mapping.get("content")
    roles = {alias: target for target, aliases in (entry.roles or {}).items() for alias in aliases}
    out = []
    for message in value or []:
        if not isinstance(message, dict):
            raise BadRowError(index, f"{what} must hold messages (dicts), found {type(message).__name__}")
        role = message.get(role_key or "role", message.get("from"))
        content = message.get(content_key or "content", message.get("value"))
        role = roles.get(role, SHAREGPT_ROLES.get(role, role))
        if role is None or not isinstance(content, str):
            raise BadRowError(index, f"a message of {what} has no role or text content: {message}")
        out.append({"role": role, "content": content})
    if not out:
        raise BadRowError(index, f"{what} is empty")
    return out


def chat_template_texts(entry, row: dict, index: int, tokenizer, kto: bool):
    """``chat_template.default``: render the prompt messages with the generation
    prompt, and each response as the assistant turn that follows (Axolotl's
    way: render it after a placeholder user turn and keep it from its text on)."""
    if entry.type == "bradley_terry.chat_template":  # Axolotl's reward-model rows: system, input, chosen, rejected
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        messages = system + [{"role": "user", "content": _field(row, ("input",), "input", index)}]
    else:
        field_messages = entry.field_messages or ("messages" if "messages" in row or "conversations" not in row
                                                  else "conversations")
        messages = _messages(_field(row, (field_messages,), f"'{field_messages}'", index), entry, index, "prompt")
    if kto:
        if messages[-1]["role"] != "assistant" and "completion" not in row:
            raise BadRowError(index, "KTO rows need the completion as the last (assistant) message or a "
                                     "'completion' field")
        responses = [row["completion"]] if "completion" in row else [messages.pop()]
    else:
        responses = [_field(row, (entry.field_chosen or "chosen",), "chosen response", index),
                     _field(row, (entry.field_rejected or "rejected",), "rejected response", index)]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    texts = []
    for value in responses:
        reply = _messages(value, entry, index, "the response")[-1]
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "[[dummy_message]]"}, reply],
                                                 tokenize=False)
        start = rendered.find(reply["content"])
        texts.append(rendered[start:].rstrip() if start >= 0 else reply["content"])
    return prompt, texts


def argilla_chat_texts(row: dict, index: int, tokenizer, kto: bool):
    """``chat_template.argilla``: ``chosen`` and ``rejected`` are conversations
    of user/assistant pairs that differ in the last answer. As Axolotl builds
    them, the prompt is the optional system text and every turn but the last
    assistant answer, taken from ``chosen`` (each user turn is the row's
    ``prompt`` when it has one), rendered with the generation prompt. Each
    response is the full conversation rendered with the run's chat template,
    minus the prompt's text."""
    if kto:
        raise BadRowError(index, "chat_template.argilla holds chosen/rejected pairs; rl: kto needs a completion "
                                 "type such as chat_template.default")
    pairs = {}
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if not (isinstance(value, list) and value and len(value) % 2 == 0
                and all(isinstance(m, dict) for m in value)):
            raise BadRowError(index, f"chat_template.argilla: '{name}' must be a list of [user, assistant] "
                                     f"message pairs (found {type(value).__name__})")
        pairs[name] = [_last_content([m], f"a message of {name}", index) for m in value]
    chosen = pairs["chosen"]
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    turns = len(chosen) // 2
    for turn in range(turns):
        messages.append({"role": "user", "content": row["prompt"] if "prompt" in row else chosen[2 * turn]})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": chosen[2 * turn + 1]})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    texts = []
    for name in ("chosen", "rejected"):
        whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": pairs[name][-1]}],
                                              tokenize=False)
        if not whole.startswith(prompt):
            raise BadRowError(index, "the chat template renders the conversation with a different beginning than "
                                     "the prompt alone, so the response cannot be cut from it")
        texts.append(whole[len(prompt):])
    return prompt, texts


def user_defined_texts(entry, row: dict, index: int, kto: bool):
    """``user_defined.default``: the prompt and response strings from the
    entry's field names and format strings (Axolotl's meaning: a prompt format
    with ``{system}`` gets the row's system text, empty when it has none; for
    KTO only when the row has one, else the format is filled with the prompt
    alone and must then not need ``{system}``)."""
    prompt_format = entry.prompt_format or "{prompt}"
    prompt = _field(row, (entry.field_prompt or "prompt",), "prompt", index)
    system = row.get(entry.field_system or "system")
    try:
        if "{system}" in prompt_format and (system or not kto):
            prompt_text = prompt_format.format(system=system or "", prompt=prompt)
        else:
            prompt_text = prompt_format.format(prompt=prompt)
    except KeyError:
        raise BadRowError(index, f"prompt_format {prompt_format!r} needs a system text and the row has none in "
                                 f"{entry.field_system or 'system'!r}") from None
    if kto:
        completion = _field(row, (entry.field_completion or "completion",), "completion", index)
        return prompt_text, [(entry.completion_format or "{completion}").format(completion=completion)]
    chosen = _field(row, (entry.field_chosen or "chosen",), "chosen response", index)
    rejected = _field(row, (entry.field_rejected or "rejected",), "rejected response", index)
    return prompt_text, [(entry.chosen_format or "{chosen}").format(chosen=chosen),
                         (entry.rejected_format or "{rejected}").format(rejected=rejected)]


def row_texts(entry, row: dict, index: int, tokenizer, kto: bool):
    """``(prompt, [responses])`` of one raw row for the entry's ``type:``."""
    if entry.type == "user_defined.default":
        return user_defined_texts(entry, row, index, kto)
    if entry.type == "chat_template.argilla":
        return argilla_chat_texts(row, index, tokenizer, kto)
    base, _, layout = (entry.type or "").partition(".")
    if base in ("chat_template", "bradley_terry"):
        return chat_template_texts(entry, row, index, tokenizer, kto)
    return template_texts(base, layout or "default", row, index, kto)


# ---------------------------------------------------------------- registry


class PreferenceEntry(DatasetEntry):
    """Keys of the preference types (the message mappings serve chat_template.default)."""

    field_messages: Optional[str] = Field(None, description="Column holding the prompt messages (default: messages, "
                                          "or conversations when there is no messages column).")
    field_chosen: Optional[str] = Field(None, description="Column holding the chosen response (default: chosen).")
    field_rejected: Optional[str] = Field(None, description="Column holding the rejected response (default: rejected).")
    message_property_mappings: Optional[dict[str, str]] = Field(
        None, description="Message keys to read as role/content: {role: from, content: value}.")
    roles: Optional[dict[str, list[str]]] = Field(None, description="Role names mapped to user/assistant/system.")


#: format key -> the placeholders its string may use
FORMAT_FIELDS = {"prompt_format": {"prompt", "system"}, "chosen_format": {"chosen"}, "rejected_format": {"rejected"},
                 "completion_format": {"completion"}}


class UserDefinedPreferenceEntry(PreferenceEntry):
    """Keys of ``user_defined.default``: Axolotl's custom preference type."""

    field_prompt: Optional[str] = Field(None, description="Column holding the prompt (default: prompt).")
    field_system: Optional[str] = Field(None, description="Column holding the system text (default: system).")
    field_completion: Optional[str] = Field(None, description="KTO: column holding the completion (default: "
                                            "completion).")
    field_label: Optional[str] = Field(None, description="KTO: column holding the desirable flag (default: label).")
    prompt_format: Optional[str] = Field(None, description="The prompt text, from {prompt} and optionally {system} "
                                         "(default: {prompt}).")
    chosen_format: Optional[str] = Field(None, description="The chosen response's text, from {chosen}.")
    rejected_format: Optional[str] = Field(None, description="The rejected response's text, from {rejected}.")
    completion_format: Optional[str] = Field(None, description="KTO: the completion's text, from {completion}.")

    @field_validator(*FORMAT_FIELDS)
    @classmethod
    def _placeholders(cls, value, info):
        # a placeholder the row cannot fill would fail on the first row; say so at validation
        if value is None:
            return value
        allowed = FORMAT_FIELDS[info.field_name]
        try:
            used = {name for _, name, _, _ in Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a format string: {exc}") from None
        unknown = sorted(used - allowed)
        if unknown:
            raise ValueError(f"{value!r} uses {', '.join('{' + n + '}' for n in unknown)}; accepted placeholders: "
                             f"{', '.join('{' + n + '}' for n in sorted(allowed))}")
        return value


def _tokenize(cfg, dataset_cfg, tokenizer, batch):
    from plait_preference.rows import tokenize_kto, tokenize_pairs

    if cfg.rl == "kto":
        return tokenize_kto(dataset_cfg, tokenizer, batch, group=cfg.micro_batch_size)
    return tokenize_pairs(dataset_cfg, tokenizer, batch)


def _cache_inputs(cfg) -> dict:
    """What shapes the rows beyond the entry: ``rl`` (pairs or KTO rows), and for
    KTO ``micro_batch_size``, the size of the groups a row's KL sequence is drawn
    from: rows prepared for another size must not be reused (one process with 4
    rows a micro-batch, then two with 2 each)."""
    rl = getattr(cfg, "rl", None)
    return {"rl": rl, "kl_group": cfg.micro_batch_size if rl == "kto" else None}


def _check_layout(type_value: str, where: str) -> None:
    if type_value not in TYPES:
        base = type_value.partition(".")[0]
        accepted = ", ".join(t for t in TYPES if t.startswith(base + "."))
        raise ConfigError(f"{where}: {type_value!r} is not accepted\naccepted: {accepted}")


def registered_formats() -> list:
    """``chatml``, ``llama3`` (with their layouts as variants), ``chat_template.default``,
    ``chat_template.argilla`` and ``user_defined.default`` (full dotted names: plait-formats' ``chat_template``
    and ``user_defined`` have no variants) and ``bradley_terry.chat_template``."""
    described = {"chatml": "preference pairs (or KTO rows) in ChatML", "llama3": "preference pairs in Llama 3's format",
                 "chat_template.default": "preference pairs rendered with the chat template",
                 "chat_template.argilla": "preference pairs as chosen/rejected conversations (Argilla's layout), "
                                          "rendered with the chat template",
                 "bradley_terry": "reward-model pairs (system, input, chosen, rejected)"}
    return [DatasetFormat(name, _tokenize, PreferenceEntry, check_type=_check_layout, description=text,
                          cache_inputs=_cache_inputs)
            for name, text in described.items()] + [
        DatasetFormat("user_defined.default", _tokenize, UserDefinedPreferenceEntry, check_type=_check_layout,
                      description="preference pairs (or KTO rows) from format strings written in the config",
                      cache_inputs=_cache_inputs)]
