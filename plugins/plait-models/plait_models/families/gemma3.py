"""Gemma 3 (``model_type: gemma3_text``, and the multimodal ``gemma3``).

Like Gemma 2 (``1 + weight`` RMSNorm, GeGLU) plus per-head q/k norms, which
stay replicated under tensor parallel. ``gemma3`` checkpoints load as
``Gemma3ForConditionalGeneration``: the text decoder is the same
``Gemma3DecoderLayer``, but the SigLIP vision tower also has ``self_attn.q_proj``
style names, so ``lora_target_linear`` adapts those too (harmless for text-only
training: they get no gradient) unless the adapter plugin restricts targets to
``language_model``.
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, DENSE_ATTENTION_TP, DENSE_MLP_TP, GEMMA, GEMMA_TOKENS, MLP_LINEARS

FAMILY = ModelFamily(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    decoder_layer_class="Gemma3DecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + MLP_LINEARS,
    norm_class="Gemma3RMSNorm",
    norm_offset=1.0,
    attention_class="Gemma3Attention",
    mlp_class="Gemma3MLP",
    mlp_activation="geglu",
    tp_plan={**DENSE_ATTENTION_TP, **DENSE_MLP_TP},
    default_chat_template=GEMMA,
    end_of_turn_tokens=("<end_of_turn>",),
    chat_special_tokens=GEMMA_TOKENS,
    pad_token_candidates=("<pad>",),
)
