"""The preference keys, named and defaulted as in Axolotl (and TRL behind it)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from plait.errors import ConfigError

#: ``rl:`` values this plugin trains; Axolotl's others are named in the error
METHODS = ("dpo", "ipo", "orpo", "kto", "simpo")
AXOLOTL_ONLY = ("grpo", "gdpo", "ebft")
#: ``dpo_loss_type`` values (TRL's names)
DPO_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "robust")


class PreferenceKeys(BaseModel):
    """Keys plait-preference owns."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rl: Optional[str] = Field(None, description="Preference method: dpo, ipo, orpo, kto or simpo.")
    rl_beta: Optional[float] = Field(None, gt=0, description="beta of the method (TRL's default 0.1).")
    dpo_beta: Optional[float] = Field(None, gt=0, description="Older name of rl_beta.")
    dpo_loss_type: Optional[Union[str, list[str]]] = Field(
        None, description="DPO losses: sigmoid (default), sigmoid_norm (sigmoid on per-token average log-ratios), "
                          "hinge, ipo, robust; a list adds them up.")
    dpo_loss_weights: Optional[list[float]] = Field(None, description="Weight of each dpo_loss_type (default 1).")
    dpo_label_smoothing: Optional[float] = Field(
        None, ge=0, lt=0.5, description="Conservative DPO / robust DPO: the share of flipped preference labels.")
    dpo_use_weighting: Optional[bool] = Field(
        None, description="WPO weighting of pairs by their probability: true is refused (not supported); false or "
                          "unset accepted.")
    dpo_norm_loss: Optional[bool] = Field(
        None, description="DPO: the sigmoid loss on log-ratios averaged per response token instead of summed (TRL's "
                          "sigmoid_norm; ipo is per token already).")
    dpo_padding_free: Optional[bool] = Field(
        None, description="Accepted: pairs always run without padding between their two sequences.")
    rpo_alpha: Optional[float] = Field(
        None, ge=0, description="DPO/IPO: add the chosen responses' negative log-likelihood (a token mean over the "
                                "micro-batch) times this to the loss (RPO; TRL's loss_type [sigmoid, sft] with "
                                "loss_weights [1, rpo_alpha]).")
    orpo_alpha: Optional[float] = Field(None, gt=0, description="ORPO: weight of the odds-ratio term (TRL's beta).")
    simpo_gamma: Optional[float] = Field(None, description="SimPO: target reward margin (default 0.5).")
    cpo_alpha: Optional[float] = Field(None, ge=0, description="SimPO/CPO: weight of the chosen NLL term (default 1).")
    kto_desirable_weight: Optional[float] = Field(None, gt=0, description="KTO: weight of desirable rows (default 1).")
    kto_undesirable_weight: Optional[float] = Field(
        None, gt=0, description="KTO: weight of undesirable rows (default 1).")
    precompute_ref_log_probs: Optional[bool] = Field(
        None, description="DPO/IPO/KTO: score every training and eval sequence with the reference once, "
                          "before the first step (stored beside the prepared dataset, keyed by model and data), "
                          "so no frozen copy of the model is kept and no reference forward runs per step.")
    reward_model: Optional[bool] = Field(
        None, description="Train a Bradley-Terry reward model (a scalar head; loads as AutoModelForSequenceClassification).")
    process_reward_model: Optional[bool] = Field(
        None, description="Train a process reward model: a label per reasoning step (stepwise_supervised rows; loads "
                          "as AutoModelForTokenClassification).")
    num_labels: Optional[int] = Field(
        None, description="Head size: 1 (a scalar) for reward_model; classes per step for process_reward_model "
                          "(default 2).")
    center_rewards_coefficient: Optional[float] = Field(
        None, ge=0, description="Reward model: weight of the (r_chosen + r_rejected)^2 centring term.")

    @field_validator("rl", mode="before")
    @classmethod
    def _rl_name(cls, value):
        # Axolotl's enum values are lower case; accept DPO/Dpo and rl: true-less spellings the same
        return value.strip().lower() if isinstance(value, str) else value


def beta(cfg) -> float:
    """Axolotl's order: rl_beta, then the older dpo_beta, then orpo_alpha; TRL's 0.1 otherwise."""
    for key in ("rl_beta", "dpo_beta", "orpo_alpha"):
        value = getattr(cfg, key, None)
        if value is not None:
            return float(value)
    return 0.1


def dpo_losses(cfg) -> list[tuple[str, float]]:
    """``[(loss type, weight), ...]`` of a DPO run (``rl: ipo`` is DPO with the ipo loss)."""
    if cfg.rl == "ipo":
        return [("ipo", 1.0)]
    types = cfg.dpo_loss_type or ["sigmoid"]
    types = [types] if isinstance(types, str) else list(types)
    if cfg.dpo_norm_loss:  # Axolotl's switch: the sigmoid loss on per-token averages
        types = ["sigmoid_norm" if name == "sigmoid" else name for name in types]
    weights = cfg.dpo_loss_weights or [1.0] * len(types)
    return list(zip(types, weights))


