"""``deepspeed: <json>``: Axolotl's ZeRO configs translated to FSDP2.

Plait does not run DeepSpeed; FSDP2 (``fully_shard``) does the same job. A
``deepspeed:`` value (a path to a JSON file, Axolotl's file names under
``deepspeed_configs/`` even where the file is absent, inline JSON, or a
mapping) is read and turned into this plugin's keys:

=================================================  ==========================================
DeepSpeed                                          FSDP2 (plait-parallel)
=================================================  ==========================================
``zero_optimization.stage: 3``                     ``fsdp: [full_shard]`` (parameters,
                                                   gradients and optimizer state sharded,
                                                   parameters freed after forward)
``stage: 1`` or ``2``                              ``fsdp: [shard_grad_op]`` (parameters kept
                                                   gathered between forward and backward)
``offload_param.device: cpu``                      ``fsdp_config.offload_params: true``
``offload_optimizer.device: cpu``                  ``fsdp_config.offload_params: true`` (FSDP2
                                                   offloads parameters, gradients and the
                                                   optimizer step together)
``bf16.enabled: true``                             ``bf16: true`` when the config leaves it auto
``"auto"`` batch/clipping values, communication    nothing: FSDP2 takes them from the config
tuning (``overlap_comm``, bucket sizes,            or schedules its own communication
``stage3_*``, ``gather_16bit_weights_on_model_
save``, ...)
=================================================  ==========================================

Refused by name: ``stage: 0``, offload to NVMe, a number where Axolotl's
files say ``"auto"`` (set micro_batch_size / gradient_accumulation_steps /
max_grad_norm instead), ``compile`` (use ``torch_compile``), and every other
section DeepSpeed has and FSDP2 does not (``optimizer``, ``scheduler``, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any

from plait.errors import ConfigError

#: ZeRO settings of the files Axolotl ships in ``deepspeed_configs/`` (commit
#: 067b021): a config that names one translates even where the file is absent
AXOLOTL_FILES: dict[str, dict[str, Any]] = {
    "zero1.json": {"zero_optimization": {"stage": 1}},
    "zero1_torch_compile.json": {"zero_optimization": {"stage": 1}, "compile": {"disable": False}},
    "zero2.json": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    "zero2_torch_compile.json": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                 "compile": {"disable": False}},
    "zero3.json": {"zero_optimization": {"stage": 3}},
    "zero3_bf16.json": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
    "zero3_bf16_cpuoffload_all.json": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                             "offload_param": {"device": "cpu"}},
                                       "bf16": {"enabled": True}},
    "zero3_bf16_cpuoffload_params.json": {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                                          "bf16": {"enabled": True}},
}

#: top-level keys with nothing to do under FSDP2 (values "auto" or switches of DeepSpeed's own engine)
PASSIVE_TOP = {"gradient_accumulation_steps", "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
               "wall_clock_breakdown", "zero_force_ds_cpu_optimizer", "zero_allow_untested_optimizer", "steps_per_print",
               "fp16", "bf16", "zero_optimization"}
#: batch keys whose only accepted value is "auto" (the config's own keys decide)
AUTO_ONLY = {"gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm",
             "train_batch_size": "micro_batch_size x gradient_accumulation_steps x data-parallel size",
             "train_micro_batch_size_per_gpu": "micro_batch_size"}
#: zero_optimization keys that tune DeepSpeed's communication: FSDP2 schedules its own
PASSIVE_ZERO = {"stage", "offload_param", "offload_optimizer", "overlap_comm", "contiguous_gradients", "sub_group_size",
                "reduce_bucket_size", "reduce_scatter", "allgather_bucket_size", "allgather_partitions",
                "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "max_live_parameters", "max_reuse_distance",
                "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save", "round_robin_gradients"}


def read_deepspeed(value) -> tuple[dict, str]:
    """The DeepSpeed config ``value`` names and a short name for messages."""
    if isinstance(value, dict):
        return value, "the inline mapping"
    text = str(value).strip()
    if text.startswith("{"):
        try:
            return json.loads(text), "the inline JSON"
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config key 'deepspeed': the inline JSON does not parse ({exc})") from None
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as handle:
                return json.load(handle), text
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config key 'deepspeed': {text!r} is not a readable JSON file ({exc})") from None
    name = os.path.basename(text)
    if name in AXOLOTL_FILES:
        return AXOLOTL_FILES[name], f"{text} (Axolotl's {name})"
    raise ConfigError(f"config key 'deepspeed': {text!r} is not a file here, nor one of Axolotl's "
                           f"deepspeed_configs/ files ({', '.join(AXOLOTL_FILES)})")


def _offloads(section) -> str | None:
    return (section or {}).get("device") if isinstance(section, dict) else None


def translate(ds: dict) -> tuple[dict[str, Any], list[str]]:
    """``({key: value} for this plugin's keys and bf16, [refusals])``."""
    refused = []
    for key, value in ds.items():
        if key not in PASSIVE_TOP and key != "compile":
            refused.append(f"deepspeed '{key}': DeepSpeed's {key} section has no FSDP2 equivalent; set it with "
                           f"Plait's own keys (optimizer, lr_scheduler, ...) and remove it")
        elif key in AUTO_ONLY and value != "auto":
            refused.append(f"deepspeed '{key}': {value!r}; only \"auto\" is accepted (set {AUTO_ONLY[key]} in the "
                           f"config instead)")
    compile_section = ds.get("compile")
    if isinstance(compile_section, dict) and not compile_section.get("disable", False):
        refused.append("deepspeed 'compile': DeepSpeed's compiler is not used; set torch_compile: true instead")
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    for key in zero:
        if key not in PASSIVE_ZERO:
            refused.append(f"deepspeed 'zero_optimization.{key}': no FSDP2 equivalent; remove it")
    if stage not in (1, 2, 3):
        refused.append(f"deepspeed 'zero_optimization.stage': {stage!r}; ZeRO stages 1, 2 and 3 translate to FSDP2 "
                       f"(stage 0 is plain data parallelism: remove deepspeed)")
    devices = {_offloads(zero.get("offload_param")), _offloads(zero.get("offload_optimizer"))} - {None, "none"}
    if devices - {"cpu"}:
        refused.append(f"deepspeed offload to {sorted(devices - {'cpu'})}: only CPU offload translates "
                       f"(fsdp_config offload_params)")
    keys: dict[str, Any] = {"fsdp": ["full_shard"] if stage == 3 else ["shard_grad_op"]}
    if "cpu" in devices:
        keys["fsdp_config"] = {"offload_params": True}
    bf16 = ds.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") is True:
        keys["bf16"] = True
    return keys, refused


def describe(name: str, ds: dict, keys: dict[str, Any]) -> str:
    stage = (ds.get("zero_optimization") or {}).get("stage")
    settings = ", ".join(f"{key}: {json.dumps(value)}" for key, value in keys.items())
    return f"deepspeed: {name} (ZeRO-{stage}) -> {settings} (FSDP2, plait-parallel)"


def apply_deepspeed(data: dict) -> dict:
    """Raw config ``data`` with ``deepspeed`` translated into FSDP2 keys.

    Raises :class:`ConfigError` listing every part that does not translate,
    or naming an FSDP key the config sets as well (one layout, not two)."""
    value = data.get("deepspeed")
    if value in (None, "", False):
        return data
    ds, name = read_deepspeed(value)
    keys, refused = translate(ds)
    # the translation's own values (a re-validation after assignment) are not a second layout
    both = [key for key in ("fsdp", "fsdp_config") if data.get(key) and data.get(key) != keys.get(key)]
    if both:
        refused.append(f"deepspeed and {' and '.join(both)} are both set; give one layout (deepspeed translates to "
                       f"{describe(name, ds, keys).split(' -> ')[1]})")
    if refused:
        raise ConfigError("\n".join(refused))
    data = dict(data)
    if keys.pop("bf16", None) and data.get("bf16") in (None, "auto"):
        data["bf16"] = True
    data.update(keys)
    return data


def translation_note(value) -> str:
    """What ``deepspeed: value`` became, for ``plait config validate`` and ``plait train``."""
    ds, name = read_deepspeed(value)
    keys, _ = translate(ds)
    return describe(name, ds, keys)
