"""Kernels transformers chooses itself at load: ``experts_implementation``
(the function that runs an MoE block's fused experts) and ``use_kernels``
(layers swapped for kernels from the Hugging Face hub by the ``kernels``
package). Both are ``from_pretrained`` arguments, passed through by
:func:`plait.model.loading.pretrained_kwargs`; the checks here run at config
time, against the installed transformers.

Axolotl's KernelsPlugin (``plugins: axolotl.integrations.kernels.KernelsPlugin``)
registers its own experts functions under transformers' experts interface and
picks one with ``use_scattermoe`` / ``use_sonicmoe``. Plait maps them onto
transformers' own functions of the same arithmetic (the routing stays in each
model's MoE block either way; only the per-expert products are run by another
kernel):

==============================  ===============================================
Axolotl                         Plait (transformers' experts function)
==============================  ===============================================
use_scattermoe                  grouped_mm: the tokens sorted by expert and one
                                grouped GEMM per projection (torch's
                                grouped_mm), what ScatterMoE's Triton kernel
                                computes
use_sonicmoe                    sonicmoe: transformers' own loader of the same
                                sonic-moe hub kernel (CUDA, Hopper or newer)
the plugin, neither flag        eager (Axolotl pins it)
==============================  ===============================================
"""

from __future__ import annotations

import os

#: experts functions that run only on an NVIDIA GPU (hub kernels: sonic-moe, DeepGEMM)
CUDA_ONLY_EXPERTS = ("sonicmoe", "deepgemm", "deepgemm_megamoe")

#: names other projects give experts kernels that transformers does not register -> what to say
FOREIGN_EXPERTS = {
    "scattermoe": "scattermoe is Axolotl's own kernel, which its KernelsPlugin registers for use_scattermoe: true; "
                  "set use_scattermoe: true (Plait runs transformers' grouped_mm for it)",
}

#: Axolotl's experts flags -> (transformers' experts function Plait runs, why it is the same arithmetic)
AXOLOTL_EXPERTS_FLAGS = {
    "use_scattermoe": ("grouped_mm", "ScatterMoE is Axolotl's Triton kernel: tokens sorted by expert, one grouped "
                                     "GEMM per projection; transformers' grouped_mm computes the same products with "
                                     "torch's grouped_mm"),
    "use_sonicmoe": ("sonicmoe", "transformers' own loader of the sonic-moe hub kernel Axolotl runs"),
}

#: experts_implementation values Axolotl's KernelsPlugin keeps; any other becomes eager there
AXOLOTL_KERNELS_PLUGIN_EXPERTS = ("eager", "batched_mm", "grouped_mm", "scattermoe", "sonicmoe")


def apply_axolotl_kernels_plugin(raw: dict) -> list[str]:
    """What listing Axolotl's KernelsPlugin does to a config, applied to the raw
    keys (before validation); returns the notes that say so.

    As in Axolotl's ``KernelsArgs``: ``use_kernels`` is turned on (transformers'
    hub kernels), and ``experts_implementation`` is ``eager`` unless a flag
    picks a kernel or it names one of transformers' functions; ``scattermoe`` /
    ``sonicmoe`` without their flag fall back to ``eager`` too."""
    notes = []
    if raw.get("use_kernels") is not True:
        was = "unset" if raw.get("use_kernels") is None else str(raw["use_kernels"]).lower()
        raw["use_kernels"] = True
        notes.append(f"use_kernels: {was} -> true (Axolotl's KernelsPlugin turns transformers' hub kernels on)")
    value = raw.get("experts_implementation")
    flags = {flag for flag in AXOLOTL_EXPERTS_FLAGS if raw.get(flag) is True}
    if value is None:
        if not flags:
            raw["experts_implementation"] = "eager"
            notes.append("experts_implementation: eager (Axolotl's KernelsPlugin pins it when neither "
                         "use_scattermoe nor use_sonicmoe is set)")
        return notes
    wanted_flag = {"scattermoe": "use_scattermoe", "sonicmoe": "use_sonicmoe"}.get(value)
    if value not in AXOLOTL_KERNELS_PLUGIN_EXPERTS or (wanted_flag and wanted_flag not in flags):
        raw["experts_implementation"] = "eager"
        why = f"it needs {wanted_flag}: true" if wanted_flag else "not a name Axolotl's KernelsPlugin accepts"
        notes.append(f"experts_implementation: {value} -> eager (as Axolotl's KernelsPlugin does: {why})")
    return notes


