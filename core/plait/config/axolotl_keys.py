"""How Plait treats Axolotl keys it does not declare itself.

A key in an Axolotl config is, for Plait, one of:

- declared by core or a loaded plugin: it has Axolotl's meaning;
- renamed (:data:`RENAMED_KEYS`): Axolotl's other name of a Plait key;
- a no-op (:data:`NO_OP_KEYS`): it changes nothing in Plait, so it is accepted
  and ``plait train`` says once at the start that it ignored it;
- blank, or only restating Axolotl's default of a feature Plait lacks
  (``gptq: false``): unset, as in Axolotl;
- an Axolotl feature Plait lacks (:func:`lacking_reason`): refused, naming
  what to use instead;
- a key of an Axolotl integration plugin (:mod:`plait.config.axolotl_plugins`);
- a key of a plugin that is installed but not loaded, or of a first-party
  plugin that is not installed (:mod:`plait.config.plugin_keys`).

Anything else is unknown, with a did-you-mean over both key sets.
"""

from __future__ import annotations

from plait.config.axolotl_schema import AXOLOTL_KEYS, INTEGRATION_KEYS

#: Axolotl's name -> Plait's key of the same meaning
RENAMED_KEYS: dict[str, str] = {
    "dataset_num_proc": "dataset_processes",
    "model_revision": "revision_of_model",
    "model_config": "overrides_of_model_config",
    "model_kwargs": "overrides_of_model_kwargs",
    "liger_swiglu": "liger_glu_activation",
    "noisy_embedding_alpha": "neftune_noise_alpha",
    "type_of_model": "model_type",
    # Axolotl's older names of its context-parallel keys (it maps them itself, with a deprecation warning)
    "sequence_parallel_degree": "context_parallel_size",
    "ring_attn_func": "ring_attn",
}

#: Axolotl's older boolean attention switches Plait has no flag for -> the attn_implementation they ask for
#: (then substituted like that value: xformers' memory-efficient attention is exact, SDPA computes the same)
ATTENTION_SWITCHES: dict[str, str] = {"xformers_attention": "xformers"}

#: Axolotl's switches for the dtype the weights load in -> Plait's torch_dtype value
DTYPE_SWITCHES: dict[str, str] = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

