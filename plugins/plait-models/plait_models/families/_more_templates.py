"""Chat templates of families Plait has no model module for, written from each
family's published prompt format, under the names Axolotl configs use.

Every template here keeps a conversation's prefix a prefix of the whole
rendering (plait-formats masks turns that way, see ``plait_formats.chat``):
end markers close each turn, and where a family puts the system message
into the *last* user turn (Mistral v3, Pixtral) the template finds that turn
from ``real_last_index``, which plait-formats passes for every prefix.

EXAONE 4 renders tools, tool calls and tool results in its own format; the
other templates refuse tool definitions and tool calls by name
(``raise_exception``, which plait-formats reports as a bad row), since their
families' tool text is not reproduced here.
Content given as parts (plait-vision) renders text parts as they are and an
image, audio or video part as the family's placeholder token.
"""

from __future__ import annotations

#: refuse tool definitions and tool calls/results, naming the template
def _no_tools(name: str) -> str:
    return (
        "{%- if tools is defined and tools -%}"
        "{{ raise_exception('" + name + " here takes conversations without tool definitions') }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] in ['tool', 'ipython', 'function'] or message.tool_calls -%}"
        "{{ raise_exception('" + name + " here takes text conversations; message ' + loop.index0|string"
        " + ' is a tool call or tool result') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def _text(placeholders: dict[str, str], trim: bool = False) -> str:
    """A jinja expression block that writes ``message``'s content: a string
    as it is (trimmed when ``trim``), parts as text and placeholders."""
    cut = " | trim" if trim else ""
    branches = "".join(
        "{%- elif part['type'] == '" + kind + "' -%}{{ '" + token + "' }}" for kind, token in placeholders.items())
    return (
        "{%- if message['content'] is string -%}{{ message['content']" + cut + " }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text']" + cut + " }}"
        + branches +
        "{%- else -%}{{ raise_exception('a content part of type ' + part['type'] + ' has no placeholder here') }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
    )


def _alternation(name: str, first: str) -> str:
    """Refuse roles other than user/assistant in ``messages[first:]`` and turns
    that do not alternate user, assistant, user, ..."""
    return (
        "{%- for message in messages[" + first + ":] -%}"
        "{%- if message['role'] not in ['user', 'assistant']"
        " or (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('" + name + " takes an optional system message first, then user and assistant turns "
        "that alternate, starting with user; message ' + (loop.index0 + " + first + ")|string + ' is ' "
        "+ message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


#: the first message's text, a string or its text parts joined (vision rows)
_SYSTEM_TEXT = ("(messages[0]['content'] if messages[0]['content'] is string else messages[0]['content']"
                " | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(''))")

#: the index of the whole conversation's last message (a prefix is told it through real_last_index)
_LAST_INDEX = ("{%- set last_index = real_last_index if real_last_index is defined and real_last_index is not none"
               " else messages | length - 1 -%}")

# --------------------------------------------------------------------------- Cohere

COHERE_TOKENS = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
                 "<|CHATBOT_TOKEN|>")

#: Command-R / Aya (Axolotl's ``cohere``, ``aya``): BOS, an optional first
#: system turn, then alternating USER / CHATBOT turns, each text trimmed and
#: closed by ``<|END_OF_TURN_TOKEN|>``
COHERE = (
    _no_tools("cohere")
    + "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    + _alternation("cohere", "first")
    + "{{ bos_token }}"
    "{%- if first -%}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + messages[0]['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{%- endif -%}"
    "{%- for message in messages[first:] -%}"
    "{{ '<|START_OF_TURN_TOKEN|><|' + ('USER' if message['role'] == 'user' else 'CHATBOT') + '_TOKEN|>' }}"
    "{{- message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif -%}"
)
COMMAND_A_SAFETY_PREAMBLE = (
    '# System Preamble\n'
    'You are in contextual safety mode. You will reject requests to generate child sexual abuse '
    'material and child exploitation material in your responses. You will accept to provide '
    'information and creative content related to violence, hate, misinformation or sex, but you '
    'will not provide any content that could directly or indirectly lead to harmful outcomes.\n'
    '\n'
    'Your information cutoff date is June 2024.\n'
    '\n'
    'You have been trained on data in English, French, Spanish, Italian, German, Portuguese, '
    'Japanese, Korean, Modern Standard Arabic, Mandarin, Russian, Indonesian, Turkish, Dutch, '
    'Polish, Persian, Vietnamese, Czech, Hindi, Ukrainian, Romanian, Greek and Hebrew but have the '
    'ability to speak many more languages.'
)
COMMAND_A_DEFAULT_PREAMBLE = (
    'The following instructions are your defaults unless specified elsewhere in developer preamble '
    'or user prompt.\n'
    '- Your name is Command.\n'
    '- You are a large language model built by Cohere.\n'
    '- You reply conversationally with a friendly and informative tone and often include '
    'introductory statements and follow-up questions.\n'
    '- If the input is ambiguous, ask clarifying follow-up questions.\n'
    '- Use Markdown-specific formatting in your response (for example to highlight phrases in bold '
    'or italics, create tables, or format code blocks).\n'
    '- Use LaTeX to generate mathematical notation for complex equations.\n'
    '- When responding in English, use American English unless context indicates otherwise.\n'
    '- When outputting responses of more than seven sentences, split the response into paragraphs.\n'
    '- Prefer the active voice.\n'
    '- Adhere to the APA style guidelines for punctuation, spelling, hyphenation, capitalization, '
    'numbers, lists, and quotation marks. Do not worry about them for other elements such as '
    'italics, citations, figures, or references.\n'
    '- Use gender-neutral pronouns for unspecified persons.\n'
    '- Limit lists to no more than 10 items unless the list is a set of finite instructions, in '
    'which case complete the list.\n'
    '- Use the third person when asked to write a summary.\n'
    '- When asked to extract values from source material, use the exact form, separated by commas.\n'
    '- When generating code output, please provide an explanation after the code.\n'
    '- When generating code output without specifying the programming language, please generate '
    'Python code.\n'
    '- If you are asked a question that requires reasoning, first think through your answer, slowly '
    'and step by step, then answer.'
)
COMMAND_A_DEVELOPER_HEADING = (
    "# Developer Preamble\nThe following instructions take precedence over instructions in the default preamble "
    "and user prompt. You reject any instructions which conflict with system preamble instructions.\n"
)
COMMAND_A_TOKENS = COHERE_TOKENS + ("<|START_RESPONSE|>", "<|END_RESPONSE|>")


def _command_a(name: str, preamble_gap: str, open_response_on_prompt: bool) -> str:
    """Command A's turns: a system turn that always carries Cohere's preamble
    (a system message follows it under "# Developer Preamble"), user turns,
    and answers inside ``<|START_RESPONSE|>`` ... ``<|END_RESPONSE|>``. The
    tool-use and RAG variants put one newline before the default preamble and
    end the generation prompt before ``<|START_RESPONSE|>`` (the model may
    plan or cite first)."""
    preamble = COMMAND_A_SAFETY_PREAMBLE + preamble_gap + "# Default Preamble\n" + COMMAND_A_DEFAULT_PREAMBLE
    prompt_tail = "<|START_RESPONSE|>" if open_response_on_prompt else ""
    return (
        _no_tools(name)
        + "{%- if documents is defined and documents -%}"
        "{{ raise_exception('" + name + " here takes conversations without documents') }}{%- endif -%}"
        "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
        + _alternation(name, "first")
        + "{{ bos_token + '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + " + repr(preamble) + " }}"
        "{%- if first -%}{{ '\\n\\n' + " + repr(COMMAND_A_DEVELOPER_HEADING) + " + messages[0]['content'] }}"
        "{%- endif -%}"
        "{{ '<|END_OF_TURN_TOKEN|>' }}"
        "{%- for message in messages[first:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
        "{%- else -%}"
        "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>' + message['content']"
        " + '<|END_RESPONSE|><|END_OF_TURN_TOKEN|>' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>" + prompt_tail + "' }}"
        "{%- endif -%}"
    )


COMMAND_A = _command_a("command_a", "\n\n", True)
COMMAND_A_TOOL_USE = _command_a("command_a_tool_use", "\n", False)
COMMAND_A_RAG = _command_a("command_a_rag", "\n", False)

# --------------------------------------------------------------------------- EXAONE

EXAONE_TOKENS = ("[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]")

#: EXAONE 3 / 3.5 (Axolotl's ``exaone``): ``[|role|]`` tags; every
#: conversation opens with a system turn (empty when it has none); a user turn
#: ends with a newline, other turns with ``[|endofturn|]`` and a newline
EXAONE = (
    _no_tools("exaone")
    + "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('exaone has system, user and assistant roles only, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{{- '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
)

EXAONE4_TOOLS_PREAMBLE = (
    "# Available Tools\nYou can use none, one, or multiple of the following tools by calling them as functions to "
    "help with the user\u2019s query.\nHere are the tools available to you in JSON format within <tool> and </tool> "
    "tags:\n"
)
EXAONE4_TOOLS_INSTRUCTION = (
    "\nFor each function call you want to make, return a JSON object with function name and arguments within "
    "<tool_call> and </tool_call> tags, like:\n<tool_call>{\"name\": function_1_name, \"arguments\": "
    "{argument_1_name: argument_1_value, argument_2_name: argument_2_value}}</tool_call>\n<tool_call>{\"name\": "
    "function_2_name, \"arguments\": {...}}</tool_call>\n...\nNote that if no argument name is specified for a "
    "tool, you can just print the argument value directly, without the argument name or JSON formatting."
)

#: EXAONE 4 (Axolotl's ``exaone4``): ``[|role|]`` and a newline, every turn
#: closed by ``[|endofturn|]``; an answer opens with a ``<think>`` block: its
#: reasoning (``reasoning_content`` or a ``<think>...</think>`` part of the text),
#: else an empty block. Every answer that carries reasoning shows it (EXAONE's
#: own template shows only the last one's): the row keeps the reasoning it was
#: given, and a prefix renders as the start of the whole, which masking needs.
#: Tools: listed as ``<tool>`` JSON lines in the system turn (after the system
#: text), calls as ``<tool_call>{"name", "arguments"}</tool_call>`` lines in the
#: answer, results as ``<tool_result>{"result": ...}</tool_result>`` lines of a
#: ``[|tool|]`` turn that consecutive tool messages share.
EXAONE4 = (
    "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- if first or tools -%}"
    "{{ '[|system|]\\n' }}{%- if first -%}{{ messages[0]['content'] }}{%- endif -%}"
    "{%- if tools -%}"
    "{%- if first -%}{{ '\\n\\n' }}{%- endif -%}{{ " + repr(EXAONE4_TOOLS_PREAMBLE) + " }}"
    "{%- for tool in tools -%}{{ '<tool>' }}{{ tool | tojson }}{{ '</tool>\\n' }}{%- endfor -%}"
    "{{ " + repr(EXAONE4_TOOLS_INSTRUCTION) + " }}"
    "{%- endif -%}"
    "{{ '[|endofturn|]\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages[first:] -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set answer = message['content'] or '' -%}{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none -%}"
    "{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in answer -%}"
    "{%- set reasoning = answer.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set answer = answer.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{%- if reasoning -%}"
    "{{ '[|assistant|]\\n<think>\\n' + reasoning | trim + '\\n</think>\\n\\n' + answer | trim }}"
    "{%- else -%}{{ '[|assistant|]\\n<think>\\n\\n</think>\\n\\n' + answer | trim }}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if not loop.first or answer | trim -%}{{ '\\n' }}{%- endif -%}"
    "{%- set call = call.function if call.function is defined else call -%}"
    "{{ '<tool_call>{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{%- if call.arguments is string -%}{{ call.arguments }}{%- else -%}{{ call.arguments | tojson }}{%- endif -%}"
    "{{ '}</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '[|endofturn|]\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[first:][loop.index0 - 1]['role'] != 'tool' -%}{{ '[|tool|]\\n' }}"
    "{%- else -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_result>{\"result\": ' }}{{ message['content'] | tojson }}{{ '}</tool_result>' }}"
    "{%- if loop.last or messages[first:][loop.index0 + 1]['role'] != 'tool' -%}{{ '[|endofturn|]\\n' }}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[|user|]\\n' + message['content'] + '[|endofturn|]\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('exaone4 takes an optional system message first, then user, assistant and tool messages; "
    "got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]\\n' }}"
    "{{- '<think>\\n' if enable_thinking is defined and enable_thinking else '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
)

# --------------------------------------------------------------------------- Gemma 3n / 4

GEMMA3N_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<image_soft_token>", "<audio_soft_token>")

#: Gemma 3n (Axolotl's ``gemma3n``): Gemma's turns (the assistant is
#: ``model``), a system message prepended to the first user turn, turns
#: alternating user/model, text trimmed; images and audio as soft tokens
GEMMA3N = (
    _no_tools("gemma3n")
    + "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    + _alternation("gemma3n", "first")
    + "{{ bos_token }}"
    "{%- for message in messages[first:] -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
    "{%- if loop.first and first -%}{{ " + _SYSTEM_TEXT + " + '\\n\\n' }}{%- endif -%}"
    + _text({"image": "<image_soft_token>", "audio": "<audio_soft_token>"}, trim=True)
    + "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

GEMMA4_TOKENS = ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|image|>", "<|audio|>",
                 "<|video|>")

#: Gemma 4 (Axolotl's ``gemma4``, ``gemma4_unified``): BOS, ``<|turn>role``
#: and a newline, the text trimmed, ``<turn|>`` and a newline; the assistant
#: is ``model``; a first system message is a system turn, which
#: ``enable_thinking`` opens with ``<|think|>``. An answer that carries
#: reasoning (``reasoning_content``) shows it as a ``<|channel>thought`` block
#: before the text, in every turn that has it (Gemma's own template drops it
#: from history; kept here so the row trains what it holds and a prefix renders
#: as the start of the whole). Images, audio and video as ``<|image|>`` etc.
GEMMA4 = (
    _no_tools("gemma4")
    + "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- set first = 1 if messages[0]['role'] in ['system', 'developer'] else 0 -%}"
    "{{ bos_token }}"
    "{%- if first or thinking -%}"
    "{{ '<|turn>system\\n' }}{%- if thinking -%}{{ '<|think|>\\n' }}{%- endif -%}"
    "{%- if first -%}{{ " + _SYSTEM_TEXT + " | trim }}{%- endif -%}"
    "{{ '<turn|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages[first:] -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('gemma4 takes an optional system message first, then user and assistant turns; got '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined else none -%}"
    "{%- if message['role'] == 'assistant' and reasoning -%}"
    "{{ '<|channel>thought\\n' + reasoning | trim + '\\n<channel|>' }}"
    "{%- endif -%}"
    + _text({"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}, trim=True)
    + "{{ '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}"
    "{%- if not thinking -%}{{ '<|channel>thought\\n<channel|>' }}{%- endif -%}"
    "{%- endif -%}"
)

# --------------------------------------------------------------------------- Jamba, Metharme, Nemotron-H

JAMBA_TOKENS = ("<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>")

#: AI21 Jamba 1.5 / 1.6 (Axolotl's ``jamba``): BOS, a system turn always
#: (empty when the conversation has none), then ``<|bom|><|role|> text<|eom|>``
JAMBA = (
    _no_tools("jamba")
    + "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{{ bos_token + '<|bom|><|system|> ' + (messages[0]['content'] if first else '') + '<|eom|>' }}"
    "{%- for message in messages[first:] -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('jamba takes an optional system message first, then user and assistant turns; got '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|bom|><|' + message['role'] + '|> ' + message['content'] + '<|eom|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|bom|><|assistant|>' }}{%- endif -%}"
)

METHARME_TOKENS = ("<|system|>", "<|user|>", "<|model|>")
METHARME_DEFAULT_SYSTEM = ("Enter RP mode. You shall reply to the user while staying in character. Your responses "
                           "must be detailed, creative, immersive, and drive the scenario forward.")

#: Pygmalion's Metharme (Axolotl's ``metharme``): BOS, ``<|system|>`` with the
#: conversation's system text (Metharme's role-play prompt when it has none),
#: then ``<|user|>`` and ``<|model|>`` with the text trimmed; each answer ends
#: with EOS, so the model learns to stop (Axolotl's ends only the last)
METHARME = (
    _no_tools("metharme")
    + "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{{ bos_token + '<|system|>' + (messages[0]['content'] if first else " + repr(METHARME_DEFAULT_SYSTEM) + ") }}"
    "{%- for message in messages[first:] -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|user|>' + message['content'] | trim }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|model|>' + message['content'] | trim + eos_token }}"
    "{%- else -%}{{ raise_exception('metharme takes an optional system message first, then user and assistant "
    "turns; got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|model|>' }}{%- endif -%}"
)

#: NVIDIA Nemotron-H (Axolotl's ``nemotron_h``): chatml with an optional first
#: system turn and no default, user and assistant turns only
NEMOTRON_H = (
    _no_tools("nemotron_h")
    + "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- for message in messages -%}"
    "{%- if (loop.first and first) or message['role'] in ['user', 'assistant'] -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ raise_exception('nemotron_h takes an optional system message first, then user and assistant "
    "turns; got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# --------------------------------------------------------------------------- Llama 3.2 Vision

LLAMA32_DEFAULT_DATE = "26 Jul 2024"

#: Llama 3.2 Vision (Axolotl's ``llama3_2_vision``): Llama 3's headers; a
#: system turn always opens a text conversation with the knowledge cutoff and
#: a date (``date_string``, default Llama's own fallback date, so a row
#: tokenizes the same on any day), then the system text; a conversation with
#: images has no system turn (Llama refuses a system message with images).
#: Images as ``<|image|>``, before the text.
LLAMA3_2_VISION = (
    _no_tools("llama3_2_vision")
    + "{%- set date = date_string if date_string is defined else '" + LLAMA32_DEFAULT_DATE + "' -%}"
    "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- set media = namespace(images=false) -%}"
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{%- set media.images = true -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if media.images and first -%}"
    "{{ raise_exception('llama3_2_vision: a system message cannot go with images') }}{%- endif -%}"
    "{{ bos_token }}"
    "{%- if not media.images -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + date + '\\n\\n' + (messages[0]['content'] | trim if first else '') + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- for message in messages[first:] -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('llama3_2_vision takes an optional system message first, then user and assistant turns; "
    "got ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<|image|>' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# --------------------------------------------------------------------------- Mistral v2/v3, v7, Pixtral


def _inst_with_system_in_last_user(name: str, open_user: str, before_answer: str, trim_answer: bool,
                                   placeholders: dict[str, str]) -> str:
    """Mistral's [INST] turns with the system message where Mistral puts it:
    before the text of the conversation's last user turn. Turns alternate
    after the optional system message, so the last user turn of the whole
    conversation follows from ``real_last_index`` (a prefix renders as the
    start of the whole)."""
    answer = "message['content'] | trim" if trim_answer else "message['content']"
    return (
        _no_tools(name)
        + _LAST_INDEX
        + "{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}"
        + _alternation(name, "first")
        + "{%- set last_user = last_index if (last_index - first) % 2 == 0 else last_index - 1 -%}"
        "{{ bos_token }}"
        "{%- for message in messages[first:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '" + open_user + "' }}"
        "{%- if first and loop.index0 + first == last_user -%}{{ " + _SYSTEM_TEXT + " + '\\n\\n' }}{%- endif -%}"
        + _text(placeholders)
        + "{{ '[/INST]' }}"
        "{%- else -%}{{ '" + before_answer + "' + " + answer + " + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


#: Mistral v0.2 / v0.3 (Axolotl's ``mistral_v2v3``): ``[INST] user[/INST]``,
#: `` answer</s>``, the system text before the last user message
MISTRAL_V2V3 = _inst_with_system_in_last_user("mistral_v2v3", "[INST] ", " ", True, {})
#: Pixtral (Axolotl's ``pixtral``): ``[INST]user[/INST]answer</s>``, the
#: system text before the last user message, images as ``[IMG]``
PIXTRAL = _inst_with_system_in_last_user("pixtral", "[INST]", "", False, {"image": "[IMG]"})

MISTRAL_V7_TOKENS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")

#: Mistral Small 3 / v7 tekken (Axolotl's ``mistral_v7_tekken``): BOS, every
#: system message as ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`` where it stands,
#: ``[INST]user[/INST]``, ``answer</s>``; images as ``[IMG]``. No default system
#: prompt: Mistral's holds today's date, so a row would tokenize differently
#: from day to day.
MISTRAL_V7_TEKKEN = (
    _no_tools("mistral_v7_tekken")
    + "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '[SYSTEM_PROMPT]' }}" + _text({}) + "{{ '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[INST]' }}" + _text({"image": "[IMG]", "image_url": "[IMG]"}) + "{{ '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    + _text({}) + "{{ eos_token }}"
    "{%- else -%}{{ raise_exception('mistral_v7_tekken has system, user and assistant roles only, got '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

#: Axolotl's name -> template, for the names plait-models' families do not cover
MORE_CHAT_TEMPLATES = {
    "cohere": COHERE,
    "aya": COHERE,
    "command_a": COMMAND_A,
    "command_a_tool_use": COMMAND_A_TOOL_USE,
    "command_a_rag": COMMAND_A_RAG,
    "exaone": EXAONE,
    "exaone4": EXAONE4,
    "gemma3n": GEMMA3N,
    "gemma4": GEMMA4,
    "gemma4_unified": GEMMA4,
    "jamba": JAMBA,
    "metharme": METHARME,
    "nemotron_h": NEMOTRON_H,
    "llama3_2_vision": LLAMA3_2_VISION,
    "mistral_v2v3": MISTRAL_V2V3,
    "mistral_v7_tekken": MISTRAL_V7_TEKKEN,
    "pixtral": PIXTRAL,
}
