"""Qwen 3 dense (``model_type: qwen3``): Qwen 2 plus per-head q/k RMSNorm.

``q_norm``/``k_norm`` act on one head's dimension, so under tensor parallel
they stay replicated (transformers marks them ``replicated_with_grad_allreduce``);
they are absent from the plan on purpose.
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, CHATML, CHATML_TOKENS, DENSE_ATTENTION_TP, DENSE_MLP_TP, MLP_LINEARS

FAMILY = ModelFamily(
    name="qwen3",
    model_types=("qwen3",),
    decoder_layer_class="Qwen3DecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + MLP_LINEARS,
    norm_class="Qwen3RMSNorm",
    attention_class="Qwen3Attention",
    mlp_class="Qwen3MLP",
    mlp_activation="swiglu",
    mlp_output_feeds_residual=True,
    tp_plan={**DENSE_ATTENTION_TP, **DENSE_MLP_TP},
    default_chat_template=CHATML,
    end_of_turn_tokens=("<|im_end|>",),
    chat_special_tokens=CHATML_TOKENS,
    pad_token_candidates=("<|endoftext|>",),
)
