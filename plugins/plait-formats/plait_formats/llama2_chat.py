"""``llama2_chat``: conversations in Llama 2 chat's format.

Rows hold ShareGPT ``conversations`` (``from``: system / human / gpt) or
``messages``; they go through the ``chat_template`` format (the same turn
masking, ``roles_to_train``, ``train_on_eos`` ...) with Meta's Llama 2 chat
layout as the template::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s><s>[INST] {user} [/INST] {answer}</s>

A conversation without a system message gets Llama 2's default system prompt,
as in Axolotl. Axolotl's strategy (built on FastChat's) writes the first
``[/INST]`` without its space and ends with a stray ``<s>``; this follows
Meta's reference layout instead, which is what Llama 2 chat models saw, less
the space Meta puts before each ``</s>``: turn masking trains the answer and
its end marker, and a space between them would be the one token of an answer
the model never learns to produce.
"""

from __future__ import annotations

from plait_formats.entries import ChatTemplateEntry

TYPES = ("llama2_chat",)

LLAMA2_DEFAULT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

LLAMA2_CHAT = (
    "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- set system = messages[0]['content'] if first else " + repr(LLAMA2_DEFAULT_SYSTEM) + " -%}"
    "{%- for message in messages[first:] -%}"
    "{%- if message['role'] not in ['user', 'assistant'] or (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('llama2_chat takes an optional system message first, then human and gpt turns that "
    "alternate, starting with human') }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + ('<<SYS>>\\n' + system | trim + '\\n<</SYS>>\\n\\n' if loop.first else '')"
    " + message['content'] | trim + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] | trim + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    from plait_formats import chat

    as_chat = ChatTemplateEntry.model_validate({
        **dataset_cfg.model_dump(exclude_none=True, exclude={"type"}), "type": "chat_template",
        "chat_template_jinja": LLAMA2_CHAT})
    return chat.tokenize(cfg, as_chat, tokenizer, batch)
