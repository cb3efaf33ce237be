"""The dataset-entry keys of each format: subclasses of core's
:class:`plait.registries.DatasetEntry` (the source keys: path, split, ...).

A ``datasets:`` entry validates against the model of its ``type``, so
``plait config schema`` lists each format's keys and a key of another format
is refused with that format's name. To give a format a new key, add a field to
its model here (with a description: it is the key's documentation).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, create_model

from plait.registries import DatasetEntry

EosMode = Optional[Literal["all", "turn", "last", "none"]]


class InstructionEntry(DatasetEntry):
    """Keys of the instruction formats (alpaca and its variants)."""

    field_instruction: Optional[str] = Field(None, description="Column holding the instruction.")
    field_input: Optional[str] = Field(None, description="Column holding the optional input.")
    field_output: Optional[str] = Field(None, description="Column holding the response (trained).")
    field_system: Optional[str] = Field(None, description="Column holding a per-row system prompt.")
    system_prompt: Optional[str] = Field(None, description="System prompt for rows without one.")


class UserDefinedEntry(InstructionEntry):
    """``type: user_defined``: the prompt format is written in the config."""

    format: Optional[str] = Field(None, description="Prompt format with {instruction} and {input}.")
    no_input_format: Optional[str] = Field(None, description="Prompt format for rows without input.")
    system_format: Optional[str] = Field(None, description="Format of the system prompt, with {system}.")


class ChatTemplateEntry(DatasetEntry):
    """``type: chat_template``: conversations rendered with a chat template."""

    chat_template: Optional[str] = Field(None, description="Template for this dataset (default: the run's).")
    chat_template_jinja: Optional[str] = Field(None, description="Jinja template for this dataset.")
    field_messages: Optional[str] = Field(None, description="Column holding the conversation (messages, "
                                          "conversations).")
    field_tools: Optional[str] = Field(None, description="Column holding the tool definitions (default: tools).")
    message_field_role: Optional[str] = Field(None, description="Message key holding the role.")
    message_field_content: Optional[str] = Field(None, description="Message key holding the text.")
    message_field_training: Optional[str] = Field(None, description="Message key saying whether to train on it.")
    message_property_mappings: Optional[dict[str, str]] = Field(
        None, description="Message keys to read as role/content: {role: from, content: value}.")
    roles: Optional[dict[str, list[str]]] = Field(None, description="Role names mapped to user/assistant/system.")
    roles_to_train: Optional[list[str]] = Field(None, description="Roles whose turns are trained (default: assistant).")
    train_on_eos: EosMode = Field(None, description="Which EOS tokens are trained: all, turn (default), last, none.")
    train_on_eot: EosMode = Field(None, description="Which end-of-turn tokens are trained (default: train_on_eos).")
    drop_system_message: Optional[bool] = Field(None, description="Drop system messages before rendering.")
    message_field_training_detail: Optional[str] = Field(
        None, description="Message key holding [{begin_offset, end_offset, train}] character ranges of the "
                          "content (end inclusive): only tokens inside a train: true range are trained.")
    field_thinking: Optional[str] = Field(
        None, description="Message key holding the reasoning trace (default: reasoning_content); it is trained "
                          "with the answer.")
    template_thinking_key: Optional[str] = Field(
        None, description="The key the chat template reads the reasoning from (default: reasoning_content; "
                          "e.g. thinking for gpt-oss).")
    split_thinking: Optional[bool] = Field(
        None, description="Move a <think>...</think> block at the start of an assistant's content into the "
                          "reasoning key (for templates that render reasoning themselves, like Qwen 3's).")


class TextEntry(DatasetEntry):
    """``type: completion`` / ``pretraining``: raw text, every token trained."""

    text_column: Optional[str] = Field(None, description="Column holding the text (also: field; default: text).")



#: the chat_template message keys that ``type: llama2_chat`` reads (its template is fixed)
LLAMA2_CHAT_KEYS = ("field_messages", "message_field_role", "message_field_content", "message_field_training",
                    "message_property_mappings", "roles", "roles_to_train", "train_on_eos", "train_on_eot",
                    "drop_system_message")
#: ``type: llama2_chat``: conversations in Llama 2 chat's fixed layout, with chat_template's message keys
Llama2ChatEntry = create_model(
    "Llama2ChatEntry", __base__=DatasetEntry, __doc__="``type: llama2_chat``: conversations in Llama 2 chat's layout.",
    **{name: (ChatTemplateEntry.model_fields[name].annotation, ChatTemplateEntry.model_fields[name])
       for name in LLAMA2_CHAT_KEYS})
