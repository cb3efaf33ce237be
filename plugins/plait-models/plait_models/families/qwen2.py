"""Qwen 2 / 2.5 (``model_type: qwen2``): llama layout with q/k/v biases, chatml."""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, CHATML, CHATML_TOKENS, DENSE_ATTENTION_TP, DENSE_MLP_TP, MLP_LINEARS

FAMILY = ModelFamily(
    name="qwen2",
    model_types=("qwen2",),
    decoder_layer_class="Qwen2DecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + MLP_LINEARS,
    norm_class="Qwen2RMSNorm",
    attention_class="Qwen2Attention",
    mlp_class="Qwen2MLP",
    mlp_activation="swiglu",
    mlp_output_feeds_residual=True,
    tp_plan={**DENSE_ATTENTION_TP, **DENSE_MLP_TP},
    default_chat_template=CHATML,
    end_of_turn_tokens=("<|im_end|>",),
    chat_special_tokens=CHATML_TOKENS,
    # Qwen pads with <|endoftext|>, which the instruct models do not use to end turns
    pad_token_candidates=("<|endoftext|>",),
)
