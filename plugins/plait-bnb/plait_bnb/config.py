"""The quantization keys, named as in Axolotl, and the rules between them.

Every rule here runs in ``validate_config`` (the optimizer's through the
``optimizers`` registry's check), so a config that cannot work fails before
the tokenizer, the data or the model is touched; ``configure`` fills in the
one derived value.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from plait.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")

#: optimizer name -> bitsandbytes.optim class; adamw_8bit is Axolotl's alias of adamw_bnb_8bit
OPTIMIZERS = {
    "adamw_bnb_8bit": "AdamW8bit",
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}
#: transformers' other bitsandbytes optimizer names, built through ``Trainer.get_optimizer_cls_and_kwargs``
TRANSFORMERS_OPTIMIZERS = ("ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_ademamix_32bit",
                           "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb",
                           "rmsprop_bnb_8bit", "rmsprop_bnb_32bit")


class BnbKeys(BaseModel):
    """Keys plait-bnb owns."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    load_in_4bit: bool = Field(False, description="Load the base model's linear layers in 4 bits (QLoRA; needs adapter: qlora).")
    load_in_8bit: bool = Field(False, description="Load the base model's linear layers in 8 bits (LLM.int8; needs adapter: lora).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA's) or fp4.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the per-block scales too (about 0.4 bit per weight saved).")
    bnb_4bit_compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="dtype the 4-bit weights are dequantized to for matmuls; default: the run's compute dtype.")
    bnb_4bit_quant_storage: Optional[Literal["uint8", "float32", "bfloat16", "float16"]] = Field(
        None, description="dtype the packed 4-bit weights are stored in (uint8); bfloat16 lets FSDP2 shard them with the rest.")
    quantize_moe_experts: bool = Field(
        False, description="Also quantize the fused 3-D expert weights of MoE blocks (transformers 5's "
        "experts.gate_up_proj / down_proj, which are parameters, not linear layers) in 4 bits (load_in_4bit) or "
        "8 bits (load_in_8bit), dequantized on read; without it they stay in the compute dtype. Axolotl key.")
    bnb_config_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra transformers.BitsAndBytesConfig arguments (llm_int8_threshold, ...).")


BNB_KEYS = tuple(BnbKeys.model_fields)
FOUR_BIT_KEYS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")


def _given(cfg, key: str) -> bool:
    return cfg.source_of(key) != "default"


