"""Mistral (``model_type: mistral``): llama layout with sliding-window attention."""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, DENSE_ATTENTION_TP, DENSE_MLP_TP, MISTRAL, MISTRAL_TOKENS, MLP_LINEARS

FAMILY = ModelFamily(
    name="mistral",
    model_types=("mistral",),
    decoder_layer_class="MistralDecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + MLP_LINEARS,
    norm_class="MistralRMSNorm",
    attention_class="MistralAttention",
    mlp_class="MistralMLP",
    mlp_activation="swiglu",
    mlp_output_feeds_residual=True,
    tp_plan={**DENSE_ATTENTION_TP, **DENSE_MLP_TP},
    default_chat_template=MISTRAL,
    # Mistral ends an assistant turn with its EOS, </s>
    end_of_turn_tokens=MISTRAL_TOKENS,
    chat_special_tokens=MISTRAL_TOKENS,
    pad_token_candidates=("<pad>", "<unk>"),
)
