"""``user_defined``: prompt text from the dataset's own format strings.

``format`` (with ``{instruction}`` and ``{input}``) builds the prompt when the
row has an input, ``no_input_format`` (default: ``format``) when it has none;
``system_format`` (with ``{system}``) is put in front when the row has a
system text (``field_system``) or the dataset a ``system_prompt``. Fields come
from ``field_instruction``/``field_input``/``field_output``/``field_system``
(defaults instruction/input/output/system). The prompt is masked unless
``train_on_inputs``; the output and EOS are trained.
"""

from __future__ import annotations

from plait.errors import BadRowError, ConfigError

from plait_formats.common import (encode_prompts, encode_responses, join_prompt_response, text_column,
                                  train_on_inputs)

TYPES = ("user_defined",)


def build_prompt(dataset_cfg, instruction: str, input_text: str | None, system: str | None) -> str:
    """The prompt of one row: ``format`` (or ``no_input_format``) filled in,
    after the system text in ``system_format`` when there is one."""
    template = dataset_cfg.format if input_text else (dataset_cfg.no_input_format or dataset_cfg.format)
    try:
        prompt = template.format(instruction=instruction, input=input_text or "")
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"config key 'format' of dataset {dataset_cfg.path!r}: {template!r} uses {exc}; "
                          f"accepted placeholders: {{instruction}}, {{input}}") from None
    system = system or dataset_cfg.system_prompt
    if system:
        prompt = (dataset_cfg.system_format or "{system}").format(system=system) + prompt
    return prompt


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    if not dataset_cfg.format:
        raise ConfigError(f"dataset {dataset_cfg.path!r} has type user_defined but no 'format' "
                          f"(e.g. format: \"[INST] {{instruction}} {{input}} [/INST] \")")
    instructions = text_column(batch, dataset_cfg.field_instruction or "instruction")
    outputs = text_column(batch, dataset_cfg.field_output or "output")
    inputs = text_column(batch, dataset_cfg.field_input or "input", required=False)
    systems = text_column(batch, dataset_cfg.field_system or "system", required=False)
    prompts = []
    for index, (instruction, input_text, system) in enumerate(zip(instructions, inputs, systems)):
        if system and not isinstance(system, str):
            raise BadRowError(index, f"system text is a {type(system).__name__}, expected text")
        prompts.append(build_prompt(dataset_cfg, instruction, input_text, system))
    return join_prompt_response(encode_prompts(tokenizer, prompts), encode_responses(tokenizer, outputs),
                                train_prompt=train_on_inputs(cfg, dataset_cfg))
