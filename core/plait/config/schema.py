"""Core's configuration keys, named as in Axolotl so existing configs carry over.

Plugins add their own keys through the ``config_schema`` hook; see
:mod:`plait.config.build` for how the models are combined.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from plait.model.names import ATTENTION_FLAGS
from plait.registries import DatasetEntry
from plait.values import ValuesAsGiven, not_empty


#: signals ``save_on_signals`` may name (the loop installs handlers for them)
ACCEPTED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


class StrictModel(ValuesAsGiven):
    """Base for config sections: unknown keys are rejected (core reports them
    with a "did you mean" before pydantic sees them); values are read as given
    (:mod:`plait.values`: no boolean taken as a number, no string split into
    characters, no infinity or NaN)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


#: core's part of a ``datasets:`` entry (the source keys); formats subclass it, see :mod:`plait.registries`
DatasetConfig = DatasetEntry


class PretrainingDatasetConfig(StrictModel):
    """One entry of ``pretraining_dataset:``: raw text streamed, not loaded whole."""

    path: str = Field(description="Local file (json, jsonl, parquet, csv, txt) or a hub dataset name.")

    _path_not_empty = field_validator("path")(not_empty)
    name: Optional[str] = Field(None, description="Dataset configuration name on the hub.")
    split: str = Field("train", description="The split to stream.")
    data_files: Optional[Union[str, list[str]]] = Field(
        None, description="File name(s) inside path to stream, instead of all of them.")
    ds_type: Optional[str] = Field(None, description="File type when the extension does not tell.")
    revision: Optional[str] = Field(None, description="Hub dataset revision (branch, tag or commit).")
    text_column: str = Field("text", description="The column holding the text.")
    type: Optional[str] = Field(None, description="Accepted for Axolotl compatibility: pretrain.")
    skip: int = Field(0, ge=0, description="Rows to skip at the start of the stream.")
    trust_remote_code: bool = Field(
        False, description="Let datasets run the dataset's own loading script from the hub.")


class LrGroup(StrictModel):
    """One entry of ``lr_groups:``: modules that train at their own learning rate."""

    name: str = Field(min_length=1, description="The group's name (in logs and messages).")
    modules: list[str] = Field(min_length=1, description="Substrings of parameter names (e.g. self_attn.q_proj, "
                                                         "layers.0.) whose parameters train at lr.")
    lr: float = Field(gt=0, description="The group's peak learning rate (the schedule scales it like "
                                        "learning_rate).")

    @field_validator("modules")
    @classmethod
    def _no_empty_module(cls, modules):
        if any(not m for m in modules):
            raise ValueError("an empty module name would match every parameter; give a part of the names")
        return modules


class SelectiveCheckpointing(StrictModel):
    """``selective_checkpointing:`` (Axolotl's): ops whose outputs a checkpointed layer keeps."""

    save: list[str] = Field(
        default_factory=lambda: ["attention"], min_length=1,
        description="Ops to keep instead of recomputing: attention (torch's SDPA kernels and the flash-attention "
                    "ops), or parts of qualified op names (aten::mm). Triton kernels are recomputed as usual.")
    save_sliding_window: bool = Field(
        False, description="Keep attention in sliding-window layers too (a hybrid model's layer_types); by default "
                           "only full-attention layers keep it, a window being cheap to recompute.")
    recompute_layer_types: Optional[list[str]] = Field(
        None, description="layer_types whose attention is recomputed (default: sliding_attention, "
                          "chunked_attention); ignored with save_sliding_window.")
    offload: bool = Field(
        False, description="Axolotl's offload of the kept outputs to host memory; not available in Plait (its "
                           "gradient_checkpointing: offload moves the layer inputs).")

    @field_validator("offload")
    @classmethod
    def _no_offload(cls, value):
        if value:
            from plait.errors import ConfigError

            raise ConfigError("config key 'selective_checkpointing.offload': true is not available in Plait; the kept "
                              "outputs stay on the GPU. Remove it (gradient_checkpointing: offload moves the layer "
                              "inputs to host memory, and combines with selective_checkpointing)")
        return value


class DynamicCheckpoint(StrictModel):
    """``dynamic_checkpoint:`` (Axolotl's): save a checkpoint when asked, while the run goes on."""

    enabled: bool = Field(False, description="Look for the trigger file while training.")
    trigger_file_path: Optional[str] = Field(
        None, min_length=1, description="The file to create (touch) to ask for a checkpoint, relative to output_dir "
                                        "(default: .axolotl_save_checkpoint, Axolotl's name); deleted once seen.")
    check_interval: int = Field(100, ge=1, description="Look for the trigger file every this many steps.")
    enable_signal: Optional[bool] = Field(
        None, description="Axolotl's SIGUSR1 save-and-continue; refused: Plait's SIGUSR1 saves and stops "
                          "(save_on_signals). Use the trigger file.")

    @field_validator("enable_signal")
    @classmethod
    def _no_signal(cls, value):
        if value:
            raise ValueError("true is not accepted: in Plait SIGUSR1 saves a checkpoint and stops the run "
                             "(save_on_signals); to save and go on, touch the trigger file")
        return value


