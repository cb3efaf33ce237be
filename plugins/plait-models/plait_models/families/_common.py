"""Chat templates, TP plans and module names shared by several families.

Each template spells its turn markers literally (``<|im_end|>``, not
``eos_token``) so the end-of-turn token a family declares is exactly what the
template emits, whatever the tokenizer calls its EOS.
"""

from __future__ import annotations

#: chatml, as Qwen 2/2.5/3 (dense and MoE) ship it, without a forced system prompt
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

#: Llama 3.x header/eot format
LLAMA3 = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

#: Mistral/Mixtral [INST] format; there is no system role, so a system message
#: is prepended to the next user turn (as Mistral's own templates do)
MISTRAL = (
    "{%- set system = namespace(text='') -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set system.text = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}{%- set system.text = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + '</s>' }}"
    "{%- else -%}{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
MISTRAL_TOKENS = ("</s>",)

#: Gemma 2/3 turn format: the assistant role is called "model"; a system
#: message is prepended to the next user turn (Gemma has no system role)
GEMMA = (
    "{{ bos_token }}"
    "{%- set system = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set system.text = message['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + system.text + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- set system.text = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
GEMMA_TOKENS = ("<start_of_turn>", "<end_of_turn>")

#: Phi-3 role tags
PHI3 = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- else -%}{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
PHI3_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

#: Qwen2.5's chatml (Axolotl's ``qwen_25``): every conversation opens with a
#: system turn, Qwen's default prompt when the conversation brings none; with
#: ``tools`` that turn also lists them as JSON lines. Calls are ``<tool_call>``
#: JSON in the assistant turn; results are ``<tool_response>`` blocks, and
#: consecutive tool messages share one user turn.
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_TOOLS_PREAMBLE = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN25_TOOLS_INSTRUCTION = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
#: Qwen's tool listing (inside ``{% if tools %}``): one JSON line per tool
_QWEN_TOOL_LINES = "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
#: a ``tool`` message (inside the message loop): its result as a
#: ``<tool_response>`` block; consecutive results share one user turn
_QWEN_TOOL_RESULTS = (
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
)
QWEN25 = (
    "{%- set opens_with_system = messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{{- messages[0]['content'] if opens_with_system else " + repr(QWEN25_DEFAULT_SYSTEM) + " -}}"
    "{%- if tools -%}"
    "{{ " + repr(QWEN25_TOOLS_PREAMBLE) + " }}"
    + _QWEN_TOOL_LINES +
    "{{ " + repr(QWEN25_TOOLS_INSTRUCTION) + " }}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- for message in messages -%}"
    "{%- if loop.first and opens_with_system -%}"
    "{%- elif message['role'] == 'tool' -%}"
    + _QWEN_TOOL_RESULTS +
    "{%- elif message['role'] == 'assistant' and message.tool_calls -%}"
    "{{ '<|im_start|>assistant' }}{%- if message['content'] -%}{{ '\\n' + message['content'] }}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set call = call.function if call.function is defined else call -%}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}{{ call.arguments | tojson }}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

#: Qwen 3's chatml (Axolotl's ``qwen3``): no default system turn; Qwen2.5's
#: tool format (the tools after the system text); and reasoning. An answer
#: after the conversation's last real user query (tool results do not count)
#: shows its reasoning as a ``<think>`` block: its ``reasoning_content``, or
#: the ``<think>...</think>`` part of its text. The final answer gets the block
#: even when empty; earlier answers are rendered with the reasoning dropped.
#: ``real_last_index`` (plait-formats passes it) keeps a prefix's rendering
#: the start of the whole conversation's.
QWEN3 = (
    "{%- set opens_with_system = messages[0]['role'] == 'system' -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if opens_with_system -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{{ " + repr(QWEN25_TOOLS_PREAMBLE.lstrip("\n")) + " }}"
    + _QWEN_TOOL_LINES +
    "{{ " + repr(QWEN25_TOOLS_INSTRUCTION) + " + '<|im_end|>\\n' }}"
    "{%- elif opens_with_system -%}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- set query = namespace(index=messages | length - 1, found=false) -%}"
    "{%- for message in messages[::-1] -%}"
    "{%- if not query.found and message['role'] == 'user' and not (message['content'].startswith('<tool_response>')"
    " and message['content'].endswith('</tool_response>')) -%}"
    "{%- set query.found = true -%}{%- set query.index = messages | length - 1 - loop.index0 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set last_index = real_last_index if real_last_index is defined and real_last_index is not none"
    " else messages | length - 1 -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set answer = message['content'] -%}"
    "{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none -%}"
    "{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in answer -%}"
    "{%- set reasoning = answer.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > query.index and (loop.index0 == last_index or reasoning) -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + answer.lstrip('\\n') }}"
    "{%- else -%}"
    "{{ '<|im_start|>assistant\\n' + answer }}"
    "{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if not loop.first or answer -%}{{ '\\n' }}{%- endif -%}"
    "{%- set call = call.function if call.function else call -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{%- if call.arguments is string -%}{{ call.arguments }}{%- else -%}{{ call.arguments | tojson }}{%- endif -%}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    + _QWEN_TOOL_RESULTS +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}{{ '<think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

#: Phi-3.5's role tags (Axolotl's ``phi_35``): Phi-3's, without a BOS, and an
#: empty system message leaves no turn
PHI35 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] -%}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}{%- endif -%}"
    "{%- elif message['role'] in ['user', 'assistant'] -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- else -%}{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

def _alternating_inst(name: str, user_open: str, user_close: str, before_answer: str) -> str:
    """An [INST] template with strictly alternating user/assistant turns and no
    system role: ``bos`` + per turn ``user_open + user + user_close`` and
    ``before_answer + answer + '</s>'``."""
    return (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['user', 'assistant'] -%}"
        "{{ raise_exception('" + name + " has user and assistant roles only, got ' + message['role']) }}"
        "{%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('" + name + " needs user and assistant turns to alternate, starting with user') }}"
        "{%- elif message['role'] == 'user' -%}"
        "{{ " + repr(user_open) + " + message['content'] + " + repr(user_close) + " }}"
        "{%- else -%}{{ " + repr(before_answer) + " + message['content'] + '</s>' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


#: Mistral's first [INST] format (Axolotl's ``mistral_v1``): a space before each
#: ``[INST]`` and before each answer
MISTRAL_V1 = _alternating_inst("mistral_v1", " [INST] ", " [/INST]", " ")
#: the tekken tokenizer's [INST] format (Axolotl's ``mistral_v3_tekken``): no spaces
MISTRAL_V3_TEKKEN = _alternating_inst("mistral_v3_tekken", "[INST]", "[/INST]", "")

#: the Alpaca prompt as chat turns (Axolotl's ``alpaca``): an optional first
#: system message as plain text, then ``### Instruction:`` / ``### Response:``
#: blocks, a blank line between messages, EOS after each answer
ALPACA = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'system' and loop.first -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('alpaca takes one system message, first, then user and assistant turns; got '"
    " + message['role'] + ' as message ' + loop.index0|string) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n### Response:\\n' }}{%- endif -%}"
)

#: DeepSeek's fullwidth-bar turn tags
DEEPSEEK_USER, DEEPSEEK_ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"
DEEPSEEK_END = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DEEPSEEK_TOKENS = (DEEPSEEK_USER, DEEPSEEK_ASSISTANT, DEEPSEEK_END)

#: DeepSeek-V2's format (Axolotl's ``deepseek_v2``): a system message is its
#: text and a blank line where it stands, an answer ends with EOS
DEEPSEEK_V2 = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '" + DEEPSEEK_USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '" + DEEPSEEK_ASSISTANT + "' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('deepseek_v2 has system, user and assistant roles only, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + DEEPSEEK_ASSISTANT + "' }}{%- endif -%}"
)