#: key -> why it changes nothing in Plait (``plait train`` lists the ones a config sets)
NO_OP_KEYS: dict[str, str] = {
    "remove_unused_columns": "Plait's batches hold only the tokenized columns",
    "skip_prepare_dataset": "Plait tokenizes once and caches the rows; the trained rows are the same",
    "ddp_find_unused_parameters": "data parallelism is FSDP2 (plait-parallel), which has no unused-parameter search",
    "ddp_broadcast_buffers": "data parallelism is FSDP2 (plait-parallel), not DDP",
    "ddp_bucket_cap_mb": "data parallelism is FSDP2 (plait-parallel), not DDP",
    "torchdistx_path": "Plait does not use torchdistx's deferred initialisation",
    "low_cpu_mem_usage": "transformers 5 always loads weights without a second copy in memory",
    "hf_use_auth_token": "the hub token is whatever huggingface_hub finds (HF_TOKEN or `hf auth login`)",
    "local_rank": "set by the launcher (torchrun), read from the environment",
    "debug": "Axolotl prints tokenized samples; `plait inspect CONFIG` shows them with trained tokens marked",
    "cut_cross_entropy": "Plait's loss step never builds the [tokens, vocab] logits (chunked head + cross-entropy, "
                         "plait-kernels' fused kernel on CUDA): the memory saving of cut cross-entropy, same loss",
    "flash_attn_cross_entropy": "Plait's loss step is its own chunked (or fused) cross-entropy",
    "experimental_skip_move_to_device": "Plait moves the model to the device itself",
    "dataloader_num_workers": "Plait's rows are tokenized in memory before training; no loader workers",
    "dataloader_pin_memory": "Plait's rows are tokenized in memory before training; no loader workers",
    "dataloader_prefetch_factor": "Plait's rows are tokenized in memory before training; no loader workers",
    "flex_attn_compile_kwargs": "Plait compiles flex attention's kernel with its own settings (speed only)",
    "fused_attn_kernel": "a speed-only fusion of q/k norm and rotary in one Triton kernel; Plait runs the model's "
                         "own norm and rotary, which compute the same",
    "chunked_cross_entropy": "Plait's loss step is always chunked (the head and cross-entropy over chunks of the "
                             "trained tokens, never the [tokens, vocab] logits): the memory saving it asks for",
    "chunked_cross_entropy_num_chunks": "Plait's loss step chooses its own chunk size (its memory does not grow "
                                        "with the vocabulary)",
    "dpo_use_logits_to_keep": "Plait's preference step never builds the [tokens, vocab] logits: log-probabilities "
                              "come from the hidden states in chunks",
    "dpo_use_liger_kernel": "Plait's preference step computes its log-probabilities in chunks from the hidden "
                            "states, the memory saving liger's fused DPO loss is for",
    "total_num_tokens": "Axolotl fills it in from the data; Plait counts the tokens itself",
    "total_supervised_tokens": "Axolotl fills it in from the data; Plait counts the trained tokens itself",
    "batch_flattening": "a speed-only layout of each micro-batch (its rows end to end, no padding); Plait pads "
                        "each batch to its longest row, or packs rows with sample_packing: the trained tokens and "
                        "the loss are the same",
    "sample_packing_mp_start_method": "Plait plans its packed bins in its own process, with no worker processes",
    "lora_embedding_kernel": "a speed-only kernel for LoRA on embeddings; peft's LoRA embedding computes the same",
    "include_tokens_per_second": "Plait logs tokens per second on every step",
    "include_tkps": "Plait logs tokens per second on every step",
    "world_size": "set by the launcher (torchrun), read from the environment",
    "ddp": "Axolotl works it out from the launcher's environment; Plait reads the same",
    "is_preprocess": "set by Axolotl's preprocess command for its own use; `plait preprocess CONFIG` is Plait's",
    "axolotl_config_path": "set by Axolotl's CLI to the config file it read",
    "sample_packing_eff_est": "Axolotl's estimate of the packing efficiency for counting steps; Plait packs first "
                              "and counts the real bins",
    "sample_packing_group_size": "Axolotl packs this many rows at a time (a larger group packs slightly fuller); "
                                 "Plait's best-fit packs every row of the epoch at once",
    "preprocess_iterable": "a memory-saving way for Axolotl to tokenize large datasets; Plait tokenizes in batches "
                           "into its memory-mapped cache, and the prepared rows are the same",
    "num_dataset_shards_to_save": "the number of files Axolotl writes its prepared dataset in; Plait's cache has its "
                                  "own layout, and the rows are the same",
    "embeddings_skip_upcast": "Plait never upcasts the embeddings and head to float32 for adapter training "
                              "(plait-bnb keeps frozen non-quantized weights in the compute dtype), which is what "
                              "this asks",
    "multipack_real_batches": "Plait's packed micro-batches are always micro_batch_size sequences of sequence_len "
                              "(Axolotl's true); the tokens a micro-batch trains are the same either way",
    "dataset_keep_in_memory": "whether tokenized rows stay in memory or in the memory-mapped cache changes nothing "
                              "that trains",
    "pad_to_multiple_of": "a padded length for speed only; Plait pads each batch to its longest row, and padding "
                          "never trains",
    "torch_empty_cache_steps": "Plait does not empty the CUDA cache on a schedule: the caching allocator keeps its "
                               "blocks for reuse, which changes nothing that trains",
    **{key: "Plait freezes what was built before training out of the garbage collector's walks, so its "
            "collections stay short; a forced collection every N steps changes nothing that trains"
       for key in ("gc_steps", "gc_collect_steps")},
    **{f"is_{family}_derived_model": "Axolotl's older hint of the model family; Plait reads the architecture from "
                                     "the model's config.json"
       for family in ("llama", "mistral", "qwen", "falcon")},
    **{f"gradio_{name}": "a setting of Axolotl's Gradio inference UI; training does not read it"
       for name in ("max_new_tokens", "server_name", "server_port", "share", "temperature", "title")},
    # settings read only by Axolotl's own optimizers, which Plait refuses by name when optimizer: asks for one
    # (registries.ELSEWHERE); with any other optimizer Axolotl does not read them either
    **{key: "read only by Axolotl's CAME optimizer (came_pytorch)" for key in ("adam_beta3", "adam_epsilon2")},
    **{key: "read only by Axolotl's Dion optimizer (dion)"
       for key in ("dion_lr", "dion_momentum", "dion_rank_fraction", "dion_rank_multiple_of")},
    **{f"qgalore_{name}": "read only by Axolotl's Q-GaLore optimizer (q_galore_adamw8bit)"
       for name in ("rank", "update_proj_gap", "scale", "proj_type", "proj_quant", "proj_bits", "proj_group_size",
                    "cos_threshold", "gamma_proj", "queue_size")},
    "optim_target_modules": "read only by the GaLore and Q-GaLore optimizers, which Plait refuses by name",
    "device": "the device Axolotl's inference and chat commands move the model to; Plait's commands use this "
              "process's GPU, or the CPU without one",
    # how Axolotl's merge-lora command runs; `plait merge-lora` merges on the CPU, with the same merged weights
    "merge_method": "how Axolotl's merge-lora holds the model in memory (by shard or whole); plait merge-lora merges "
                    "on the CPU and writes the same weights",
    "merge_lora": "a flag Axolotl's merge-lora command sets for itself; merging is the plait merge-lora command",
    # keys Axolotl's schema declares and its code reads nowhere (checked at 067b021)
    "lr_div_factor": "Axolotl declares it but reads it nowhere (Plait's one_cycle takes div_factor from "
                     "lr_scheduler_kwargs)",
    "max_prompt_len": "Axolotl declares it but reads it nowhere",
    # Axolotl shuffles and packs a streamed dataset a buffer at a time; Plait reads the run's token budget from the
    # stream and packs and shuffles all of it at once, so the buffer's size changes nothing that trains
    **{key: "Plait packs and shuffles the streamed rows of a pretraining_dataset all at once, not a buffer at a "
            "time" for key in ("streaming_multipack_buffer_size", "pretrain_multipack_buffer_size")},
    # keys Axolotl's examples still carry but its schema no longer has (Axolotl ignores them too)
    "base_model_ignore_patterns": "Axolotl no longer reads it (a hub download filter)",
    "sample_packing_seq_len_multiplier": "Axolotl no longer reads it (its older packing's rows per bin; Plait's "
                                         "packer fills each bin up to sequence_len)",
    "adam_eps": "Axolotl ignores it too (its key is adam_epsilon)",
    "full_finetune": "Axolotl ignores it too: without an adapter every weight trains",
    "eta_min": "Axolotl ignores it too (not in its schema); cosine_min_lr_ratio sets the schedule's floor",
    # settings of the GPTQ-for-LLaMa loader of older Axolotl versions; transformers' GPTQ integration (gptq: true)
    # reads the group size and the checkpoint format from the checkpoint's own quantization_config
    "gptq_groupsize": "Axolotl no longer reads it: a GPTQ checkpoint's config.json gives its group size (gptq: true)",
    "gptq_model_v1": "Axolotl no longer reads it: a GPTQ checkpoint's config.json gives its format (gptq: true)",
}

