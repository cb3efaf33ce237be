"""Kernels transformers chooses itself at load: ``experts_implementation``
(the function that runs an MoE block's fused experts) and ``use_kernels``
(layers swapped for kernels from the Hugging Face hub by the ``kernels``
package). Both are ``from_pretrained`` arguments, passed through by
:func:`plait.model.loading.pretrained_kwargs`; the checks here run at config
time, against the installed transformers.
"""

from __future__ import annotations

import os

#: experts functions that run only on an NVIDIA GPU (hub kernels: sonic-moe, DeepGEMM)
CUDA_ONLY_EXPERTS = ("sonicmoe", "deepgemm", "deepgemm_megamoe")

#: names other projects give experts kernels that transformers does not register -> what to say
FOREIGN_EXPERTS = {
    "scattermoe": "scattermoe is Axolotl's own kernel (its KernelsPlugin, use_scattermoe), not one of transformers'",
}


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
    accepted = experts_implementations()
    if value not in accepted:
        why = FOREIGN_EXPERTS.get(value, "transformers has no experts function of that name")
        raise ConfigError(f"config key 'experts_implementation': {value!r} is not accepted ({why}); "
                          f"accepted: {', '.join(accepted)}")
    if value in CUDA_ONLY_EXPERTS:
        import torch

        if not torch.cuda.is_available():
            raise MachineFactError(f"config key 'experts_implementation': {value!r} runs only on an NVIDIA GPU, and "
                                   "this machine has none; use grouped_mm (transformers' default), batched_mm or eager")


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
