"""The adapter keys, named as in Axolotl, and the rules between them."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from plait.errors import ConfigError, MachineFactError


class LoftQKeys(BaseModel):
    """peft's LoftQ initialisation, as Axolotl's ``peft.loftq_config`` reads it."""

    model_config = ConfigDict(extra="forbid")

    loftq_bits: Literal[2, 4, 8] = Field(4, description="Bits of the quantized base that LoftQ initialises the "
                                                        "adapter against (peft accepts 2, 4 or 8; typically 4).")
    loftq_iter: int = Field(1, ge=1, description="Alternating quantize / low-rank-fit rounds (peft's default 1).")


class PeftBlock(BaseModel):
    """Axolotl's ``peft:`` block."""

    model_config = ConfigDict(extra="forbid")

    loftq_config: Optional[LoftQKeys] = Field(
        None, description="LoftQ: each adapted weight W is quantized to Q and the adapter starts as the rank-r fit "
                          "of W - Q, so base + adapter starts closer to W than the quantized base alone; the base "
                          "weights become Q (dequantized). Needs adapter: lora on an unquantized base and a CUDA GPU "
                          "(peft quantizes there).")


class PeftKeys(BaseModel):
    """Keys plait-peft owns (``adapter`` itself is core's)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: Optional[Union[str, list[str]]] = Field(
        None, description="Module names (or suffixes like self_attn.q_proj) to adapt; a string is a regex.")
    lora_target_parameters: Optional[Union[str, list[str]]] = Field(
        None, description="Parameters (not modules) to adapt with LoRA, by name or suffix, e.g. "
        "[mlp.experts.gate_up_proj, mlp.experts.down_proj] for the fused 3-D expert weights of a transformers 5 MoE "
        "(peft's target_parameters; needs lora_dropout: 0). Axolotl key.")
    lora_target_linear: bool = Field(False, description="Adapt every linear layer of the decoder (not the head).")
    lora_modules_to_save: Optional[list[str]] = Field(
        None, description="Modules trained and saved in full beside the adapter (embed_tokens, lm_head).")
    lora_fan_in_fan_out: bool = Field(
        False, description="peft's fan_in_fan_out: the base layers store weights transposed (GPT-2 style Conv1D).")
    peft_layers_to_transform: Optional[list[int]] = Field(None, description="Only adapt these layer indices.")
    peft_layers_pattern: Optional[Union[str, list[str]]] = Field(
        None, description="The name of the module list peft_layers_to_transform indexes (e.g. layers), for a "
                          "model whose layer list peft does not know (peft's layers_pattern).")
    lora_rank_pattern: Optional[dict[str, int]] = Field(
        None, description="Per-module LoRA ranks overriding lora_r, by module name or regex, e.g. {down_proj: 8} "
                          "(peft's rank_pattern).")
    lora_alpha_pattern: Optional[dict[str, float]] = Field(
        None, description="Per-module LoRA alphas overriding lora_alpha, by module name or regex (peft's "
                          "alpha_pattern).")
    peft_init_lora_weights: Optional[Union[bool, str]] = Field(
        None, description="How the adapter starts (peft's init_lora_weights): true (peft's default: A Kaiming, "
                          "B zero, so training starts from the base model), gaussian (A Gaussian scaled by the "
                          "rank, B zero) or false (A and B random: the adapter changes the model from the start; "
                          "for tests). Initialisations that rewrite the base weights (pissa, olora, ...) are not "
                          "offered: a saved adapter would then not apply to the original base.")
    peft_trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = Field(
        None, description="Train only these rows of the token embeddings (new tokens, say) beside the adapter, "
                          "saved with it: a list of token ids for the input embeddings, or {module name: ids} "
                          "(peft's trainable_token_indices).")
    peft_autocast_adapter_dtype: Optional[bool] = Field(
        None, description="Keep the adapter weights in float32 while the base is in bf16/fp16 (peft's "
                          "autocast_adapter_dtype; unset: true, except with bf16: full). false keeps them in the "
                          "base's dtype.")
    peft_ensure_weight_tying: Optional[bool] = Field(
        None, description="With tied input and output embeddings (tie_word_embeddings), keep them tied when one of "
                          "them is in lora_modules_to_save or adapted: the trained copy is shared by both (peft's "
                          "ensure_weight_tying). Unset or false: only the named module trains and the two part.")
    peft_use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    peft_use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    lora_model_dir: Optional[str] = Field(None, description="A saved adapter to continue training from.")
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: the LoRA B matrices (and trainable 1-D parameters) train at learning_rate "
                                "times this; the A matrices at learning_rate. The paper recommends 16 (2^4).")
    loraplus_lr_embedding: Optional[float] = Field(
        None, gt=0, description="LoRA+: learning rate of LoRA adapters on embedding layers (default 1e-6, as in "
                                "peft and Axolotl); only with loraplus_lr_ratio.")
    peft: Optional[PeftBlock] = Field(
        None, description="Axolotl's peft block: loftq_config: {loftq_bits: 4} initialises the adapter with LoftQ.")


LORA_KEYS = tuple(PeftKeys.model_fields)


def validate(cfg) -> None:
    """Rules spanning keys; raised before any model is loaded."""
    # loraplus_lr_embedding: 1e-6 restates Axolotl's (and peft's) default, which asks for nothing by itself
    restated = cfg.loraplus_lr_embedding == 1e-6 and cfg.loraplus_lr_ratio is None
    given = [k for k in LORA_KEYS if cfg.source_of(k) != "default" and k != "lora_model_dir"
             and not (restated and k == "loraplus_lr_embedding")]
    if cfg.adapter is None:
        if cfg.lora_model_dir:
            # without an adapter the run would train every weight and never load the saved adapter
            raise ConfigError(f"config key 'lora_model_dir': {cfg.lora_model_dir!r} is set but 'adapter' is not; "
                              f"add adapter: lora (or qlora) to continue training that adapter, or remove "
                              f"lora_model_dir to train every weight")
        if given:
            # Axolotl's meaning: no adapter, every weight trains and the LoRA keys are not read
            cfg.add_note(f"{', '.join(given)} ignored: 'adapter' is not set, so every weight trains (as in "
                         f"Axolotl); set adapter: lora (or qlora) to train LoRA adapters instead")
        return
    if cfg.loraplus_lr_embedding is not None and cfg.loraplus_lr_ratio is None and not restated:
        raise ConfigError(f"config key 'loraplus_lr_embedding': {cfg.loraplus_lr_embedding} is a LoRA+ setting and "
                          f"loraplus_lr_ratio is not set; set loraplus_lr_ratio (e.g. 16) or remove it")
    if (not cfg.lora_target_modules and not cfg.lora_target_linear and not cfg.lora_target_parameters
            and not cfg.lora_model_dir):
        raise ConfigError(f"config key 'adapter': {cfg.adapter!r} needs targets; set lora_target_linear: true "
                          f"or lora_target_modules: [q_proj, v_proj, ...] (or lora_target_parameters)")
    if cfg.lora_target_parameters:
        check_target_parameters(cfg)
    if isinstance(cfg.peft_init_lora_weights, str) and cfg.peft_init_lora_weights != "gaussian":
        raise ConfigError(f"config key 'peft_init_lora_weights': {cfg.peft_init_lora_weights!r} is not offered: "
                          f"Plait accepts true, false or gaussian. Initialisations such as pissa, olora or corda "
                          f"rewrite the base weights, and the adapter Plait saves (and merge-lora applies) would "
                          f"then not fit the original base; for a quantization-aware start use peft: "
                          f"{{loftq_config: {{loftq_bits: 4}}}}")
    if cfg.adapter == "qlora" and not getattr(cfg, "load_in_4bit", False):
        raise ConfigError("config key 'adapter': 'qlora' trains LoRA on a 4-bit base; set load_in_4bit: true "
                          "(plait-bnb), or use adapter: lora")
    # any adapter: peft's DoRA has no 8-bit base layer (it failed at the first forward when only qlora was checked)
    if cfg.peft_use_dora and getattr(cfg, "load_in_8bit", False):
        raise ConfigError("config key 'peft_use_dora': true is not supported with load_in_8bit: true; set one of "
                          "them to false (DoRA works on a 4-bit or unquantized base)")
    if cfg.adapter == "lora" and getattr(cfg, "load_in_4bit", False):
        raise ConfigError("config key 'adapter': 'lora' with load_in_4bit: true is QLoRA; write adapter: qlora")
    if loftq(cfg) is not None:
        check_loftq(cfg)


def loftq(cfg) -> LoftQKeys | None:
    """The LoftQ settings of ``peft.loftq_config``, or ``None``."""
    return cfg.peft.loftq_config if cfg.peft is not None else None


def check_loftq(cfg) -> None:
    """LoftQ quantizes a full-precision base itself (the base weights become
    the dequantized Q), so it needs an unquantized base and a plain LoRA; peft
    runs its quantizer on a CUDA device."""
    quantized = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(cfg, k, False)]
    if cfg.adapter != "lora" or quantized:
        given = f"adapter: {cfg.adapter}" + "".join(f", {k}: true" for k in quantized)
        raise ConfigError(f"config key 'peft.loftq_config' initialises LoRA from a full-precision base, which it "
                          f"quantizes itself; with {given} the base is already quantized. Use adapter: lora "
                          f"without load_in_4bit / load_in_8bit, or remove peft.loftq_config")
    if cfg.lora_model_dir:
        raise ConfigError("config key 'peft.loftq_config' initialises a new adapter, and lora_model_dir continues a "
                          "saved one; remove one of them")
    if cfg.lora_alpha != cfg.lora_r:
        # peft fits B @ A to W - Q and the forward multiplies it by alpha / r
        cfg.add_note(f"peft.loftq_config: LoftQ fits the adapter to the quantization error and the forward scales "
                     f"it by lora_alpha / lora_r = {cfg.lora_alpha / cfg.lora_r:g}; the model starts at LoftQ's fit "
                     f"only with lora_alpha equal to lora_r ({cfg.lora_r})")
    import importlib.util

    import torch

    if importlib.util.find_spec("scipy") is None:
        raise MachineFactError("config key 'peft.loftq_config' needs scipy (peft's LoftQ uses it), which is not "
                               "installed; pip install scipy")
    if not torch.cuda.is_available():
        raise MachineFactError("config key 'peft.loftq_config' needs a CUDA GPU: peft's LoftQ quantizes the base "
                               "weights with bitsandbytes on a CUDA device (this machine has none)")


def target_parameter_names(cfg) -> list[str]:
    """``lora_target_parameters`` as a list (Axolotl also accepts one string)."""
    value = cfg.lora_target_parameters
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_target_parameters(cfg) -> None:
    """peft's ParamWrapper adds ``B @ A`` to the parameter itself, so there is
    no layer input to drop out and no per-column norm for DoRA."""
    names = target_parameter_names(cfg)
    bad = [n for n in names if not n or n != n.strip() or n.startswith(".") or n.endswith(".")]
    if bad:
        raise ConfigError(f"config key 'lora_target_parameters': {bad} are not parameter names; accepted: names or "
                          "dotted suffixes such as mlp.experts.gate_up_proj")
    for key, value in (("lora_dropout", cfg.lora_dropout), ("peft_use_dora", cfg.peft_use_dora)):
        if value:
            raise ConfigError(f"config key {key!r}: {value!r} cannot be combined with lora_target_parameters "
                              "(peft adapts parameters without dropout or DoRA); set it to 0/false")
