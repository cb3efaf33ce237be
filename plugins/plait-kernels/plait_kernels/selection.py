"""Which backend serves each piece (norm, rope, GLU, loss), from the config.

``plait_kernels`` sets the default for every piece; a ``liger_*`` key set to
true moves its piece to liger-kernel. ``off`` turns the plugin off entirely.
liger-kernel has no gated RMSNorm: ``liger_rms_norm_gated`` (Axolotl's key,
which Axolotl also serves with a Triton kernel of its own) asks for Plait's.
"""

from __future__ import annotations

import os

from plait.errors import ConfigError

from plait_kernels.backends import PIECES, liger_installed

#: piece -> the Axolotl key that asks liger-kernel for it
LIGER_KEYS = {
    "rms_norm": "liger_rms_norm",
    "rope": "liger_rope",
    "glu": "liger_glu_activation",
    "loss": "liger_fused_linear_cross_entropy",
}


#: piece -> Axolotl's older key that asks for a fused kernel for it (flash-attn's
#: RMSNorm, xformers' SwiGLU there): Plait's Triton kernel unless a liger key
#: already chose liger-kernel's
FUSED_KEYS = {
    "rms_norm": "flash_attn_rms_norm",
    "glu": "flash_attn_fuse_mlp",
}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def asked_for_liger(cfg) -> list[str]:
    """The liger keys set to true (``liger_cross_entropy`` counts as the fused loss)."""
    keys = [key for key in (*LIGER_KEYS.values(), "liger_layer_norm") if getattr(cfg, key, None)]
    if getattr(cfg, "liger_cross_entropy", None) and "liger_fused_linear_cross_entropy" not in keys:
        keys.append("liger_cross_entropy")
    return keys


#: Axolotl's switches for the fused LoRA paths (on by default with Plait's kernels)
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")

#: the routed LoRA experts path's options -> what each asks of that path (each needs the path installed)
ROUTED_PATH_OPTIONS = {
    "moe_combine_kernel": "ends the routed LoRA experts path with a Triton kernel",
    "lora_experts_fold": "folds the LoRA terms of the routed LoRA experts path into its grouped matmuls",
    "moe_weight_in_gate": "moves the routing weights of the routed LoRA experts path into its gate",
}


def check_config(cfg) -> None:
    """Config-only checks (no torch): run at validation, before any model work."""
    liger_keys = asked_for_liger(cfg)
    triton_keys = [key for key in ("liger_rms_norm_gated", *FUSED_KEYS.values()) if getattr(cfg, key, None)]
    if cfg.plait_kernels == "off" and (liger_keys or triton_keys or cfg.torch_compile):
        extra = liger_keys + triton_keys + (["torch_compile"] if cfg.torch_compile else [])
        raise ConfigError(
            f"config key 'plait_kernels': 'off' disables this plugin, but {', '.join(extra)} ask(s) for it; "
            f"remove those keys or set plait_kernels to auto, triton, liger or torch"
        )
    if getattr(cfg, "torch_compile_mode", None) and not cfg.torch_compile:
        raise ConfigError(f"config key 'torch_compile_mode': {cfg.torch_compile_mode!r} sets how layers are compiled, "
                          f"and torch_compile is off; set torch_compile: true or remove torch_compile_mode")
    fused_mlp_keys = [key for key in ("liger_glu_activation", "flash_attn_fuse_mlp") if getattr(cfg, key, None)]
    if fused_mlp_keys and runs_llama_mlp_layout(cfg):
        # as in Axolotl: the tiled MLP's llama layout calls the MLP's own projections and activation
        raise ConfigError(
            f"config key {fused_mlp_keys[0]!r} swaps the MLP, and tiled_mlp_use_original_mlp: false runs the llama "
            f"MLP layout instead of it; set tiled_mlp_use_original_mlp: true, or remove {', '.join(fused_mlp_keys)}")
    lora_keys = [key for key in LORA_KERNEL_KEYS if getattr(cfg, key, None)]
    if lora_keys and cfg.plait_kernels in ("torch", "off", "liger"):
        raise ConfigError(
            f"config key {lora_keys[0]!r}: the fused LoRA paths are Plait's kernels, but plait_kernels is "
            f"{cfg.plait_kernels!r}; set plait_kernels: auto (or triton), or remove {', '.join(lora_keys)}"
        )
    if getattr(cfg, "lora_experts_kernel", None) and cfg.plait_kernels == "off":
        raise ConfigError("config key 'lora_experts_kernel': true asks plait-kernels for the routed LoRA experts "
                          "path, but plait_kernels is 'off'; set plait_kernels: auto, or remove lora_experts_kernel")
    routed_path_off = cfg.plait_kernels == "off" or getattr(cfg, "lora_experts_kernel", None) is False
    for key, what in ROUTED_PATH_OPTIONS.items():
        if getattr(cfg, key, None) and routed_path_off:
            why = "plait_kernels is 'off'" if cfg.plait_kernels == "off" else "lora_experts_kernel is false"
            raise ConfigError(f"config key {key!r}: true {what}, but {why} (that path is not installed); set "
                              f"plait_kernels: auto and leave lora_experts_kernel unset or true, or remove {key}")
    if (liger_keys or cfg.plait_kernels == "liger") and not liger_installed():
        key = liger_keys[0] if liger_keys else "plait_kernels"
        raise ConfigError(
            f"config key {key!r} asks for liger-kernel, which is not installed; "
            f"pip install liger-kernel, or remove the key (accepted without it: plait_kernels auto, triton, torch, off)"
        )