#: keys of older Axolotl versions that its current schema drops -> what Plait says when one is set
FORMER_AXOLOTL_KEYS: dict[str, str] = {}

#: Axolotl key -> what Plait lacks and what to use instead (keys not listed get a generic line)
LACKING_KEYS: dict[str, str] = {
    "ebft": "EBFT training is not implemented",
    "relora": "ReLoRA is not implemented",
    "s2_attention": "shifted-sparse attention is not implemented",
    "sage_attention": "SageAttention is not used; use attn_implementation: sdpa or flash_attention_2",
    "lora_on_cpu": "LoRA weights live on the training device",
    "nvfp4_merge_aware": "merge-aware NVFP4 LoRA (fake-quantizing base + LoRA to the NVFP4 grid of a ModelOpt "
                         "checkpoint while training) is not implemented",
    "nvfp4_merge_aware_start_step": "merge-aware NVFP4 LoRA is not implemented",
    "dsv4_fp4_grouped_mode": "the grouped fp4 MoE path of Axolotl's kernels (NVFP4 experts of a ModelOpt "
                             "checkpoint, fp4 activations) is not implemented",
    "use_dsv4_kernels": "Axolotl's fused DeepSeek-V4 training kernels (attention, RoPE, mHC, fp8 non-expert "
                        "weights) are not implemented; the model's own code runs without the key",
    "use_glm_dsa_kernels": "Axolotl's GLM-5 DSA kernels (sparse top-k attention with an fp32 router) are not "
                           "implemented; the model's own attention runs without the key",
    "swanlab_log_model": "uploading checkpoints to SwanLab is not implemented (Axolotl's SwanLab plugin only "
                         "passes it on, 'coming soon'); leave it false",
    "multimodal": "not used; set processor_type (plait-vision) to train a vision-language model",
    "vllm": "vLLM generation (online RL) is not implemented",
    "torch_compile_options": "torch.compile options are not configurable",
    "use_pose": "PoSE is not implemented",
    "max_packed_sequence_len": "Axolotl itself refuses it ('no longer supported'): its old concatenating packing is "
                               "sample_packing: true with sequence_len as the packed length",
    "layer_offloading": "offloading layer weights is not implemented; fsdp_config offload_params does it under FSDP2",
    "liger_use_token_scaling": "liger's token-scaled cross-entropy is not implemented",
    "deepcompile": "DeepSpeed is not used; deepspeed: <zero json> translates to FSDP2",
}


def lacking_reason(key: str) -> str:
    """What to say about an Axolotl key Plait does not declare."""
    reason = LACKING_KEYS.get(key) or FORMER_AXOLOTL_KEYS.get(key)
    if reason:
        return reason
    for integration, keys in INTEGRATION_KEYS.items():
        if key in keys:
            return f"a key of Axolotl's {integration} integration, which Plait does not have"
    return "Axolotl's feature has no equivalent in Plait yet"


def is_axolotl_key(key: str) -> bool:
    return key in AXOLOTL_KEYS or key in FORMER_AXOLOTL_KEYS or any(key in keys for keys in INTEGRATION_KEYS.values())


def axolotl_default(key: str):
    if key in AXOLOTL_KEYS:
        return AXOLOTL_KEYS[key]
    for keys in INTEGRATION_KEYS.values():
        if key in keys:
            return keys[key]
    return None


def asks_for_nothing(key: str, value) -> bool:
    """``True`` when ``value`` leaves Axolotl's feature off: blank, empty, or
    Axolotl's own default (``gptq: false``, ``lisa_layers_attribute: model.layers``)."""
    if value is None or value == [] or value == {}:
        return True
    default = axolotl_default(key)
    if value is False and default in (None, False):
        return True
    return default is not None and type(value) is type(default) and value == default
