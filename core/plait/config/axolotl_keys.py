"""Axolotl keys Plait knows about but does not act on (yet).

A config carried over from Axolotl that uses one of these is refused with every
such key named in one message; ``--allow-unsupported`` turns that into a
one-line warning so the rest of the config still runs.
Keys that need a plugin which is not installed are listed in
``KEYS_OF_PLUGINS`` so the message can say which package to install.
"""

from __future__ import annotations

#: key -> why it is not supported (shown to the user)
UNSUPPORTED_KEYS: dict[str, str] = {
    "trl": "TRL's nested options are not read; use the flat keys (rl_beta, dpo_loss_type, ...) of plait-preference",
    "process_reward_model": "reward-model training is not implemented",
    "deepspeed": "DeepSpeed is not used; use fsdp / tensor_parallel_size (plait-parallel)",
    "relora_steps": "ReLoRA is not implemented",
    "relora_warmup_steps": "ReLoRA is not implemented",
    "lisa_n_layers": "LISA is not implemented",
    "lisa_step_interval": "LISA is not implemented",
    "neftune_noise_alpha": "NEFTune is not implemented",
    "unfrozen_parameters": "partial unfreezing by regex is not implemented",
    "s2_attention": "shifted-sparse attention is not implemented",
    "xformers_attention": "xformers attention is not used; use sdp_attention or flash_attention",
    "lora_on_cpu": "not implemented",
    "gptq": "GPTQ quantized bases are not supported",
    "load_in_2bit": "not supported",
    "multimodal": "not used; set processor_type (plait-vision) to train a vision-language model",
    "curriculum_sampling": "not implemented",
    "group_by_length": "not implemented",
    "noisy_embedding_alpha": "NEFTune is not implemented",
    "torchdistx_path": "not used",
    "hub_model_id": "pushing to the hub is not implemented",
    "hub_strategy": "pushing to the hub is not implemented",
    "push_dataset_to_hub": "pushing to the hub is not implemented",
    "chat_template_kwargs": "not implemented",
}

#: Axolotl keys provided by a Plait plugin package: key -> distribution
KEYS_OF_PLUGINS: dict[str, str] = {
    **{k: "plait-peft" for k in (
        "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
        "lora_modules_to_save", "lora_model_dir", "peft_use_dora", "peft_use_rslora",
        "lora_fan_in_fan_out", "peft_layers_to_transform",
    )},
    **{k: "plait-bnb" for k in (
        "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "bnb_config_kwargs",
    )},
    **{k: "plait-kernels" for k in (
        "liger_rms_norm", "liger_rope", "liger_glu_activation", "liger_layer_norm",
        "liger_fused_linear_cross_entropy", "liger_cross_entropy", "torch_compile",
        "torch_compile_backend", "kernels", "plait_kernels", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
    )},
    **{k: "plait-parallel" for k in (
        "fsdp", "fsdp_config", "fsdp_version", "tensor_parallel_size", "context_parallel_size",
        "dp_shard_size", "dp_replicate_size", "ring_attn", "heads_k_stride",
    )},
    **{k: "plait-preference" for k in (
        "rl", "rl_beta", "dpo_beta", "dpo_loss_type", "dpo_loss_weights", "dpo_label_smoothing", "orpo_alpha",
        "simpo_gamma", "cpo_alpha", "kto_desirable_weight", "kto_undesirable_weight", "reward_model",
        "precompute_ref_log_probs", "dpo_use_weighting", "dpo_padding_free", "center_rewards_coefficient", "num_labels",
    )},
    **{k: "plait-models" for k in ("model_config_type", "router_aux_loss_coef", "lora_target_experts")},
    **{k: "plait-vision" for k in (
        "processor_type", "image_size", "image_resize_algorithm", "skip_prepare_dataset", "remove_unused_columns",
        "freeze_mm_modules",
    )},
}
