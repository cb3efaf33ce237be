"""The configuration keys plait-parallel owns, with Axolotl's names.

``fsdp`` and ``fsdp_config`` are accepted in the shapes Axolotl configs use
(``fsdp: [full_shard, auto_wrap]`` or ``fsdp: "full_shard auto_wrap"`` or a
bool; ``fsdp_config`` keys with or without the ``fsdp_`` prefix) and are
normalised here into one :class:`FsdpOptions`, so the rest of the package
reads a single, checked structure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from plait.errors import ConfigError, MachineFactError, did_you_mean

#: ``fsdp:`` words and what they mean for FSDP2
FSDP_WORDS = {
    "full_shard": "shard parameters, gradients and optimizer state (reshard after forward)",
    "shard_grad_op": "keep parameters gathered between forward and backward (reshard_after_forward: false)",
    "hybrid_shard": "shard within dp_shard_size ranks, replicate across dp_replicate_size (HSDP)",
    "offload": "keep parameters on the CPU (fsdp_offload_params)",
    "auto_wrap": "wrap every decoder layer (always done; accepted for Axolotl compatibility)",
}

#: ``fsdp_config`` keys (without the ``fsdp_`` prefix) -> (accepted values or type, meaning)
FSDP_CONFIG_KEYS: dict[str, tuple[Any, str]] = {
    "version": ((2,), "FSDP version; only FSDP2 (fully_shard) is implemented"),
    "offload_params": (bool, "keep sharded parameters on the CPU (CPUOffloadPolicy)"),
    "state_dict_type": (("FULL_STATE_DICT", "SHARDED_STATE_DICT"), "how checkpoints are written"),
    "final_state_dict_type": (("FULL_STATE_DICT",), "the final model's form: always whole, in Hugging Face format"),
    "transformer_layer_cls_to_wrap": (str, "decoder-layer class name to shard one by one"),
    "reshard_after_forward": (bool, "free gathered parameters after forward (full_shard) or keep them"),
    "activation_checkpointing": (bool, "recompute decoder layers in backward"),
    "auto_wrap_policy": (("TRANSFORMER_BASED_WRAP",), "which modules are wrapped; only per decoder layer"),
    "sharding_strategy": (("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"), "Axolotl/FSDP1 name of the strategy"),
    "cpu_ram_efficient_loading": (bool, "accepted; weights are loaded once per process here"),
    "sync_module_states": (bool, "accepted; FSDP2 shards from identical weights"),
    "use_orig_params": (bool, "accepted; FSDP2 always keeps the original parameters"),
    "limit_all_gathers": (bool, "accepted; FSDP2 schedules its own all-gathers"),
    "backward_prefetch": (str, "accepted; FSDP2 prefetches one layer ahead"),
    "forward_prefetch": (bool, "accepted; FSDP2 prefetches one layer ahead"),
    "mixed_precision_reduce_dtype": (("float32", "bfloat16", "float16"), "dtype of gradient reduction"),
}

#: ``ring_attn`` strings accepted (Axolotl's ring_attn_func names map onto the one kernel here)
RING_ATTN_NAMES = {
    "plait_ring": "contiguous split",
    "varlen_llama3": "contiguous split",
    "batch_ring": "contiguous split",
    "batch_zigzag": "load-balanced causal split (rank r holds chunks r and 2*cp-1-r)",
    "zigzag": "load-balanced causal split",
}


@dataclass(frozen=True)
class FsdpOptions:
    """The normalised FSDP settings of a run."""

    enabled: bool
    reshard_after_forward: bool = True
    offload_params: bool = False
    layer_cls: Optional[str] = None
    activation_checkpointing: bool = False
    state_dict_type: str = "SHARDED_STATE_DICT"
    reduce_dtype: Optional[str] = None


def _fsdp_words(value) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return ["full_shard"]
    if isinstance(value, str):
        return value.replace(",", " ").split()
    return [str(v) for v in value]


def normalise_fsdp_config(raw: dict) -> dict[str, Any]:
    """Strip the ``fsdp_`` prefix and check every key and value; returns the cleaned dict."""
    clean: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        short = key[len("fsdp_"):] if key.startswith("fsdp_") else key
        if short not in FSDP_CONFIG_KEYS:
            accepted = ", ".join(f"fsdp_{k}" for k in FSDP_CONFIG_KEYS)
            raise ConfigError(
                f"config key 'fsdp_config.{key}' is not known{did_you_mean('fsdp_' + short, ['fsdp_' + k for k in FSDP_CONFIG_KEYS])}\n"
                f"accepted: {accepted}"
            )
        accepted, _ = FSDP_CONFIG_KEYS[short]
        if short in ("transformer_layer_cls_to_wrap",) and isinstance(value, list):
            value = value[0] if len(value) == 1 else value
        if isinstance(accepted, tuple):
            if isinstance(value, str):
                value_cmp = (value.upper() if short in ("state_dict_type", "final_state_dict_type", "auto_wrap_policy",
                                                        "sharding_strategy") else value)
            else:
                value_cmp = value
            if value_cmp not in accepted:
                raise ConfigError(f"config key 'fsdp_config.{key}': {value!r} is not accepted; accepted: {list(accepted)}")
            value = value_cmp
        elif accepted is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ConfigError(f"config key 'fsdp_config.{key}': {value!r} is not accepted; accepted: true or false")
        elif accepted is str and not isinstance(value, str):
            raise ConfigError(f"config key 'fsdp_config.{key}': {value!r} is not accepted; accepted: a class name (string)")
        clean[short] = value
    return clean


class ParallelConfig(BaseModel):
    """Keys of plait-parallel. The mesh is (dp_replicate, dp_shard, cp, tp)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dp_replicate_size: int = Field(1, ge=1, description="Replicas of the sharded model (HSDP); 1: none.")
    dp_shard_size: Optional[int] = Field(
        None, ge=1, description="Ranks one FSDP shard group spans; default: whatever the world size leaves.")
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks that split each linear layer (DTensor TP).")
    context_parallel_size: int = Field(1, ge=1, description="Ranks that split each sequence (ring attention).")
    fsdp: Optional[Union[bool, str, list[str]]] = Field(
        None, description="FSDP on: true, or Axolotl's words, e.g. [full_shard, auto_wrap].")
    fsdp_config: dict[str, Any] = Field(default_factory=dict, description="Axolotl fsdp_config keys (fsdp_ prefix optional).")
    fsdp_version: Optional[int] = Field(None, description="Only 2 (FSDP2, fully_shard) is implemented.")
    fsdp_final_state_dict_type: Optional[str] = Field(
        None, description="Form of the final model: FULL_STATE_DICT, the only one (the model is saved whole, in "
                          "Hugging Face format).")
    ring_attn: Optional[Union[bool, str]] = Field(
        None, description="Context-parallel attention: true or plait_ring/varlen_llama3/batch_ring (contiguous split), "
                          "batch_zigzag (load-balanced split).")
    heads_k_stride: Optional[int] = Field(None, ge=1, description="K/V heads one ring-attention step processes at once.")
    deepspeed: Optional[Union[str, dict[str, Any]]] = Field(
        None, description="A DeepSpeed ZeRO config (JSON path, Axolotl's deepspeed_configs/ name, or mapping), "
                          "translated to fsdp / fsdp_config (see plait_parallel.deepspeed).")

    @model_validator(mode="before")
    @classmethod
    def _deepspeed_to_fsdp(cls, data):
        if isinstance(data, dict) and data.get("deepspeed"):
            from plait_parallel.deepspeed import apply_deepspeed

            data = apply_deepspeed(data)
        return data

    @field_validator("fsdp")
    @classmethod
    def _check_fsdp(cls, value):
        for word in _fsdp_words(value):
            if word not in FSDP_WORDS:
                raise ConfigError(f"config key 'fsdp': {word!r} is not accepted{did_you_mean(word, FSDP_WORDS)}; "
                                  f"accepted: {', '.join(FSDP_WORDS)} (or true/false)")
        return value

    @field_validator("fsdp_config")
    @classmethod
    def _check_fsdp_config(cls, value):
        normalise_fsdp_config(value)
        return value

    @field_validator("fsdp_final_state_dict_type")
    @classmethod
    def _check_final_state_dict_type(cls, value):
        if value is not None and value.upper() not in FSDP_CONFIG_KEYS["final_state_dict_type"][0]:
            raise ConfigError(f"config key 'fsdp_final_state_dict_type': {value!r} is not accepted; accepted: "
                              f"FULL_STATE_DICT (the final model is always saved whole, in Hugging Face format; "
                              f"checkpoints are sharded with fsdp_config.state_dict_type)")
        return value

    @field_validator("fsdp_version")
    @classmethod
    def _check_version(cls, value):
        if value is not None and value != 2:
            raise ConfigError(f"config key 'fsdp_version': {value!r} is not accepted; accepted: 2 (FSDP2, fully_shard)")
        return value

    @field_validator("ring_attn")
    @classmethod
    def _check_ring(cls, value):
        if isinstance(value, str) and value not in RING_ATTN_NAMES:
            raise ConfigError(f"config key 'ring_attn': {value!r} is not accepted{did_you_mean(value, RING_ATTN_NAMES)}; "
                              f"accepted: true, false, {', '.join(RING_ATTN_NAMES)}")
        return value