#: DeepSeek-V3's format (Axolotl's ``deepseek_v3``) for text conversations: every
#: system message joined (blank lines between) right after BOS, an answer's
#: reasoning up to its last ``</think>`` dropped, ``<｜end▁of▁sentence｜>`` after
#: each answer. Tool calls and results are refused: Axolotl's rendering of
#: them is not reproduced here.
DEEPSEEK_V3 = (
    "{{ bos_token }}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}{{ message['content'] }}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '" + DEEPSEEK_USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' and not message.get('tool_calls') -%}"
    "{{ '" + DEEPSEEK_ASSISTANT + "' + message['content'].split('</think>')[-1] + '" + DEEPSEEK_END + "' }}"
    "{%- elif message['role'] != 'system' -%}"
    "{{ raise_exception('deepseek_v3 here takes text conversations (system, user, assistant); got '"
    " + (message['role'] if message['role'] != 'assistant' else 'an assistant turn with tool_calls')) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + DEEPSEEK_ASSISTANT + "' }}{%- endif -%}"
)

#: Falcon-H1's chatml (Axolotl's ``falcon_h1``) for conversations without
#: tool definitions: BOS, a first system message as a system turn, every other
#: message a turn under its own role
FALCON_H1 = (
    "{{ bos_token }}"
    "{%- if tools -%}{{ raise_exception('falcon_h1 here takes conversations without tool definitions') }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{ raise_exception('falcon_h1 takes a system message first only, got one as message ' + loop.index0|string) }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

#: Llama 4's header format (Axolotl's ``llama4``) for text conversations: BOS,
#: then per message ``<|header_start|>role<|header_end|>``, a blank line, the
#: text and ``<|eot|>``; a first system message is stripped of surrounding
#: whitespace. Tools, tool results and tool calls are refused.
LLAMA4 = (
    "{{ bos_token }}"
    "{%- if tools is defined and tools is not none -%}"
    "{{ raise_exception('llama4 here takes text conversations; tool definitions are not supported') }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['tool', 'ipython'] or 'tool_calls' in message "
    "or message['content'] is not string -%}"
    "{{ raise_exception('llama4 here takes text messages only; message ' + loop.index0|string + ' (' "
    "+ message['role'] + ') is a tool message or has non-text content') }}"
    "{%- endif -%}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{{- (message['content'] | trim) if loop.first and message['role'] == 'system' else message['content'] }}"
    "{{- '<|eot|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif -%}"
)
LLAMA4_TOKENS = ("<|header_start|>", "<|header_end|>", "<|eot|>")

#: TP plan shared by llama-style decoder layers (names inside a decoder layer);
#: mirrors transformers' ``base_model_tp_plan`` with the ``layers.*.`` prefix dropped
DENSE_ATTENTION_TP = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
}
DENSE_MLP_TP = {
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