def routes_expert_lora(cfg) -> bool:
    """Whether the routed LoRA experts path (:mod:`plait_kernels.lora_experts`)
    is installed: by default, unless ``lora_experts_kernel: false`` or
    ``plait_kernels: off``. On an H100 it trained the Qwen3-MoE bench shape
    1.45x as fast as peft's path at less memory (bench/RESULTS.md), exact
    against peft. PyTorch code (grouped matmuls): it needs no CUDA device, and
    experts modules it does not cover keep peft's forward."""
    if cfg.plait_kernels == "off":
        return False
    return getattr(cfg, "lora_experts_kernel", None) is not False


def runs_llama_mlp_layout(cfg) -> bool:
    """core's ``tiled_mlp`` with ``tiled_mlp_use_original_mlp: false`` runs
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` itself: a fused MLP would be bypassed."""
    return bool(getattr(cfg, "tiled_mlp", False)) and getattr(cfg, "tiled_mlp_use_original_mlp", True) is False


def choose(cfg) -> dict[str, str | None]:
    """Backend name per piece; ``None`` leaves the model's own module in place."""
    mode = cfg.plait_kernels
    if mode == "off":
        return dict.fromkeys(PIECES)
    if mode == "auto":
        mode = "triton" if _cuda_available() else "torch"
    # "torch" means the model's own PyTorch modules: nothing to swap
    default = None if mode == "torch" else mode
    chosen = dict.fromkeys(PIECES, default)
    for piece, key in LIGER_KEYS.items():
        if getattr(cfg, key, None):
            chosen[piece] = "liger"
    if getattr(cfg, "liger_cross_entropy", None):
        chosen["loss"] = "liger"
    for piece, key in FUSED_KEYS.items():
        if getattr(cfg, key, None) and chosen[piece] is None:
            chosen[piece] = "triton"
    if runs_llama_mlp_layout(cfg):
        chosen["glu"] = None  # the tiled MLP runs its own forward over the MLP's modules
    # only Plait's Triton kernel fuses the gated norm (liger-kernel has none)
    chosen["rms_norm_gated"] = "triton" if default == "triton" or getattr(cfg, "liger_rms_norm_gated", None) else None
    needs_device = sorted({name for name in chosen.values() if name in ("triton", "liger")})
    if needs_device and not _cuda_available() and not interpreter_enabled():
        raise ConfigError(
            f"config key 'plait_kernels' / liger_* / flash_attn_*: the {' and '.join(needs_device)} kernels need a "
            f"CUDA device and none is available; set plait_kernels: torch (or auto) and drop the liger_* and "
            f"flash_attn_* keys on this machine "
            f"(tests may set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
        )
    return chosen
