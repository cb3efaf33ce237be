"""Gemma 2 (``model_type: gemma2``).

Differences a trainer must know: RMSNorm scales by ``1 + weight``
(``norm_offset=1.0``), the MLP is GeGLU (tanh-approximated GELU), attention
logits are soft-capped (eager or flash attention honour it, SDPA does not), and
the head output is soft-capped by ``config.final_logit_softcapping`` (30.0), so
a loop that applies the head itself must apply ``tanh(logits / c) * c`` too.
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, DENSE_ATTENTION_TP, DENSE_MLP_TP, GEMMA, GEMMA_TOKENS, MLP_LINEARS

FAMILY = ModelFamily(
    name="gemma2",
    model_types=("gemma2",),
    decoder_layer_class="Gemma2DecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + MLP_LINEARS,
    norm_class="Gemma2RMSNorm",
    norm_offset=1.0,
    attention_class="Gemma2Attention",
    mlp_class="Gemma2MLP",
    mlp_activation="geglu",
    tp_plan={**DENSE_ATTENTION_TP, **DENSE_MLP_TP},
    default_chat_template=GEMMA,
    end_of_turn_tokens=("<end_of_turn>",),
    chat_special_tokens=GEMMA_TOKENS,
    pad_token_candidates=("<pad>",),
)