def apply_axolotl_experts_flags(raw: dict) -> list[str]:
    """``use_scattermoe`` / ``use_sonicmoe`` onto ``experts_implementation``,
    applied to the raw keys; returns the notes that say what runs. The flag
    wins over an ``experts_implementation`` of another value, as Axolotl's
    plugin sets it before the model loads. Both flags on is an error."""
    from plait.errors import ConfigError

    flags = [flag for flag in AXOLOTL_EXPERTS_FLAGS if raw.get(flag) is True]
    if len(flags) > 1:
        raise ConfigError("config keys 'use_scattermoe' and 'use_sonicmoe' are both true; they choose one experts "
                          "kernel, so set one of them")
    if not flags:
        return []
    flag = flags[0]
    name, why = AXOLOTL_EXPERTS_FLAGS[flag]
    given = raw.get("experts_implementation")
    raw["experts_implementation"] = name
    replaced = f", replacing experts_implementation: {given}" if given not in (None, name, flag[4:]) else ""
    return [f"{flag}: true -> experts_implementation: {name}{replaced} ({why})"]


def experts_implementations() -> list[str]:
    """What ``from_pretrained(experts_implementation=...)`` accepts: ``eager``
    and every name in transformers' experts registries (bf16 and fp8), read
    the way ``PreTrainedModel.get_correct_experts_implementation`` reads them."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    names = set(ALL_EXPERTS_FUNCTIONS.keys())
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without fp8 experts
        pass
    else:
        names |= set(ALL_FP8_EXPERTS_FUNCTIONS.keys())
    return ["eager", *sorted(names - {"eager"})]


def check_experts_implementation(cfg) -> None:
    """A name transformers accepts; a CUDA-only one is a fact of a machine without CUDA."""
    from plait.errors import ConfigError, MachineFactError

    value = cfg.experts_implementation
    if value is None:
        return
    # a value use_scattermoe / use_sonicmoe set is named by that key
    key = next((f"{flag}' (experts_implementation {value!r})" for flag, (name, _) in AXOLOTL_EXPERTS_FLAGS.items()
                if getattr(cfg, flag, None) and name == value), f"experts_implementation': {value!r}")
    accepted = experts_implementations()
    if value not in accepted:
        why = FOREIGN_EXPERTS.get(value, "transformers has no experts function of that name")
        raise ConfigError(f"config key 'experts_implementation': {value!r} is not accepted ({why}); "
                          f"accepted: {', '.join(accepted)}")
    if value in CUDA_ONLY_EXPERTS:
        import torch

        if not torch.cuda.is_available():
            raise MachineFactError(f"config key '{key} runs only on an NVIDIA GPU, and this machine has none; use "
                                   "grouped_mm (transformers' default), batched_mm or eager")
        if value == "sonicmoe":
            check_sonicmoe_loadable(key)


def check_sonicmoe_loadable(key: str) -> None:
    """On a machine with CUDA, transformers' own test for the sonic-moe kernel:
    the kernels package, a GPU of Hopper or newer, and the CuteDSL packages the
    kernel was built against."""
    from plait.errors import MachineFactError

    try:
        from transformers.integrations.sonicmoe import is_sonicmoe_loadable
    except ImportError:  # a transformers without the test: loading will tell
        return
    try:
        is_sonicmoe_loadable(raise_error=True)
    except ImportError as exc:
        raise MachineFactError(f"config key '{key} cannot run on this machine: {' '.join(str(exc).split())}") \
            from None


def check_use_kernels(cfg) -> None:
    """``use_kernels: true`` needs the ``kernels`` package in the range transformers supports."""
    from plait.errors import MachineFactError

    if not cfg.use_kernels:
        return
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():
        raise MachineFactError("config key 'use_kernels': true loads hub kernels through the kernels package, which "
                               "is not installed here in a version transformers supports; pip install kernels, "
                               "or remove the key")


def kernel_kwargs(cfg) -> dict:
    """The ``from_pretrained`` arguments of these keys; unset keys leave transformers' defaults."""
    kwargs = {}
    if cfg.experts_implementation is not None:
        kwargs["experts_implementation"] = cfg.experts_implementation
    if cfg.use_kernels is not None:
        kwargs["use_kernels"] = cfg.use_kernels
        # as Axolotl: asking for hub kernels by config also trusts kernels of any publisher
        kwargs["allow_all_kernels"] = cfg.use_kernels
    return kwargs