class CoreConfig(StrictModel):
    """Keys core owns. Field descriptions show up in ``plait config schema``."""

    # plugins
    plugins: list[str] = Field(default_factory=list, description="Dotted import paths of extra plugin modules.")
    disable_plugins: list[str] = Field(default_factory=list, description="Plugin names not to load.")

    # model and tokenizer
    base_model: str = Field(min_length=1, description="Hugging Face model id or local directory.")
    base_model_config: Optional[str] = Field(
        None,
        description="Where the model's config.json is read from when it differs from base_model (a hub name or "
                    "directory): checked for packing support and read by plait-models to find the family.")
    model_type: Optional[str] = Field(None, description="Accepted for Axolotl compatibility (AutoModelForCausalLM is used).")
    tokenizer_type: Optional[str] = Field(None, description="Accepted for Axolotl compatibility (AutoTokenizer is used).")
    tokenizer_config: Optional[str] = Field(
        None, description="Hub name or local directory of the tokenizer, when it is not base_model's.")
    tokenizer_legacy: Optional[bool] = Field(
        None, description="Passed as legacy= to the tokenizer's loading where its class takes it (the Llama and T5 "
                          "SentencePiece tokenizers: true keeps their old handling of text after special tokens); "
                          "unset: the tokenizer's own default.")
    tokenizer_use_fast: bool = Field(
        True, description="Load the fast (Rust) tokenizer; chat_template masking needs it (character offsets).")
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run the model's and tokenizer's own Python code from the hub or the directory.")
    revision_of_model: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit) of base_model, used for the model, its config and, "
                          "when it comes from base_model, the tokenizer (Axolotl's alias: model_revision).")
    overrides_of_model_config: dict[str, Any] = Field(
        default_factory=dict, description="Values that replace the base model's config entries when it is loaded "
                                          "(Axolotl's model_config), e.g. {output_router_logits: true}.")
    rope_scaling: Optional[dict[str, Any]] = Field(
        None, description="Rotary scaling for a longer context (Axolotl's key), laid over the base model's own "
                          "rotary parameters (its rope_theta is kept): {type: linear | dynamic | yarn | llama3 | "
                          "longrope, factor: 4.0, ...}, e.g. original_max_position_embeddings for yarn.")
    overrides_of_model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra from_pretrained arguments (Axolotl's model_kwargs).")
    model_quantization_config: Optional[str] = Field(
        None, description="A transformers quantization config class (Mxfp4Config, FineGrainedFP8Config, "
                          "TorchAoConfig, ...), built with model_quantization_config_kwargs and passed to "
                          "from_pretrained as quantization_config (e.g. Mxfp4Config with dequantize: true loads "
                          "gpt-oss's MXFP4 weights in the compute dtype). Excludes load_in_4bit / load_in_8bit and "
                          "gptq. What the class needs (a package, a GPU) is checked against this machine.")
    model_quantization_config_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Arguments of model_quantization_config's class, e.g. {dequantize: true}.")
    gptq: bool = Field(
        False, description="base_model is a GPTQ-quantized checkpoint (its config.json has a gptq "
                           "quantization_config): loaded through transformers' GPTQ integration (needs optimum and "
                           "gptqmodel), for LoRA over it (adapter: lora).")
    gptq_disable_exllama: Optional[bool] = Field(
        None, description="gptq: true keeps the GPTQ kernels off exllama, which has no backward: gptqmodel's "
                          "backend becomes auto_trainable (unless the checkpoint names a backend). Unset or false: "
                          "the checkpoint's backend.")
    device_map: Optional[Union[str, dict[str, Union[int, str]]]] = Field(
        None, description="Passed to from_pretrained to place (split) the model over this machine's devices in one "
                          "process (naive model parallel): auto, balanced, balanced_low_0, sequential, a device "
                          "(cpu, cuda:1), or a map of module names to devices ({'': 0}). Single process only: "
                          "under torchrun or with fsdp / tensor_parallel_size, leave it out.")
    max_memory: Optional[dict[Union[int, str], Union[int, str]]] = Field(
        None, description="Most memory per device for device_map's placement, e.g. {0: 20GiB, cpu: 64GiB} (an int is "
                          "bytes); with no device_map the model is placed as device_map: auto within these limits.")
    gpu_memory_limit: Optional[Union[int, str]] = Field(
        None, description="Most memory each of this machine's GPUs may hold of the model (an int is GiB, or a string "
                          "such as 20GiB), placed as device_map: auto; the rest goes to host memory (Axolotl's key: "
                          "max_memory with this limit for every GPU). Excludes max_memory.")
    flash_optimum: Optional[bool] = Field(
        None, description="Axolotl's BetterTransformer switch: for decoder models it is PyTorch's "
                          "scaled_dot_product_attention, which transformers now runs natively, so true means "
                          "attn_implementation: sdpa (and conflicts with another backend).")
    tokenizer_use_mistral_common: bool = Field(
        False, description="Tokenize with mistral-common (transformers' MistralCommonBackend); needs the "
                           "mistral-common package.")
    unfrozen_parameters: Optional[list[str]] = Field(
        None, description="Regexes of parameter names to train, read as Axolotl reads them: matched at the start "
                          "of the name (re.match; end with $ for the whole name), a dot is a literal dot except in "
                          ".+ (any text); every other parameter is frozen. With an adapter, as in Axolotl, they are matched after the adapter is attached, "
                          "against the adapted model's names (base_model.model.<name>, the adapter's lora_A/lora_B "
                          "included), so they choose which adapter weights train; a base weight is refused there "
                          "(the saved adapter would not hold it).")
    special_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="Special tokens to set on the tokenizer, e.g. {pad_token: '<|pad|>', eos_token: '<|im_end|>'}; new "
                    "ones grow the embeddings.")
    tokens: list[str] = Field(default_factory=list, description="Extra tokens added to the vocabulary.")
    added_tokens_overrides: Optional[dict[int, str]] = Field(
        None, description="Rename added tokens by id, e.g. {128011: '<|eot|>'}: a reserved token becomes your marker "
                          "without growing the vocabulary (added tokens only, as listed in tokenizer.json).")
    chat_template: Optional[str] = Field(
        None, description="tokenizer_default, a template name from any plugin (core: chatml, llama3; "
        "plait-models: gemma, phi_3, qwen3, mistral_v1, alpaca, deepseek_v3, llama4 and more, listed in its README), "
        "tokenizer_default_fallback_<name>, or a jinja string.")
    chat_template_jinja: Optional[str] = Field(
        None, description="A jinja chat template given inline; wins over chat_template.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra variables for the chat template, e.g. {enable_thinking: false}; "
                                          "used when rendering conversations for training and by inference.")
    tokenizer_save_jinja_files: bool = Field(
        True, description="Save the chat template as chat_template.jinja beside the tokenizer (transformers 5's "
                          "layout); false keeps it inside tokenizer_config.json, which older transformers read.")
    eot_tokens: Optional[list[str]] = Field(
        None, description="Tokens that end a turn (e.g. [<end_of_turn>]): chat_template datasets treat exactly these "
                          "(and the EOS) as turn ends for train_on_eot, and inference stops at them. Unset: every "
                          "special token after a message.")
    shrink_embeddings: bool = Field(
        False, description="Shrink the embeddings (and head) to the tokenizer's length when the model has more rows "
                           "than tokens (rounded up to a multiple of 32 with resize_token_embeddings_to_32x); by "
                           "default extra rows are kept.")
    fix_untrained_tokens: Optional[Union[bool, int, list[int]]] = Field(
        None, description="Before training, give tokens with untrained (all-zero) embedding rows that occur in the "
                          "training data the mean of the trained rows, scaled by their frequency relative to the "
                          "most frequent token, in the input embeddings and the head: true finds them; a token id "
                          "or a list of ids also fixes those.")
    resize_token_embeddings_to_32x: bool = Field(
        False, description="When tokens are added, round the embedding rows up to a multiple of 32 (faster matmuls).")
    mean_resizing_embeddings: bool = Field(
        False, description="When the embeddings grow for added tokens, start the new rows (input and head) from the "
                           "old rows' mean and covariance (transformers' mean_resizing) instead of the model's "
                           "initialiser (Axolotl's default, false).")

    # precision and attention
    bf16: Union[bool, Literal["auto", "full"]] = Field(
        "auto",
        description="bfloat16 autocast: auto (where the GPU supports it), true, false, or full (weights and adapters "
                    "kept in bfloat16 too).")
    fp16: bool = Field(False, description="float16 weights and autocast with a loss scaler; excludes bf16: true.")
    tf32: bool = Field(
        False, description="Allow TF32 matmuls on NVIDIA GPUs (faster float32 matmuls, slightly less exact).")
    torch_dtype: Optional[Literal["float32", "bfloat16", "float16", "auto"]] = Field(
        None,
        description="The dtype the weights are loaded in; wins over bf16/fp16 for loading. auto or unset: bfloat16 or "
                    "float16 as bf16/fp16 ask, else float32.")
    flash_attention: bool = Field(
        False,
        description="flash-attn 2 (attn_implementation flash_attention_2; needs the flash-attn package and a GPU); "
                    "varlen kernel for sample_packing.")
    sdp_attention: bool = Field(
        False, description="PyTorch scaled_dot_product_attention (the default when no backend is chosen).")
    flex_attention: bool = Field(
        False,
        description="PyTorch flex attention; with sample_packing it masks across rows with a document block mask.")
    varlen_attention: bool = Field(False, description="PyTorch's varlen attention (torch.nn.attention.varlen; CUDA, "
                                   "needs sample_packing); attn_implementation 'plait_varlen'.")
    sdpa_varlen: Optional[bool] = Field(
        None,
        description="Axolotl's switch for packed SDPA: true runs the packed rows through torch's varlen kernel "
                    "(attn_implementation plait_varlen) where it serves the model: a CUDA GPU, bf16/fp16, head_dim "
                    "up to 256, no attention dropout, soft-capping or attention sinks. Elsewhere it keeps SDPA with "
                    "the block mask (the same attention) and logs why. Unset or false: SDPA with the block mask "
                    "(Axolotl's unset chooses for itself).")
    eager_attention: bool = Field(
        False,
        description="transformers' eager attention (plain matmuls and softmax); exact soft-capping for gemma2, slow "
                    "otherwise.")
    attn_implementation: Optional[str] = Field(
        None, description="Attention backend, Axolotl's key: eager, sdpa, flash_attention_2, flex_attention, "
                          "plait_varlen (torch's varlen kernel), or a hub attention kernel such as "
                          "kernels-community/vllm-flash-attn3 (transformers loads it with the kernels package; CUDA; "
                          "packs like flash_attention_2; another publisher needs use_kernels: true). The booleans flash_attention, sdp_attention, "
                          "flex_attention, eager_attention and varlen_attention are its older form. Unset: sdpa; "
                          "a model that refuses the chosen backend loads with sdpa, else eager (logged).")
    gemma4_hybrid_attn_impl: Optional[bool] = Field(
        None, description="Two attention backends in one model (Axolotl's key, for Gemma 4, whose global layers' "
                          "head dimension of 512 flash-attn cannot run): the sliding-window layers use "
                          "flash_attention_2 and the global (full_attention) layers SDPA, with the packed rows "
                          "kept apart. Needs attn_implementation flash_attention_2 (set when unset) and a model "
                          "with sliding and global layers (layer_types).")
    experts_implementation: Optional[str] = Field(
        None, description="MoE only: the function transformers runs a block's fused experts with (its "
                          "from_pretrained argument): grouped_mm (its default), batched_mm, eager, or a GPU kernel "
                          "(sonicmoe, deepgemm); the accepted names are read from the installed transformers.")
    use_scattermoe: Optional[bool] = Field(
        None, description="Axolotl's KernelsPlugin flag for its ScatterMoE experts kernel (Triton): Plait runs "
                          "experts_implementation grouped_mm instead, the same per-expert products (tokens sorted "
                          "by expert, one grouped GEMM per projection); it wins over experts_implementation. "
                          "Excludes use_sonicmoe.")
    use_sonicmoe: Optional[bool] = Field(
        None, description="Axolotl's KernelsPlugin flag for the SonicMoE experts kernel: experts_implementation "
                          "sonicmoe (transformers' loader of the sonic-moe hub kernel; CUDA, Hopper or newer, the "
                          "kernels package). Excludes use_scattermoe.")
    use_kernels: Optional[bool] = Field(
        None, description="transformers' use_kernels: swap layers for kernels from the Hugging Face hub (needs the "
                          "kernels package; a layer without a kernel for this device keeps its own code). true also "
                          "trusts kernels of any publisher, as in Axolotl; false turns hub kernels off. Unset: "
                          "transformers' default.")
    use_eaft: Optional[bool] = Field(
        None, description="Entropy-aware focal training (Axolotl's EAFT): each trained token's cross-entropy is "
                          "weighted by the entropy of the softmax over its eaft_k largest logits, raised to "
                          "eaft_alpha (no gradient through the weight). Uses core's chunked loss, not a fused kernel.")
    eaft_alpha: float = Field(1.0, ge=0, description="EAFT: the exponent on the entropy weight.")
    eaft_k: int = Field(20, ge=1, description="EAFT: how many of the largest logits the entropy is taken over.")
    accelerator_config: Optional[dict[str, Any]] = Field(
        None, description="The HF Trainer's accelerate settings (Axolotl passes them on): those about how batches "
                          "reach the processes and when gradients synchronise change nothing here and are noted; "
                          "split_batches: true, even_batches: false and other accumulation settings are refused.")
    auto_find_batch_size: Optional[bool] = Field(
        None, description="After an out-of-memory error, start the run again with a smaller micro_batch_size (its "
                          "largest proper divisor) and gradient_accumulation_steps raised to match, so each step "
                          "trains the same rows (Axolotl passes the key to the HF Trainer, which halves the micro-batch "
                          "alone). One process only.")
    cls_model_config: Optional[str] = Field(
        None, description="The transformers config class base_model's config.json is read with, instead of "
                          "AutoConfig (Axolotl's key), e.g. Gemma3TextConfig for the text model of a composite "
                          "checkpoint.")
    reinit_weights: Optional[bool] = Field(
        None, description="Train base_model's architecture from random weights (Axolotl's key, for pretraining from "
                          "scratch): the model is built from its config.json (and model_config) and initialised by "
                          "transformers under seed; no weight file is read.")
    gradient_checkpointing: Union[bool, Literal["unsloth", "offload"]] = Field(
        False, description="Recompute each decoder layer in backward; offload (alias unsloth) also keeps the "
                           "layer inputs in pinned host memory on a GPU, saving layers x tokens x hidden values, "
                           "and lets plait-kernels' LoRA q/k/v/o projections park their outputs there so the "
                           "recompute skips those matmuls.")
    tiled_mlp: bool = Field(
        False, description="Run each decoder layer's dense MLP over shards of the sequence and recompute each shard "
                           "in backward (ALST's tiled MLP), so the [tokens, intermediate] activations of the whole "
                           "sequence never exist at once: for long sequences. Same loss and gradients; one more MLP "
                           "forward. Mixture-of-experts blocks are not tiled.")
    tiled_mlp_num_shards: Optional[int] = Field(
        None, ge=1, description="Shards per sequence for tiled_mlp. Unset: one per 32768 tokens (Axolotl's default).")
    tiled_mlp_use_original_mlp: bool = Field(
        True, description="tiled_mlp runs the model's own MLP forward (true), or the llama layout "
                          "down_proj(act_fn(gate_proj(x)) * up_proj(x)) with the MLP's own modules (false; a "
                          "kernel plugin then leaves the MLP as it is).")
    selective_checkpointing: Optional[Union[bool, SelectiveCheckpointing]] = Field(
        None, description="Within each checkpointed layer, keep the outputs of chosen ops instead of recomputing "
                          "them in backward (Axolotl's): true keeps attention, the costliest part to recompute at long "
                          "sequences, for tokens x hidden values a layer. Needs gradient_checkpointing (non-reentrant).")
    gradient_checkpointing_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to transformers' gradient_checkpointing_enable, e.g. {use_reentrant: false}; offload needs "
                    "non-reentrant.")
    activation_offloading: Union[bool, Literal["legacy", "hidden_states"]] = Field(
        False, description="Axolotl's activation offloading: true, legacy or hidden_states make "
                           "gradient_checkpointing offload (layer inputs kept in pinned host memory).")

    # adapters (the adapter plugin validates its own keys)
    adapter: Optional[Literal["lora", "qlora"]] = Field(
        None,
        description="Train adapters instead of every weight: lora (plait-peft) or qlora (LoRA on a 4-bit base; "
                    "plait-peft and plait-bnb). Unset: full fine-tune.")

    # data
    # each entry validates against its format's model (config.build.entry_union); these are the base
    datasets: list[DatasetEntry] = Field(
        default_factory=list,
        description="The training datasets: a list of entries with path and type (see the datasets[] entries below).")
    test_datasets: list[DatasetEntry] = Field(
        default_factory=list,
        description="Datasets used only for evaluation (instead of a val_set_size split); same entry keys as datasets.")
    streaming: Optional[bool] = Field(
        None, description="Read the datasets: entries as streams (Axolotl's key) and tokenize only as many rows as "
                          "max_steps can train (with sample_packing, the run's tokens); rows past that are never "
                          "read. Needs max_steps.")
    pretraining_dataset: list[PretrainingDatasetConfig] = Field(
        default_factory=list, description="Raw text streamed and tokenized up to what max_steps consumes "
                                          "(instead of datasets:).")
    val_set_size: float = Field(0.0, ge=0, description="Fraction (< 1) or row count (>= 1) held out for eval.")
    dataset_prepared_path: Optional[str] = Field(
        None, min_length=1,
        description="Directory of the tokenized-data cache; default: prepared/ beside output_dir, so runs share it.")
    dataset_processes: Optional[int] = Field(
        None, ge=1, description="Worker processes for tokenizing (datasets' num_proc); default 1.")
    shuffle_merged_datasets: bool = Field(
        True, description="Shuffle the rows of all datasets together after tokenizing (seeded by seed).")
    shuffle_before_merging_datasets: bool = Field(
        False, description="Shuffle each training dataset's rows on its own before they are merged (seeded by "
                           "seed; Axolotl's key); shuffle_merged_datasets then shuffles the merged rows too.")
    dataset_shard_num: Optional[int] = Field(
        None, ge=1, description="Keep one of this many contiguous shards of the merged (and shuffled) training rows, "
                                "before val_set_size splits them (Axolotl's key; with dataset_shard_idx).")
    dataset_shard_idx: Optional[int] = Field(
        None, ge=0, description="Which shard of dataset_shard_num to keep, from 0.")
    skip_bad_rows: bool = Field(
        False,
        description="Drop rows the format cannot read (missing field, unknown role) and count them, instead of stopping"
                    " with the file and row.")
    sequence_len: int = Field(
        2048, ge=8,
        description="Longest row in tokens; longer rows are dropped or cut (excess_length_strategy); with "
                    "sample_packing, the packed sequence length.")
    excess_length_strategy: Literal["drop", "truncate"] = Field(
        "drop",
        description="What to do with a row longer than sequence_len: drop it (counted in plait preprocess) or truncate "
                    "it.")
    train_on_inputs: bool = Field(
        False,
        description="Train on the prompt tokens too (labels not masked); a dataset entry's own train_on_inputs wins.")
    min_sample_len: Optional[int] = Field(
        None, ge=1, description="Drop rows shorter than this many tokens (counted in plait preprocess as too short), "
                                "as sequence_len drops long ones; unset: only rows with nothing to train are dropped.")
    dataset_exact_deduplication: bool = Field(
        False, description="Drop rows whose tokens (input_ids, labels and a format's extras) equal an earlier row's, "
                           "keeping the first: across the training datasets before the val_set_size split (so train "
                           "and eval share no row), and among test_datasets; counted in plait preprocess.")
    curriculum_sampling: bool = Field(
        False, description="Train on the rows in the dataset's order every epoch, no shuffling (one dataset keeps "
                           "its file order; several are mixed when shuffle_merged_datasets is true); with "
                           "sample_packing, bins are filled in row order.")
    group_by_length: bool = Field(
        False, description="Order rows as transformers' length-grouped sampler does: shuffled with seed and epoch, "
                           "then sorted by length within mega-batches of up to 50 optimizer steps, so each "
                           "micro-batch holds rows of similar length (less padding). No effect with sample_packing, "
                           "which plans its own bins (as in Axolotl).")
    sample_packing: bool = Field(
        False,
        description="Pack several rows into each sequence_len sequence, with position ids restarting and attention kept"
                    " within each row.")
    eval_sample_packing: Optional[bool] = Field(
        None, description="Pack the eval set as well; default: the same as sample_packing.")
    pad_to_sequence_len: bool = Field(
        False,
        description="Pad every unpacked micro-batch to sequence_len instead of its longest row (fixed shapes, e.g. for "
                    "torch_compile).")
    sample_packing_bin_size: int = Field(200, ge=1, description="Most rows one packed sequence may hold.")
    sample_packing_sequentially: bool = Field(
        False, description="Pack rows next-fit in their shuffled order (each row into the current sequence while it "
                           "fits) instead of best-fit; with curriculum_sampling the order is the dataset's.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds python, numpy and torch (numpy takes 0 to 2**32 - 1).")

    # batch and schedule
    micro_batch_size: int = Field(1, ge=1, description="Rows (or packed sequences) per forward pass on each process.")
    eval_batch_size: Optional[int] = Field(
        None, ge=1, description="Micro-batch size for evaluation; default: micro_batch_size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches summed into one optimizer step.")
    batch_size: Optional[int] = Field(
        None, ge=1,
        description="Accepted so Axolotl configs load; has no effect in Plait (the global batch is "
                    "micro_batch_size x gradient_accumulation_steps x data-parallel processes).")
    num_epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (fractions allowed); max_steps, when set, wins.")
    max_steps: Optional[int] = Field(
        None, ge=1,
        description="Stop after this many optimizer steps, whatever num_epochs says; required by pretraining_dataset.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate, reached after warm-up.")
    weight_decay: float = Field(
        0.0, ge=0,
        description="Weight decay of the optimizer, applied to weight matrices only (not to biases and 1-D norm "
                    "weights).")
    optimizer: str = Field(
        "adamw_torch",
        description="Optimizer name from the optimizers registry: core has adamw_torch, adamw, adamw_torch_fused, sgd, "
                    "adafactor, adagrad, rmsprop and transformers' optional ones; plugins add more (plait-bnb: "
                    "adamw_8bit, paged_adamw_8bit, ...). An unknown name lists them all.")
    optim_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the optimizer's constructor (e.g. {amsgrad: true}).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's beta1 (first-moment decay).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's beta2 (second-moment decay).")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's epsilon.")
    lr_scheduler: str = Field(
        "cosine",
        description="Learning-rate schedule after warm-up, from the schedulers registry: core has cosine, linear, "
                    "constant, constant_with_warmup, Axolotl's rex and one_cycle (torch's OneCycleLR), and "
                    "transformers' (cosine_with_restarts, polynomial, inverse_sqrt, warmup_stable_decay, ...). An "
                    "unknown name lists them all.")
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Arguments of the schedule, checked against what it takes (cosine: num_cycles; polynomial: lr_end, "
                    "power; warmup_stable_decay: num_decay_steps, ...).")
    warmup_steps: Optional[Union[int, float]] = Field(
        None, ge=0, description="Optimizer steps of linear warm-up from 0 to learning_rate (1 is raised to 2, as "
                                "Axolotl does); a number between 0 and 1 is a fraction of the run's steps, rounded up "
                                "(transformers' warmup_steps, which Axolotl passes it to). Excludes warmup_ratio. With "
                                "neither key: 3% of the run's steps, truncated, at most 100 (Axolotl's default); 0 "
                                "turns warm-up off.")
    warmup_ratio: Optional[float] = Field(
        None, ge=0, lt=1, description="Warm-up as a fraction of the run's steps, truncated to whole steps "
                                      "(int(ratio x steps), a result of 1 raised to 2, as Axolotl counts it); "
                                      "excludes warmup_steps.")
    cosine_min_lr_ratio: Optional[float] = Field(
        None, ge=0, le=1,
        description="cosine: the learning rate decays to this fraction of learning_rate instead of 0.")
    cosine_constant_lr_ratio: Optional[float] = Field(
        None, ge=0, le=1,
        description="cosine (Axolotl): the decay to cosine_min_lr_ratio ends at this fraction of the run's steps and "
                    "the rate stays there for the rest; 0 or blank: the decay spans the whole run.")
    lr_quadratic_warmup: Optional[bool] = Field(
        None, description="Warm up quadratically, (i / w) ** 2 of learning_rate at step i of w, instead of linearly "
                          "(Axolotl's key; Plait's own schedules: cosine, linear, constant, constant_with_warmup).")
    jagged_restart_steps: Optional[int] = Field(
        None, gt=0,
        description="Jagged restarts (Axolotl): every this many optimizer steps the schedule's learning rate is "
                    "annealed down to cosine_min_lr_ratio of itself (0.001 when unset) over "
                    "jagged_restart_anneal_steps and warmed back up over jagged_restart_warmup_steps; the first "
                    "period runs at the schedule's rate. Multiplies whichever lr_scheduler is chosen.")
    jagged_restart_warmup_steps: Optional[int] = Field(
        None, ge=0, description="Jagged restarts: steps of linear warm-up after each restart (unset or 0: 10, as in "
                                "Axolotl).")
    jagged_restart_anneal_steps: Optional[int] = Field(
        None, ge=0, description="Jagged restarts: steps of linear fall before each restart (unset or 0: 1, as in "
                                "Axolotl).")
    embedding_lr: Optional[float] = Field(
        None, gt=0, description="Learning rate of the trainable input-embedding and output-head parameters (the "
                                "peak; the schedule scales it like learning_rate); excludes embedding_lr_scale.")
    embedding_lr_scale: Optional[float] = Field(
        None, gt=0, description="The input-embedding and output-head parameters train at learning_rate times this; "
                                "excludes embedding_lr.")
    lr_groups: Optional[list[LrGroup]] = Field(
        None, description="Per-module learning rates: a list of {name, modules, lr}; a trainable parameter whose "
                          "name contains one of a group's modules (e.g. self_attn.q_proj or layers.0.) trains at "
                          "that group's lr (the first group that matches wins; it beats embedding_lr).")
    neftune_noise_alpha: Optional[float] = Field(
        None, gt=0, description="NEFTune: while training, add uniform noise in [-1, 1] x alpha / sqrt(L x d) to the "
                                "input embeddings (L the row's real length, d the embedding width); never in eval "
                                "or inference. The paper's default is 5 (Axolotl's older name: "
                                "noisy_embedding_alpha).")
    lisa_n_layers: Optional[int] = Field(
        None, ge=1, description="LISA: full fine-tuning where only this many randomly chosen decoder layers train "
                                "(the embeddings, head and norms outside the layers always train); needs "
                                "lisa_step_interval.")
    lisa_step_interval: Optional[int] = Field(
        None, ge=1, description="LISA: choose new layers every this many optimizer steps (the choice follows from "
                                "seed and step, so a resumed run picks the same layers).")
    lisa_layers_attribute: str = Field(
        "model.layers", min_length=1,
        description="LISA: dotted path from the model to its list of decoder layers.")
    max_grad_norm: Optional[float] = Field(
        1.0, ge=0, description="Clip the gradient norm to this; 0: no clipping; blank: 1.0 (as in Axolotl, "
                               "whose blank leaves HF Trainer's default).")
    loss_watchdog_threshold: Optional[float] = Field(
        None,
        description="Stop the run (TrainingError) when the loss exceeds this on loss_watchdog_patience steps in a "
                    "row, before the last of them updates the weights.")
    loss_watchdog_patience: Optional[int] = Field(
        None, ge=1, description="High-loss steps in a row that stop the run (default 3, as in Axolotl); the last "
                                "is not applied.")
    defer_step_read: bool = Field(
        True, description="Read a step's loss and metrics on the host during the next step, once that step's "
                          "backward pass is queued, so the accelerator is not left idle between steps while the "
                          "host logs and prepares the next one. Applies where the loss check runs on the device "
                          "(one process, torch's fused Adam/AdamW, no fp16 loss scaler); weights, metrics and "
                          "stops (NaN, loss_watchdog_threshold) are the same. false: read every step at its end, "
                          "as every other run does.")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop when the eval loss has not improved on its best for this many evaluations "
                                "in a row.")

    # launching through Ray Train (plait[ray]) instead of torchrun: plait.train.ray_launch
    use_ray: bool = Field(
        False, description="Run training on a Ray cluster: plait train starts ray_num_workers Ray Train workers "
                           "(TorchTrainer), each one process of the distributed run as under torchrun (one GPU each "
                           "where CUDA is available, else gloo on CPUs). Needs the ray[train] package (plait[ray]); "
                           "joins the cluster at RAY_ADDRESS, else starts a local one. Not under torchrun.")
    ray_num_workers: int = Field(
        1, ge=1, description="How many Ray Train workers (processes of the distributed run) use_ray starts.")
    resources_per_worker: Optional[dict[str, float]] = Field(
        None, description="Ray resources each worker reserves, e.g. {GPU: 1, CPU: 4}; default: one GPU each where "
                          "CUDA is available (Axolotl's {GPU: 1}), else one CPU. Only with use_ray.")
    ray_run_name: Optional[str] = Field(
        None, min_length=1, description="Name of the Ray Train run; Ray keeps its run state under "
                                        "output_dir/ray/<name>. Only with use_ray.")

    # evaluation, logging, checkpoints
    output_dir: str = Field(
        "./outputs", min_length=1,
        description="Where the model, checkpoints, metrics.jsonl, report.json and loss.png are written.")
    logging_steps: int = Field(
        1, ge=1, description="Write a metrics record every this many steps (and at the last step).")
    eval_steps: Optional[Union[int, float]] = Field(
        None,
        description="Evaluate every this many steps (a value below 1: that fraction of the run); wins over "
                    "evals_per_epoch.")
    evals_per_epoch: Optional[int] = Field(None, ge=0, description="Evaluate this many times per epoch (0: none).")
    save_steps: Optional[Union[int, float]] = Field(
        None, description="Write a checkpoint every this many steps (a value below 1: that fraction of the run).")
    saves_per_epoch: Optional[int] = Field(None, ge=0, description="Write this many checkpoints per epoch (0: none).")
    ddp_timeout: Optional[int] = Field(
        None, gt=0, description="Seconds a collective waits for the other processes of a multi-process run before "
                                "it fails (the process group's timeout; Axolotl's key). Unset: torch's default, 10 "
                                "minutes with NCCL, 30 with gloo; raise it when one rank prepares data for long.")
    dataloader_drop_last: bool = Field(
        False, description="Leave out each epoch's last micro-batch when it holds fewer rows (packed: bins) than "
                           "micro_batch_size, in training and evaluation (transformers' meaning).")
    save_first_step: bool = Field(
        False, description="Also write a checkpoint after the first step, whatever else decides when to save "
                           "(Axolotl's key: shows within a step that this config's checkpoints save and resume).")
    eval_strategy: Optional[Literal["no", "steps", "epoch"]] = Field(
        None, description="When to evaluate, transformers' meaning: no (never, not even at the end), steps (every "
                          "eval_steps; unset: every logging_steps, as in transformers) or epoch (evals_per_epoch: 1). "
                          "Unset: eval_steps / evals_per_epoch decide.")
    evaluation_strategy: Optional[Literal["no", "steps", "epoch"]] = Field(
        None, description="The older name of eval_strategy (same values).")
    save_strategy: Optional[Literal["no", "steps", "epoch", "best"]] = Field(
        None, description="When to write checkpoints, transformers' meaning: no (never), steps (every save_steps; "
                          "unset: 500, transformers' default), epoch (saves_per_epoch: 1) or best (after each "
                          "evaluation whose metric_for_best_model beats every earlier one). Unset: save_steps / "
                          "saves_per_epoch decide.")
    metric_for_best_model: Optional[Literal["eval_loss", "loss"]] = Field(
        None, description="The metric save_strategy: best and load_best_model_at_end compare: eval_loss (loss is "
                          "the same, transformers adds the eval_ prefix); lower is better.")
    load_best_model_at_end: bool = Field(
        False, description="At the end of training, load the weights of the checkpoint whose evaluation had the "
                           "lowest eval_loss and save those as the final model (transformers' meaning). Needs "
                           "evaluations and checkpoints during training, an evaluation at every checkpoint (the "
                           "save interval a multiple of the eval interval, or save_strategy: best); "
                           "save_total_limit never removes that checkpoint.")
    do_causal_lm_eval: Optional[bool] = Field(
        None, description="At each evaluation, also generate a completion (greedy, eval_max_new_tokens) for every "
                          "eval row's prompt (the tokens before its first trained token) and score it against the "
                          "row's trained tokens with eval_causal_lm_metrics, logged as eval_<metric> (Axolotl's "
                          "meaning). Not with a sharded model (fsdp, tensor or context parallel).")
    eval_causal_lm_metrics: Optional[list[str]] = Field(
        None, description="What do_causal_lm_eval scores: sacrebleu (corpus BLEU), ter, chrf (all three through the "
                          "sacrebleu package) and perplexity (the model's on the reference completions alone). "
                          "Unset: sacrebleu, ter, chrf (Axolotl's list without comet, which downloads a scoring "
                          "model; comet is refused).")
    eval_max_new_tokens: Optional[int] = Field(
        None, ge=1, description="Most tokens generated per prompt by do_causal_lm_eval and eval_table_size "
                                "(unset: 128, as in Axolotl).")
    eval_table_size: Optional[int] = Field(
        None, ge=0, description="At each evaluation, generate completions for the first this many eval rows and "
                                "write prompt, reference and prediction to eval_predictions.jsonl in output_dir "
                                "(and a table to W&B / MLflow when they log the run); 0 or unset: none.")
    generate_samples: bool = Field(
        False, description="At each evaluation, continue num_generation_samples rows (eval rows, else training rows) "
                           "from their first generation_prompt_ratio of tokens, print them and append them to "
                           "generation_samples.jsonl in output_dir.")
    num_generation_samples: int = Field(3, ge=1, description="Rows generate_samples continues at each evaluation.")
    generation_max_new_tokens: int = Field(50, ge=1, description="Most tokens generate_samples generates a row.")
    generation_temperature: float = Field(
        0.7, ge=0, description="Sampling temperature of generate_samples (0: greedy).")
    generation_top_p: Optional[float] = Field(
        None, gt=0, le=1, description="Nucleus sampling of generate_samples (unset: off).")
    generation_top_k: Optional[int] = Field(None, ge=1, description="Top-k sampling of generate_samples (unset: off).")
    generation_prompt_ratio: float = Field(
        0.5, ge=0, le=1, description="Share of a row's tokens generate_samples gives as the prompt (at least one).")
    generation_do_sample: bool = Field(True, description="Sample in generate_samples; false decodes greedily.")
    greater_is_better: Optional[bool] = Field(
        None, description="Whether a higher metric_for_best_model is better; the eval loss is better lower, so only "
                          "false is accepted.")
    save_total_limit: Optional[int] = Field(None, ge=1, description="Keep only the newest this many checkpoints.")
    save_safetensors: bool = Field(
        True,
        description="Accepted so Axolotl configs load; has no effect in Plait (weights are always saved as "
                    "safetensors).")
    resume_from_checkpoint: Optional[str] = Field(
        None, min_length=1,
        description="A checkpoint-<step> directory to continue from: weights, optimizer (unless it was saved with "
                    "save_only_model), schedule, RNG and data position.")
    save_only_model: bool = Field(
        False, description="Checkpoints hold the weights (with the schedule, RNG and data position) but no optimizer "
                           "state, a fraction of the size; resuming from one starts the optimizer fresh, and the "
                           "run says so.")
    auto_resume_from_checkpoints: bool = Field(
        False, description="Continue from the newest checkpoint in output_dir when there is one.")
    profiler_steps: Optional[int] = Field(
        None, ge=1, description="Profile this many optimizer steps with torch.profiler: a Chrome trace in "
                                "output_dir/profiler_trace.json (and, on a GPU, the CUDA allocator's history in "
                                "snapshot.pickle).")
    profiler_steps_start: int = Field(0, ge=0, description="Optimizer steps done before profiling starts (0: the "
                                                           "first step is profiled).")
    dynamic_checkpoint: Optional[DynamicCheckpoint] = Field(
        None, description="Save a checkpoint on request while training: touch output_dir/.axolotl_save_checkpoint "
                          "(or trigger_file_path); looked for every check_interval steps ({enabled: true, "
                          "check_interval: 100}).")
    save_on_signals: list[str] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        description="Signals that save a checkpoint at the next step boundary and stop the run (a scheduler "
                    "preempting it); [] turns this off. Accepted: SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP.")
    use_tensorboard: bool = Field(
        False, description="Log metrics to TensorBoard under output_dir/runs (needs plait[tensorboard]).")
    wandb_project: Optional[str] = Field(None, description="Log to this Weights & Biases project (needs plait[wandb]).")
    wandb_entity: Optional[str] = Field(None, description="Weights & Biases entity (team or user) of the run.")
    wandb_name: Optional[str] = Field(None, description="Weights & Biases run name.")
    wandb_mode: Optional[str] = Field(None, description="Weights & Biases mode: online, offline or disabled.")
    use_wandb: Optional[bool] = Field(None, description="false turns W&B off even with wandb_project set.")
    wandb_run_id: Optional[str] = Field(None, description="W&B run id (resumes that run; also its name when "
                                                          "wandb_name is unset, as in Axolotl).")
    wandb_watch: Optional[Literal["gradients", "parameters", "all", "false"]] = Field(
        None, description="wandb.watch the model: gradients, parameters or all histograms.")
    wandb_log_model: Optional[Literal["checkpoint", "end", "false"]] = Field(
        None, description="Upload the saved model to W&B Artifacts: end (the final model) or checkpoint (each "
                          "checkpoint and the final model).")
    use_trackio: Optional[bool] = Field(None, description="false turns trackio off even with trackio_project_name.")
    trackio_project_name: Optional[str] = Field(None, description="Log to trackio under this project.")
    trackio_run_name: Optional[str] = Field(None, description="trackio run name.")
    trackio_space_id: Optional[str] = Field(None, description="Hugging Face Space that hosts the trackio dashboard.")
    # SwanLab: Axolotl's swanlab integration (plugins: axolotl.integrations.swanlab.SwanLabPlugin), core here
    use_swanlab: Optional[bool] = Field(
        None, description="false turns SwanLab off even with swanlab_project; true needs swanlab_project (as in "
                          "Axolotl, swanlab_project alone turns it on).")
    swanlab_project: Optional[str] = Field(
        None, description="Log to this SwanLab project (needs plait[swanlab]).")
    swanlab_experiment_name: Optional[str] = Field(None, description="SwanLab experiment (run) name.")
    swanlab_description: Optional[str] = Field(None, description="SwanLab experiment description.")
    swanlab_mode: Optional[Literal["cloud", "local", "offline", "disabled"]] = Field(
        None, description="cloud (sync to SwanLab's server, the default), local (local only), offline (save "
                          "locally for a later `swanlab sync`) or disabled.")
    swanlab_workspace: Optional[str] = Field(None, description="SwanLab workspace (organization or user name).")
    swanlab_api_key: Optional[str] = Field(
        None, description="SwanLab API key (else SWANLAB_API_KEY or `swanlab login`).")
    swanlab_web_host: Optional[str] = Field(None, description="Web address of a private SwanLab deployment.")
    swanlab_api_host: Optional[str] = Field(None, description="API address of a private SwanLab deployment.")
    swanlab_lark_webhook_url: Optional[str] = Field(
        None, description="Lark (Feishu) webhook that SwanLab notifies when the run starts and ends.")
    swanlab_lark_secret: Optional[str] = Field(
        None, description="Secret that signs the Lark notifications (HMAC).")
    swanlab_log_completions: bool = Field(
        True, description="Under rl (preference tuning), log a SwanLab table (rlhf_completions) of the trained "
                          "units: prompt, chosen and rejected with the reward margin (KTO: completion, label, "
                          "reward). Without rl there are no completions to log, as in Axolotl.")
    swanlab_completion_log_interval: int = Field(
        100, ge=1, description="Log the completion table every this many steps (and what is left at the end).")
    swanlab_completion_max_buffer: int = Field(
        128, ge=1, description="Keep at most this many completions (the newest) between two tables.")
    # Comet (Axolotl passes these to transformers' Comet callback)
    use_comet: Optional[bool] = Field(
        None, description="Log to Comet (needs plait[comet]); comet_project_name alone turns it on, false turns it "
                          "off.")
    comet_api_key: Optional[str] = Field(None, description="Comet API key (else COMET_API_KEY or `comet login`).")
    comet_workspace: Optional[str] = Field(None, description="Comet workspace (default: the user's own).")
    comet_project_name: Optional[str] = Field(None, description="Comet project (default: Uncategorized).")
    comet_experiment_key: Optional[str] = Field(
        None, description="Key of the Comet experiment: appends to that experiment, or names a new one.")
    comet_mode: Optional[Literal["get_or_create", "get", "create"]] = Field(
        None, description="create a new Comet experiment, get (log to) an existing one, or get_or_create (the "
                          "default).")
    comet_online: Optional[bool] = Field(
        None, description="false stores the Comet experiment offline (an archive for `comet upload`) instead of "
                          "sending it.")
    comet_experiment_config: Optional[dict[str, Any]] = Field(
        None, description="Comet's experiment settings by Axolotl's names (name, tags, offline_directory, "
                          "log_code, auto_metric_logging, comet_disabled, ...).")
    # OpenTelemetry metrics, served for Prometheus to scrape
    use_otel_metrics: bool = Field(
        False, description="Export the training metrics through OpenTelemetry on a Prometheus endpoint "
                           "(http://otel_metrics_host:otel_metrics_port/metrics; needs plait[otel]).")
    otel_metrics_host: str = Field("localhost", min_length=1,
                                   description="Address the OpenTelemetry metrics endpoint listens on.")
    otel_metrics_port: int = Field(8000, ge=0, le=65535,
                                   description="Port of the OpenTelemetry metrics endpoint (0: a free port, "
                                               "printed at the start).")
    hub_model_id: Optional[str] = Field(
        None, description="Push output_dir to this Hugging Face hub repository (user/name) at the end of training.")
    hub_strategy: Optional[Literal["end"]] = Field(
        None, description="When to push: end (the only strategy Plait has: the final model once).")
    hub_private_repo: Optional[bool] = Field(None, description="Create the hub repository private.")
    hub_revision: Optional[str] = Field(
        None, min_length=1, description="Push to this branch of hub_model_id (created from main if missing) instead "
                                        "of main.")
    mlflow_tracking_uri: Optional[str] = Field(
        None, description="Log to the MLflow server (or path) at this URI (needs plait[mlflow]).")
    mlflow_experiment_name: Optional[str] = Field(None, description="MLflow experiment to log the run under.")
    use_mlflow: Optional[bool] = Field(
        None, description="true logs to MLflow at its default location (MLFLOW_TRACKING_URI, else ./mlruns) "
                          "without a URI or experiment; false turns MLflow off even with them set.")
    mlflow_run_name: Optional[str] = Field(None, description="Name of the MLflow run (default: MLflow's own).")
    hf_mlflow_log_artifacts: Optional[bool] = Field(
        None, description="Copy each saved checkpoint (as checkpoint-<step>) and the final model's files (as "
                          "model) into the MLflow run's artifacts.")
    strict: bool = Field(False, description="Accepted so Axolotl configs load; has no effect in Plait.")

    # where each value came from: key path -> "default" | "file" | "override" | "plugin:<name>"
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    # the run's plugin manager, like pytest's ``config.pluginmanager``: hookimpls
    # that need other plugins' answers (model families, say) reach it from cfg
    _pm: Any = PrivateAttr(default=None)
    # no-op keys the config set (plait.config.axolotl_keys.NO_OP_KEYS) and validation's notes
    _ignored_keys: list[str] = PrivateAttr(default_factory=list)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _activation_offloading(cls, data):
        """``activation_offloading`` is Plait's ``gradient_checkpointing: offload``."""
        if isinstance(data, dict) and data.get("activation_offloading") not in (None, False):
            from plait.errors import ConfigError

            if data["activation_offloading"] == "disk":
                raise ConfigError("config key 'activation_offloading': 'disk' (offloading to disk) is not available "
                                  "in Plait; accepted: true, legacy, hidden_states (pinned host memory)")
            if data.get("gradient_checkpointing") is False:
                raise ConfigError(f"config key 'activation_offloading': {data['activation_offloading']!r} offloads "
                                  "the inputs of checkpointed layers and needs gradient_checkpointing; set "
                                  "gradient_checkpointing: true (or remove activation_offloading)")
            if data.get("gradient_checkpointing") not in ("offload", "unsloth"):
                data = {**data, "gradient_checkpointing": "offload"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _strategies(cls, data):
        """``save_strategy`` / ``eval_strategy`` (and its older name) onto the
        interval keys, as transformers reads them; contradictions are refused."""
        if isinstance(data, dict):
            from plait.config.strategies import apply_strategies

            data = apply_strategies(data)
        return data

    @model_validator(mode="before")
    @classmethod
    def _attention_backend(cls, data):
        """One backend from ``attn_implementation`` and the older booleans, kept
        in step both ways (code reads either)."""
        if isinstance(data, dict):
            from plait.model.names import ATTENTION_FLAGS, resolve_attention

            data = dict(data)
            hybrid = data.get("gemma4_hybrid_attn_impl") is True
            if hybrid and data.get("attn_implementation") is None and not any(
                    data.get(flag) for flag in ATTENTION_FLAGS.values()):
                data["attn_implementation"] = "flash_attention_2"  # as in Axolotl: the sliding layers' backend
            data.update(resolve_attention(data))
            if hybrid and data["attn_implementation"] != "flash_attention_2":
                from plait.errors import ConfigError

                raise ConfigError(f"config key 'gemma4_hybrid_attn_impl': true runs the sliding-window layers with "
                                  f"flash_attention_2 and the global ones with SDPA, and attn_implementation is "
                                  f"{data['attn_implementation']!r}; set attn_implementation: flash_attention_2 "
                                  f"(or remove gemma4_hybrid_attn_impl)")
        return data

    @property
    def attention_chosen(self) -> bool:
        """Whether the config names a backend (unset: Plait may pick one that
        the model supports, e.g. eager for Gemma 2)."""
        return (any(getattr(self, flag) for flag in ATTENTION_FLAGS.values())
                or self.attn_implementation not in (None, *ATTENTION_FLAGS))  # a hub kernel

    @field_validator("wandb_watch", "wandb_log_model", mode="before")
    @classmethod
    def _false_means_off(cls, value):
        return "false" if value is False else value

    @field_validator("hub_model_id")
    @classmethod
    def _repo_id(cls, value):
        """The hub's own syntax check, no network."""
        if value is not None:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            from plait.errors import ConfigError

            try:
                validate_repo_id(value)
            except HFValidationError as exc:
                raise ConfigError(f"config key 'hub_model_id': {value!r} is not a hub repository id "
                                  f"(user/name): {exc}") from None
            if "/" not in value:
                raise ConfigError(f"config key 'hub_model_id': {value!r} needs its owner: user/name or org/name")
        return value

    @field_validator("eval_steps", "save_steps")
    @classmethod
    def _positive_interval(cls, value):
        if value is not None and not value > 0:
            raise ValueError("give a number of steps >= 1, or a fraction of the run between 0 and 1")
        return value

    @field_validator("eval_causal_lm_metrics")
    @classmethod
    def _generation_metric_names(cls, names):
        if names:
            from plait.config.generation_keys import check_metric_names

            check_metric_names(names)
        return names

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_steps_count_or_fraction(cls, value):
        """A whole number of steps, or a fraction of the run below 1 (``0.1``);
        ``2.5`` is neither."""
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            if value > 1:
                raise ValueError("give a whole number of steps, or a fraction of the run between 0 and 1")
        return value

    @field_validator("save_on_signals")
    @classmethod
    def _signal_names(cls, names):
        normalized = [name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper() for name in names]
        unknown = [name for name, norm in zip(names, normalized) if norm not in ACCEPTED_SIGNALS]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} not accepted; accepted: {', '.join(ACCEPTED_SIGNALS)}")
        return normalized

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_strings(cls, value):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value

    @model_validator(mode="after")
    def _cross_key_rules(self):
        from plait.errors import ConfigError

        if self.fp16 and self.bf16 is True:
            raise ConfigError("bf16: true and fp16: true are both set; choose one (set the other to false).")
        if self.early_stopping_patience and not (self.val_set_size > 0 or self.test_datasets):
            raise ConfigError("config key 'early_stopping_patience' watches the eval loss, and this config has no "
                              "eval set; set val_set_size or test_datasets")
        if self.early_stopping_patience and not (self.eval_steps or self.evals_per_epoch):
            raise ConfigError("config key 'early_stopping_patience' counts evaluations during training; set "
                              "eval_steps or evals_per_epoch")
        if not self.tiled_mlp and (self.tiled_mlp_num_shards or self.tiled_mlp_use_original_mlp is False):
            key = "tiled_mlp_num_shards" if self.tiled_mlp_num_shards else "tiled_mlp_use_original_mlp"
            raise ConfigError(f"config key {key!r}: {getattr(self, key)!r} sets how tiled_mlp tiles the MLP, and "
                              f"tiled_mlp is off; set tiled_mlp: true or remove {key}")
        self._data_order_rules()
        if (self.dataset_shard_num is None) != (self.dataset_shard_idx is None):
            given = "dataset_shard_num" if self.dataset_shard_num is not None else "dataset_shard_idx"
            raise ConfigError(f"config key {given!r} is set without the other of dataset_shard_num / "
                              f"dataset_shard_idx; set both (keep shard dataset_shard_idx of dataset_shard_num)")
        if self.dataset_shard_num is not None and self.dataset_shard_idx >= self.dataset_shard_num:
            raise ConfigError(f"config key 'dataset_shard_idx': {self.dataset_shard_idx} is not accepted; shards "
                              f"are numbered 0 to {self.dataset_shard_num - 1} (dataset_shard_num: "
                              f"{self.dataset_shard_num})")
        self._strategy_rules()
        self._ray_rules()
        from plait.model.rope_scaling import merged_rope_parameters, scaling_asked

        asked = scaling_asked(self)
        if asked is not None:  # the rotary type now; its merge with the base's parameters at load
            merged_rope_parameters(*asked, None)
        if self.embedding_lr is not None and self.embedding_lr_scale is not None:
            raise ConfigError(f"embedding_lr ({self.embedding_lr}) and embedding_lr_scale ({self.embedding_lr_scale}) "
                              "are both set; give one of them")
        if self.lr_groups:
            names = [group.name for group in self.lr_groups]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ConfigError(f"config key 'lr_groups': the name(s) {twice} are used twice; give each group "
                                  "its own name")
        if (self.lisa_n_layers is None) != (self.lisa_step_interval is None):
            given, missing = (("lisa_n_layers", "lisa_step_interval") if self.lisa_step_interval is None
                              else ("lisa_step_interval", "lisa_n_layers"))
            raise ConfigError(f"config key {given!r} turns LISA on together with {missing!r}, which is not set; "
                              f"set both (e.g. lisa_n_layers: 4, lisa_step_interval: 20) or neither")
        if self.lisa_n_layers is None and self.lisa_layers_attribute != "model.layers":
            raise ConfigError(f"config key 'lisa_layers_attribute': {self.lisa_layers_attribute!r} tells LISA where "
                              "the layers are, and LISA is off; set lisa_n_layers and lisa_step_interval, or remove it")
        if self.lisa_n_layers is not None and self.adapter is not None:
            raise ConfigError(f"config key 'lisa_n_layers': LISA trains chosen decoder layers in full and adapter is "
                              f"{self.adapter!r}; remove adapter (LISA is full fine-tuning) or the lisa_* keys")
        if self.lisa_n_layers is not None and self.unfrozen_parameters:
            raise ConfigError("config keys 'lisa_n_layers' and 'unfrozen_parameters' both choose what trains; "
                              "keep one of them")
        if self.fix_untrained_tokens not in (None, False) and self.adapter is not None and not getattr(
                self, "lora_modules_to_save", None):
            raise ConfigError("config key 'fix_untrained_tokens' changes rows of the base model's embeddings and "
                              f"head, which adapter: {self.adapter} does not save; add them to lora_modules_to_save "
                              "(e.g. [embed_tokens, lm_head]) or train without an adapter")
        if isinstance(self.fix_untrained_tokens, list) and not self.fix_untrained_tokens:
            raise ConfigError("config key 'fix_untrained_tokens': [] names no token; give true (find them) or ids")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError("warmup_steps and warmup_ratio are both set; give one of them.")
        if self.gradient_checkpointing in ("offload", "unsloth") and self.gradient_checkpointing_kwargs.get(
                "use_reentrant"):
            # offloading rides on the saved-tensor hooks, which reentrant checkpointing bypasses
            raise ConfigError(f"gradient_checkpointing: {self.gradient_checkpointing} needs non-reentrant "
                              "checkpointing; remove use_reentrant: true from gradient_checkpointing_kwargs")
        self._selective_checkpointing_rules()
        from plait.config.accelerator_keys import check_accelerator_config

        check_accelerator_config(self)
        if self.use_eaft and (getattr(self, "rl", None) or getattr(self, "reward_model", None)):
            raise ConfigError("config key 'use_eaft' weights the next-token cross-entropy of supervised training; "
                              "preference and reward training have their own losses. Remove use_eaft")
        # a stream has no length: the run's length decides how much of it is read, and it cannot be split
        streamed = None  # (what reads a stream, what cannot be split)
        if self.pretraining_dataset:
            streamed = ("'pretraining_dataset' streams its text", "a streamed pretraining_dataset")
        elif self.streaming:
            streamed = ("'streaming': true reads the datasets as streams", "streamed datasets (streaming: true)")
        if streamed and self.max_steps is None:
            raise ConfigError(f"config key {streamed[0]} and needs max_steps (the number of optimizer steps decides "
                              f"how much of the stream is read); set max_steps")
        if self.pretraining_dataset and self.datasets:
            raise ConfigError("config keys 'pretraining_dataset' and 'datasets' are both set; train on one of "
                              "them (type: pretraining under datasets: tokenizes a whole local corpus instead)")
        if streamed and self.val_set_size > 0:
            raise ConfigError(f"config key 'val_set_size' cannot split {streamed[1]}; set val_set_size: 0 and give "
                              f"test_datasets for evaluation")
        if self.streaming:
            sharded = [f"datasets.{i}" for i, entry in enumerate(self.datasets) if getattr(entry, "shards", None)]
            if sharded:
                raise ConfigError(f"config key 'shards' of {', '.join(sharded)} splits a dataset it has read whole, and "
                                  f"streaming: true reads the datasets as streams; remove one of them")
        return self

    def _ray_rules(self) -> None:
        """The Ray keys: only with use_ray, and resources that Ray can count."""
        from plait.errors import ConfigError

        if not self.use_ray:
            given = [key for key, unset in (("ray_num_workers", 1), ("resources_per_worker", None),
                                            ("ray_run_name", None)) if getattr(self, key) != unset]
            if given:
                raise ConfigError(f"config key{'s' if len(given) > 1 else ''} {', '.join(repr(k) for k in given)} "
                                  f"{'configure' if len(given) > 1 else 'configures'} Ray training, and use_ray is "
                                  f"off; set use_ray: true or remove {' and '.join(given)}")
        for name, amount in (self.resources_per_worker or {}).items():
            if not name or amount < 0:
                raise ConfigError(f"config key 'resources_per_worker': {{{name!r}: {amount!r}}} is not a resource "
                                  "Ray can reserve; give resource names (CPU, GPU, memory, a custom one) with "
                                  "amounts >= 0, e.g. {GPU: 1, CPU: 4}")

    def _data_order_rules(self) -> None:
        """min_sample_len, dataset_exact_deduplication, curriculum_sampling, group_by_length."""
        from plait.errors import ConfigError

        if self.min_sample_len and self.min_sample_len > self.sequence_len and self.excess_length_strategy == "drop":
            raise ConfigError(f"config key 'min_sample_len': {self.min_sample_len} is above sequence_len "
                              f"({self.sequence_len}), so every row would be dropped (too short or too long); "
                              f"lower min_sample_len or raise sequence_len")
        if self.pretraining_dataset:
            for key in ("min_sample_len", "dataset_exact_deduplication"):
                if getattr(self, key):
                    raise ConfigError(f"config key '{key}' filters the rows of datasets:; a streamed "
                                      f"pretraining_dataset is cut into sequence_len chunks and has no rows to "
                                      f"filter (as in Axolotl); remove {key}")
        if self.curriculum_sampling and self.group_by_length:
            raise ConfigError("config keys 'curriculum_sampling' (rows in dataset order) and 'group_by_length' "
                              "(rows reordered by length) ask for different orders; set one of them to false")
        if self.sdpa_varlen and not self.sample_packing:
            self.add_note("sdpa_varlen changes nothing without sample_packing: it routes packed rows only "
                          "(as in Axolotl)")
        elif self.sdpa_varlen and self.attn_implementation != "sdpa":
            self.add_note(f"sdpa_varlen changes nothing with attn_implementation {self.attn_implementation!r}: it "
                          f"routes packed SDPA only")
        if self.group_by_length and self.sample_packing:
            self.add_note("group_by_length changes nothing with sample_packing: packing plans its own bins of rows "
                          "(as in Axolotl, whose packing sampler replaces the length-grouped one)")
        if self.curriculum_sampling and len(self.datasets) > 1 and self.shuffle_merged_datasets:
            self.add_note("curriculum_sampling with several datasets: their rows are mixed (shuffle_merged_datasets"
                          " is true, as in Axolotl) and then trained in that order every epoch; set "
                          "shuffle_merged_datasets: false to train them one after the other")

    @field_validator("selective_checkpointing")
    @classmethod
    def _selective_checkpointing_block(cls, value):
        """``true`` is the block's defaults (keep attention); ``false`` is unset."""
        if value is True:
            return SelectiveCheckpointing()
        return None if value is False else value

    def _selective_checkpointing_rules(self) -> None:
        from plait.errors import ConfigError

        sac = self.selective_checkpointing
        if sac is None:
            return
        if not self.gradient_checkpointing:
            raise ConfigError("config key 'selective_checkpointing' chooses what a checkpointed layer keeps, and "
                              "gradient_checkpointing is off; set gradient_checkpointing: true (or remove "
                              "selective_checkpointing)")
        if self.gradient_checkpointing_kwargs.get("use_reentrant"):
            raise ConfigError("config key 'selective_checkpointing' needs non-reentrant checkpointing; remove "
                              "use_reentrant: true from gradient_checkpointing_kwargs")
        matmuls = [entry for entry in sac.save if entry != "attention"
                   and any(entry in op for op in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"))]
        if matmuls and self.adapter:
            # the adapter's update is added to the base projection's output in place (peft, plait-kernels),
            # which would change an output kept for the recompute
            raise ConfigError(f"config key 'selective_checkpointing.save': {matmuls} keep matmul outputs, which "
                              f"adapter: {self.adapter} changes in place; keep [attention] or train without an "
                              f"adapter")

    def _strategy_rules(self) -> None:
        """What save_strategy / eval_strategy need beyond the interval keys (see plait.config.strategies)."""
        from plait.errors import ConfigError

        has_eval_set = self.val_set_size > 0 or bool(self.test_datasets)
        key = "evaluation_strategy" if self.evaluation_strategy is not None else "eval_strategy"
        if self.eval_strategy in ("steps", "epoch") and not has_eval_set:
            raise ConfigError(f"config key '{key}': {self.eval_strategy!r} evaluates, and this config has no eval "
                              f"set; set val_set_size or test_datasets (or eval_strategy: no)")
        if self.greater_is_better:
            raise ConfigError("config key 'greater_is_better': true is not accepted; the metric Plait compares is "
                              "the eval loss, which is better lower (accepted: false)")
        if self.save_strategy == "best":
            if not has_eval_set or not (self.eval_steps or self.evals_per_epoch):
                raise ConfigError("config key 'save_strategy': 'best' saves after evaluations that improve "
                                  "metric_for_best_model, and this config does not evaluate during training; set "
                                  "val_set_size (or test_datasets) and eval_strategy, eval_steps or evals_per_epoch")
        if self.load_best_model_at_end:
            if not has_eval_set or not (self.eval_steps or self.evals_per_epoch) or self.eval_strategy == "no":
                raise ConfigError("config key 'load_best_model_at_end': true loads the checkpoint with the best "
                                  "evaluation, and this config does not evaluate during training; set val_set_size "
                                  "(or test_datasets) and eval_strategy, eval_steps or evals_per_epoch")
            if self.save_strategy == "no" or not (self.save_steps or self.saves_per_epoch
                                                  or self.save_strategy == "best"):
                raise ConfigError("config key 'load_best_model_at_end': true loads the best checkpoint, and this "
                                  "config writes no checkpoints during training; set save_steps or saves_per_epoch "
                                  "(a multiple of the eval interval), or save_strategy: best")
        elif self.save_strategy != "best" and self.metric_for_best_model is not None:
            self.add_note("metric_for_best_model is read by save_strategy: best and load_best_model_at_end only; it "
                          "changes nothing here")

    # ------------------------------------------------------------ helpers

    @property
    def ignored_keys(self) -> list[str]:
        """Keys the config sets that change nothing in Plait (``plait train`` names them once)."""
        return list(self._ignored_keys)

    @property
    def notes(self) -> list[str]:
        """What validation noticed without refusing (``plait config validate`` prints them)."""
        return list(self._notes)

    def add_note(self, line: str) -> None:
        """Something validation noticed without refusing (a translated key, say):
        ``plait config validate`` prints it, ``plait train`` logs it at the start."""
        if line not in self._notes:
            self._notes.append(line)

    @property
    def plugin_manager(self):
        """The plugin manager of the run this config belongs to."""
        return self._pm

    def source_of(self, key: str) -> str:
        """Where the value of ``key`` (a dotted path) came from."""
        return self._sources.get(key, "default")

    def set_by_plugin(self, key: str, value: Any, plugin: str) -> None:
        """Let a plugin fill in a key, recording that it did (``plait config explain``)."""
        setattr(self, key, value)
        self._sources[key] = f"plugin:{plugin}"
