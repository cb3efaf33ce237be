"""Core's configuration keys, named as in Axolotl so existing configs carry over.

Plugins add their own keys through the ``config_schema`` hook; see
:mod:`plait.config.build` for how the models are combined.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

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
    split: str = "train"
    data_files: Optional[Union[str, list[str]]] = None
    ds_type: Optional[str] = Field(None, description="File type when the extension does not tell.")
    revision: Optional[str] = None
    text_column: str = Field("text", description="The column holding the text.")
    type: Optional[str] = Field(None, description="Accepted for Axolotl compatibility: pretrain.")
    skip: int = Field(0, ge=0, description="Rows to skip at the start of the stream.")
    trust_remote_code: bool = False


class CoreConfig(StrictModel):
    """Keys core owns. Field descriptions show up in ``plait config schema``."""

    # plugins
    plugins: list[str] = Field(default_factory=list, description="Dotted import paths of extra plugin modules.")
    disable_plugins: list[str] = Field(default_factory=list, description="Plugin names not to load.")

    # model and tokenizer
    base_model: str = Field(min_length=1, description="Hugging Face model id or local directory.")
    base_model_config: Optional[str] = None
    model_type: Optional[str] = Field(None, description="Accepted for Axolotl compatibility (AutoModelForCausalLM is used).")
    tokenizer_type: Optional[str] = Field(None, description="Accepted for Axolotl compatibility (AutoTokenizer is used).")
    tokenizer_config: Optional[str] = None
    tokenizer_use_fast: bool = True
    trust_remote_code: bool = False
    revision_of_model: Optional[str] = None
    special_tokens: dict[str, str] = Field(default_factory=dict)
    tokens: list[str] = Field(default_factory=list, description="Extra tokens added to the vocabulary.")
    chat_template: Optional[str] = Field(
        None, description="tokenizer_default, a template name from any plugin (core: chatml, llama3; "
        "plait-models: gemma, phi_3, qwen3, mistral_v1, alpaca, deepseek_v3, llama4 and more, listed in its README), "
        "tokenizer_default_fallback_<name>, or a jinja string.")
    chat_template_jinja: Optional[str] = None
    resize_token_embeddings_to_32x: bool = False

    # precision and attention
    bf16: Union[bool, Literal["auto", "full"]] = "auto"
    fp16: bool = False
    tf32: bool = False
    torch_dtype: Optional[Literal["float32", "bfloat16", "float16", "auto"]] = None
    flash_attention: bool = False
    sdp_attention: bool = False
    flex_attention: bool = False
    varlen_attention: bool = Field(False, description="PyTorch's varlen attention (torch.nn.attention.varlen; CUDA, "
                                   "needs sample_packing); attn_implementation 'plait_varlen'.")
    eager_attention: bool = False
    gradient_checkpointing: Union[bool, Literal["unsloth", "offload"]] = Field(
        False, description="Recompute each decoder layer in backward; offload (alias unsloth) also keeps the "
                           "layer inputs in pinned host memory on a GPU, saving layers x tokens x hidden values, "
                           "and lets plait-kernels' LoRA q/k/v/o projections park their outputs there so the "
                           "recompute skips those matmuls.")
    gradient_checkpointing_kwargs: dict[str, Any] = Field(default_factory=dict)

    # adapters (the adapter plugin validates its own keys)
    adapter: Optional[Literal["lora", "qlora"]] = None

    # data
    # each entry validates against its format's model (config.build.entry_union); these are the base
    datasets: list[DatasetEntry] = Field(default_factory=list)
    test_datasets: list[DatasetEntry] = Field(default_factory=list)
    pretraining_dataset: list[PretrainingDatasetConfig] = Field(
        default_factory=list, description="Raw text streamed and tokenized up to what max_steps consumes "
                                          "(instead of datasets:).")
    val_set_size: float = Field(0.0, ge=0, description="Fraction (< 1) or row count (>= 1) held out for eval.")
    dataset_prepared_path: Optional[str] = Field(None, min_length=1)
    dataset_processes: Optional[int] = Field(None, ge=1)
    shuffle_merged_datasets: bool = True
    skip_bad_rows: bool = False
    sequence_len: int = Field(2048, ge=8)
    excess_length_strategy: Literal["drop", "truncate"] = "drop"
    train_on_inputs: bool = False
    sample_packing: bool = False
    eval_sample_packing: Optional[bool] = None
    pad_to_sequence_len: bool = False
    sample_packing_bin_size: int = Field(200, ge=1)
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds python, numpy and torch (numpy takes 0 to 2**32 - 1).")

    # batch and schedule
    micro_batch_size: int = Field(1, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    batch_size: Optional[int] = Field(None, ge=1, description="Global batch; sets gradient_accumulation_steps when given.")
    num_epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = "adamw_torch"
    optim_args: dict[str, Any] = Field(default_factory=dict)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler: str = "cosine"
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    warmup_steps: Optional[int] = Field(None, ge=0)
    warmup_ratio: Optional[float] = Field(None, ge=0, lt=1)
    cosine_min_lr_ratio: Optional[float] = Field(None, ge=0, le=1)
    max_grad_norm: Optional[float] = Field(
        1.0, ge=0, description="Clip the gradient norm to this; 0 or null: no clipping (as in Axolotl and HF Trainer).")
    loss_watchdog_threshold: Optional[float] = None

    # evaluation, logging, checkpoints
    output_dir: str = Field("./outputs", min_length=1)
    logging_steps: int = Field(1, ge=1)
    eval_steps: Optional[Union[int, float]] = None
    evals_per_epoch: Optional[int] = Field(None, ge=1)
    save_steps: Optional[Union[int, float]] = None
    saves_per_epoch: Optional[int] = Field(None, ge=1)
    save_total_limit: Optional[int] = Field(None, ge=1)
    save_safetensors: bool = True
    resume_from_checkpoint: Optional[str] = Field(None, min_length=1)
    auto_resume_from_checkpoints: bool = False
    save_on_signals: list[str] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        description="Signals that save a checkpoint at the next step boundary and stop the run (a scheduler "
                    "preempting it); [] turns this off. Accepted: SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP.")
    use_tensorboard: bool = False
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None
    wandb_mode: Optional[str] = None
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment_name: Optional[str] = None
    strict: bool = Field(False, description="Accepted so Axolotl configs load; has no effect in Plait.")

    # where each value came from: key path -> "default" | "file" | "override" | "plugin:<name>"
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    # the run's plugin manager, like pytest's ``config.pluginmanager``: hookimpls
    # that need other plugins' answers (model families, say) reach it from cfg
    _pm: Any = PrivateAttr(default=None)

    @field_validator("eval_steps", "save_steps")
    @classmethod
    def _positive_interval(cls, value):
        if value is not None and not value > 0:
            raise ValueError("give a number of steps >= 1, or a fraction of the run between 0 and 1")
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
        chosen = [k for k in ("flash_attention", "sdp_attention", "flex_attention", "varlen_attention",
                                 "eager_attention") if getattr(self, k)]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} are all true; enable at most one attention backend.")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError("warmup_steps and warmup_ratio are both set; give one of them.")
        if self.gradient_checkpointing in ("offload", "unsloth") and self.gradient_checkpointing_kwargs.get(
                "use_reentrant"):
            # offloading rides on the saved-tensor hooks, which reentrant checkpointing bypasses
            raise ConfigError(f"gradient_checkpointing: {self.gradient_checkpointing} needs non-reentrant "
                              "checkpointing; remove use_reentrant: true from gradient_checkpointing_kwargs")
        if self.pretraining_dataset:
            # a stream has no length: the run's length decides how much of it is read
            if self.max_steps is None:
                raise ConfigError("config key 'pretraining_dataset' streams its text and needs max_steps (the "
                                  "number of optimizer steps decides how much of the stream is read); set max_steps")
            if self.datasets:
                raise ConfigError("config keys 'pretraining_dataset' and 'datasets' are both set; train on one of "
                                  "them (type: pretraining under datasets: tokenizes a whole local corpus instead)")
            if self.val_set_size > 0:
                raise ConfigError("config key 'val_set_size' cannot split a streamed pretraining_dataset; set "
                                  "val_set_size: 0 and give test_datasets for evaluation")
        return self

    # ------------------------------------------------------------ helpers

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

    @property
    def attn_implementation(self) -> str:
        """The transformers ``attn_implementation`` these flags ask for."""
        if self.flash_attention:
            return "flash_attention_2"
        if self.flex_attention:
            return "flex_attention"
        if self.varlen_attention:
            return "plait_varlen"
        if self.eager_attention:
            return "eager"
        return "sdpa"