def validate(cfg) -> None:
    """Rules spanning keys, checked before any model or data work."""
    rl = cfg.rl
    if rl is not None and rl not in METHODS:
        extra = f" ({rl} is Axolotl's online RL, not preference tuning)" if rl in AXOLOTL_ONLY else ""
        raise ConfigError(f"config key 'rl': {rl!r} is not accepted{extra}; accepted: {', '.join(METHODS)}")
    if cfg.process_reward_model:  # its own rules (plait_preference.process_reward.validate)
        return
    if cfg.num_labels not in (None, 1) or (cfg.num_labels is not None and not cfg.reward_model):
        raise ConfigError(f"config key 'num_labels': {cfg.num_labels} is not accepted; 1 with reward_model: true "
                          f"(a scalar Bradley-Terry reward), or 2 or more with process_reward_model: true")
    if (rl is not None or cfg.reward_model) and (getattr(cfg, "context_parallel_size", None) or 1) > 1:
        # a context-parallel rank holds a slice of every sequence; the per-sequence sums need them whole
        what = f"rl: {rl}" if rl else "reward_model: true"
        raise ConfigError(f"{what} with context_parallel_size: {cfg.context_parallel_size} is not supported; "
                          f"preference losses need whole sequences on a rank (use fsdp or tensor_parallel_size)")
    if cfg.reward_model:
        if rl is not None:
            raise ConfigError(f"reward_model: true and rl: {rl} are two different trainings; keep one")
        # with an adapter the scalar head still trains in full: peft's sequence-classification wrapper
        # (task_type SEQ_CLS, plait-peft's choice for this model) adds score to modules_to_save itself
        return
    if cfg.dpo_use_weighting:
        raise ConfigError("config key 'dpo_use_weighting': true (WPO weighting) is not supported; remove it")
    if rl is None:
        given = [k for k in PreferenceKeys.model_fields if k not in ("rl", "reward_model", "process_reward_model")
                 and getattr(cfg, k, None) is not None and cfg.source_of(k) != "default"]
        if given:
            raise ConfigError(f"{', '.join(given)} set but 'rl' is not; add rl: dpo (or ipo, orpo, kto, simpo), "
                              f"or remove these keys")
        return
    if cfg.precompute_ref_log_probs and rl not in ("dpo", "ipo", "kto"):
        raise ConfigError(f"config key 'precompute_ref_log_probs': true, but rl: {rl} has no reference model; "
                          f"remove the key (it applies to dpo, ipo and kto)")
    tp = getattr(cfg, "tensor_parallel_size", None) or 1
    if tp > 1 and rl in ("dpo", "ipo", "kto") and not cfg.adapter and not cfg.precompute_ref_log_probs:
        # a frozen copy of a tensor-parallel model is not built here (the sharded copy is FSDP2's);
        # the adapter-off base and the precompute pass need no copy and run under TP as they do in one process
        raise ConfigError(f"config key 'tensor_parallel_size': {tp} is not supported with rl: {rl} and full "
                          f"fine-tuning with a frozen reference copy; accepted: tensor_parallel_size: 1 (shard "
                          f"with fsdp: the reference is sharded like the model), precompute_ref_log_probs: true "
                          f"(no copy: the reference is scored once before training), or adapter: lora (the "
                          f"reference is the base with the adapter off)")
    if cfg.rpo_alpha is not None and rl not in ("dpo", "ipo"):
        raise ConfigError(f"config key 'rpo_alpha': {cfg.rpo_alpha} adds the chosen responses' NLL to a DPO loss, "
                          f"but rl is {rl!r}; use it with rl: dpo or ipo (orpo and simpo have their own NLL term)")
    if (cfg.dpo_loss_type is not None or cfg.dpo_loss_weights is not None) and rl != "dpo":
        raise ConfigError(f"dpo_loss_type / dpo_loss_weights are for rl: dpo, but rl is {rl!r}")
    if rl == "dpo":
        types = cfg.dpo_loss_type or ["sigmoid"]
        types = [types] if isinstance(types, str) else types
        for name in types:
            if name not in DPO_LOSS_TYPES:
                raise ConfigError(f"config key 'dpo_loss_type': {name!r} is not accepted; accepted: "
                                  f"{', '.join(DPO_LOSS_TYPES)}")
        if cfg.dpo_norm_loss and not {"sigmoid", "ipo"} & set(types):
            raise ConfigError(f"config key 'dpo_norm_loss': true averages the sigmoid loss's log-ratios per token, "
                              f"but dpo_loss_type is {cfg.dpo_loss_type!r}; use it with sigmoid (ipo is per token "
                              f"already), or remove it")
        norm = [name for name, _ in dpo_losses(cfg) if name == "sigmoid_norm"]
        if norm and cfg.dpo_label_smoothing:
            raise ConfigError(f"config key 'dpo_label_smoothing': {cfg.dpo_label_smoothing} has no per-token form "
                              f"(sigmoid_norm, or dpo_norm_loss: true); use sigmoid or robust with it")
        if cfg.dpo_loss_weights is not None and len(cfg.dpo_loss_weights) != len(types):
            raise ConfigError(f"config key 'dpo_loss_weights': {cfg.dpo_loss_weights} has {len(cfg.dpo_loss_weights)} "
                              f"weights for {len(types)} dpo_loss_type entries; give one weight per loss")