def world_size_from_env(env=None) -> int:
    """``WORLD_SIZE`` as torchrun sets it; 1 when absent."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"environment WORLD_SIZE={env.get('WORLD_SIZE')!r} is not an integer") from None


def mesh_sizes(cfg, world_size: int, source: str = "WORLD_SIZE") -> dict[str, int]:
    """The size of every mesh dimension for ``world_size`` processes.

    ``dp_shard_size`` left unset takes what the other sizes leave. Raises
    :class:`ConfigError` naming the keys when the sizes do not multiply to
    the world size; ``source`` names where that size came from
    (``WORLD_SIZE``, ``ray_num_workers``, the process group).
    """
    rep, tp, cp = cfg.dp_replicate_size, cfg.tensor_parallel_size, cfg.context_parallel_size
    others = rep * tp * cp
    shard = cfg.dp_shard_size
    described = (f"dp_replicate_size={rep} x dp_shard_size={shard if shard is not None else '(auto)'} x "
                 f"context_parallel_size={cp} x tensor_parallel_size={tp}")
    if shard is None:
        if world_size % others:
            raise MachineFactError(f"{described} does not divide the world size {world_size} ({source}); "
                              f"choose sizes whose product divides {world_size}")
        shard = world_size // others
    elif others * shard != world_size:
        raise MachineFactError(f"{described} = {others * shard}, but the world size is {world_size} ({source}); "
                          f"the product must equal the number of processes")
    return {"dp_replicate": rep, "dp_shard": shard, "cp": cp, "tp": tp}


def fsdp_options(cfg) -> FsdpOptions:
    """Combine ``fsdp`` words and ``fsdp_config`` into :class:`FsdpOptions`."""
    words = set(_fsdp_words(cfg.fsdp))
    extra = normalise_fsdp_config(cfg.fsdp_config)
    strategy = extra.get("sharding_strategy")
    reshard = extra.get("reshard_after_forward", not ("shard_grad_op" in words or strategy == "SHARD_GRAD_OP"))
    return FsdpOptions(
        enabled=bool(words) or bool(extra) or cfg.fsdp_version == 2,
        reshard_after_forward=reshard,
        offload_params=extra.get("offload_params", "offload" in words),
        layer_cls=extra.get("transformer_layer_cls_to_wrap"),
        activation_checkpointing=extra.get("activation_checkpointing", False),
        state_dict_type=extra.get("state_dict_type", "SHARDED_STATE_DICT"),
        reduce_dtype=extra.get("mixed_precision_reduce_dtype"),
    )


def ring_split(cfg) -> str:
    """``"zigzag"`` (load-balanced) or ``"contiguous"``."""
    return "zigzag" if cfg.ring_attn in ("batch_zigzag", "zigzag") else "contiguous"


def launched_world_size(cfg) -> tuple[int, str]:
    """The processes the run will have, and where that number comes from:
    ``ray_num_workers`` where ``plait train`` is about to start them through
    Ray (``use_ray`` on the driver, one process without ``WORLD_SIZE``; each
    worker has it from Ray), else ``WORLD_SIZE``."""
    if getattr(cfg, "use_ray", False) and not os.environ.get("WORLD_SIZE"):
        return cfg.ray_num_workers, "ray_num_workers"
    return world_size_from_env(), "WORLD_SIZE"


def validate(cfg, world_size: int | None = None) -> None:
    """Cross-key checks run by ``validate_config`` before any model work."""
    world_size, source = launched_world_size(cfg) if world_size is None else (world_size, "WORLD_SIZE")
    sizes = mesh_sizes(cfg, world_size, source)
    if cfg.context_parallel_size > 1 and cfg.ring_attn is False:
        raise ConfigError("context_parallel_size > 1 needs the ring attention; ring_attn: false is not accepted "
                          "with it (set ring_attn: true or context_parallel_size: 1)")
    if cfg.context_parallel_size > 1 and getattr(cfg, "flash_attention", False):
        raise ConfigError("context_parallel_size > 1 replaces the attention with plait_ring; "
                          "flash_attention: true cannot be combined with it (set flash_attention: false)")
    words = set(_fsdp_words(cfg.fsdp))
    if "hybrid_shard" in words and sizes["dp_replicate"] == 1:
        raise ConfigError("fsdp: hybrid_shard needs dp_replicate_size > 1 (replicas) and dp_shard_size (ranks per "
                          "shard group); set dp_replicate_size")
    fsdp_options(cfg)  # raises on contradicting fsdp_config values
    check_generation_in_eval(cfg, world_size, source)


def check_generation_in_eval(cfg, world_size: int, source: str = "WORLD_SIZE") -> None:
    """Core's generation in eval (do_causal_lm_eval, eval_table_size) runs the
    whole model on each process; a sharded one would need every rank to
    generate in lockstep, which it does not do. Several processes are always
    sharded here (FSDP2 over the mesh's data-parallel ranks)."""
    if not (getattr(cfg, "do_causal_lm_eval", None) or getattr(cfg, "eval_table_size", None)):
        return
    sharded = [key for key, on in (("fsdp", fsdp_options(cfg).enabled),
                                   ("tensor_parallel_size", cfg.tensor_parallel_size > 1),
                                   ("context_parallel_size", cfg.context_parallel_size > 1),
                                   (f"plait-parallel over {world_size} processes ({source})", world_size > 1)) if on]
    if sharded:
        asked = "do_causal_lm_eval" if cfg.do_causal_lm_eval else "eval_table_size"
        raise ConfigError(f"config key {asked!r}: generation during evaluation needs the whole model on each "
                          f"process, and {', '.join(sharded)} shards it; remove {asked} (or the sharding) and "
                          f"run `plait evaluate` on the saved model, which generates on one process")