def check_attention_kernel(cfg) -> None:
    """``attn_implementation: <owner>/<kernel>``: a hub attention kernel that
    transformers loads at ``from_pretrained`` through the ``kernels`` package.
    Another publisher than kernels-community needs ``use_kernels: true``
    (transformers' allow_all_kernels); the package, a GPU and the hub (or the
    kernel in the hub cache when offline) are facts of this machine."""
    from plait.errors import ConfigError, MachineFactError
    from plait.model.names import TRUSTED_KERNEL_PUBLISHER, is_hub_kernel

    value = cfg.attn_implementation
    if not is_hub_kernel(value):
        return
    repo = value.split(":")[0].split("@")[0]
    if repo.split("/")[0] != TRUSTED_KERNEL_PUBLISHER and not cfg.use_kernels:
        raise ConfigError(f"config key 'attn_implementation': {value!r} is a kernel of another publisher than "
                          f"{TRUSTED_KERNEL_PUBLISHER}; transformers loads those only when trusted: set use_kernels: "
                          f"true, or use a {TRUSTED_KERNEL_PUBLISHER}/ kernel")
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():
        raise MachineFactError(f"config key 'attn_implementation': the hub kernel {value!r} is loaded by the kernels "
                               f"package, which is not installed here in a version transformers supports; pip install "
                               f"kernels, or use flash_attention_2 or sdpa")
    import torch

    # hub kernels ship compiled builds for GPUs (CUDA/ROCm, some XPU or Metal), none for the CPU
    has_gpu = (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
               or torch.backends.mps.is_available())
    if not has_gpu:
        raise MachineFactError(f"config key 'attn_implementation': the hub kernel {value!r} runs on a GPU (its builds "
                               f"are for CUDA, some for XPU or Metal), and this machine has none; use sdpa or "
                               f"flex_attention here")
    from huggingface_hub import constants

    cached = os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--")))
    if constants.HF_HUB_OFFLINE and not cached:
        raise MachineFactError(f"config key 'attn_implementation': the hub kernel {value!r} is not in the hub cache "
                               f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; download it once online, or "
                               f"use flash_attention_2 or sdpa")


def describe_experts_kernel(cfg, model) -> str | None:
    """The run-log line saying which function runs the model's fused experts
    (blocks built with transformers' experts interface), or that a kernel the
    config asked for has no such block to run in; ``None`` for a model
    without them that asked for nothing."""
    blocks = [module for module in model.modules()
              if hasattr(module, "is_concatenated") and hasattr(getattr(module, "config", None),
                                                                "_experts_implementation")]
    if not blocks:
        if cfg.experts_implementation is None:
            return None
        return (f"warning: experts_implementation {cfg.experts_implementation!r} has nothing to run: no block of "
                f"{type(model).__name__} dispatches its experts through transformers' experts interface")
    names = sorted({block.config._experts_implementation or "eager" for block in blocks})
    return f"experts: {len(blocks)} MoE blocks run their experts with transformers' {', '.join(names)} function"