def validate(cfg) -> None:
    """Rules spanning keys of core, plait-peft and plait-bnb; raises ConfigError."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("load_in_4bit: true and load_in_8bit: true are both set; choose one "
                          "(4-bit for adapter: qlora, 8-bit for adapter: lora)")
    if cfg.load_in_4bit and cfg.adapter != "qlora":
        # 4-bit weights are packed integers without gradients: only adapters beside them can learn
        raise ConfigError(f"load_in_4bit: true needs adapter: qlora (config key 'adapter' is {cfg.adapter!r}); "
                          f"4-bit weights cannot be trained in full. Set adapter: qlora, or drop load_in_4bit")
    if cfg.load_in_8bit and cfg.adapter is None:
        raise ConfigError("load_in_8bit: true needs an adapter (config key 'adapter' is None); int8 weights cannot "
                          "be trained in full. Set adapter: lora, or drop load_in_8bit")
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        raise ConfigError("config key 'adapter': 'qlora' trains LoRA on a 4-bit base; set load_in_4bit: true, "
                          "or use adapter: lora")
    if cfg.quantize_moe_experts and not (cfg.load_in_4bit or cfg.load_in_8bit):
        raise ConfigError("config key 'quantize_moe_experts': true quantizes the experts like the rest of a quantized "
                          "base; set load_in_4bit: true (adapter: qlora) or load_in_8bit: true (adapter: lora), "
                          "or remove the key")
    stray = [k for k in FOUR_BIT_KEYS if _given(cfg, k)]
    if stray and not cfg.load_in_4bit:
        raise ConfigError(f"{', '.join(stray)} set but load_in_4bit is not; set load_in_4bit: true "
                          f"(with adapter: qlora) or remove these keys")
    if cfg.bnb_config_kwargs:
        _check_kwargs(cfg)
    if uses_fsdp(cfg):
        _check_fsdp(cfg)


def configure(cfg) -> None:
    """Derived values: FSDP2 shards a layer's parameters as one flat buffer
    of one dtype, so the packed 4-bit data is stored as the compute dtype
    (what Axolotl does too) unless the config says otherwise."""
    if uses_fsdp(cfg) and cfg.load_in_4bit and not cfg.load_in_8bit and cfg.bnb_4bit_quant_storage is None:
        from plait_bnb.quantize import compute_dtype_name

        cfg.set_by_plugin("bnb_4bit_quant_storage", compute_dtype_name(cfg), "bnb")


def uses_fsdp(cfg) -> bool:
    """Whether plait-parallel will shard with FSDP2 (its keys, when it is installed)."""
    fsdp = getattr(cfg, "fsdp", None)
    return bool(fsdp not in (None, False, "", [], "false") or getattr(cfg, "fsdp_version", None)
                or getattr(cfg, "fsdp_config", None))


def _check_fsdp(cfg) -> None:
    """FSDP2 shards a layer's parameters as one flat buffer of one dtype; the
    int8 weights of load_in_8bit stay whole on every rank (plait-parallel
    leaves frozen integer parameters out of the shards)."""
    if cfg.load_in_8bit:
        cfg.add_note("load_in_8bit with FSDP: the int8 base weights (and their row scales) are not sharded; every "
                     "rank holds them whole and FSDP2 shards the rest (adapters, norms, embeddings). For a base "
                     "sharded in memory use load_in_4bit with adapter: qlora")
        return
    if not cfg.load_in_4bit:
        return
    if cfg.bnb_4bit_quant_storage == "uint8":
        raise ConfigError("config key 'bnb_4bit_quant_storage': 'uint8' cannot be sharded with FSDP beside the "
                          "model's float weights; set it to the compute dtype (bfloat16 or float16), or leave it "
                          "unset and plait-bnb chooses it")


def _check_kwargs(cfg) -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    accepted = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    unknown = [k for k in cfg.bnb_config_kwargs if k not in accepted]
    if unknown:
        raise ConfigError(f"config key 'bnb_config_kwargs': {unknown} are not BitsAndBytesConfig arguments; "
                          f"accepted: {', '.join(accepted)}")
    # Axolotl sets the 4-bit options inside bnb_config_kwargs: that is accepted (the kwargs win when the
    # quantization config is built); a top-level key the config also gives, with another value, is a contradiction
    twice = [k for k, v in cfg.bnb_config_kwargs.items() if k in BNB_KEYS and _given(cfg, k) and getattr(cfg, k) != v]
    if twice:
        raise ConfigError(f"config key 'bnb_config_kwargs' repeats {twice}, also set at the top level with "
                          f"another value; keep one")


def check_optimizer(cfg) -> None:
    """Config-time check of plait-bnb's own optimizers (their registry ``check``)."""
    name = cfg.optimizer
    if name.startswith("paged_"):
        import torch

        if not torch.cuda.is_available():
            # bitsandbytes 0.50 falls back to ordinary (unpaged) state on the CPU; say so once, up front
            warnings.warn(f"optimizer {name!r}: paging needs a CUDA device; on this machine the state "
                          f"is kept in ordinary memory (bitsandbytes' fallback)", stacklevel=2)
    if cfg.optim_args:
        import inspect

        import bitsandbytes.optim as bnb_optim

        cls = getattr(bnb_optim, OPTIMIZERS[name])
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
        unknown = [k for k in cfg.optim_args if k not in accepted]
        if unknown:
            raise ConfigError(f"config key 'optim_args': {unknown} are not arguments of bitsandbytes "
                              f"{cls.__name__} (optimizer {name!r}); accepted: {', '.join(accepted)}")
