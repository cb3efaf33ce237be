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
