"""The setup steps every command shares, in the order a run takes them.

``plait train``, ``preprocess``, ``inspect``, ``evaluate``, ``inference`` and
``merge-lora`` all start the same way; the steps live here once so a hook is
called at the same point whichever command runs.

1. :func:`setup_tokenizer` -- ``load_tokenizer``, then ``tokenizer_loaded``.
2. :func:`setup_model` -- ``load_model``, gradient checkpointing (training),
   the device, ``load_adapter``, then (training) the trained parameters and
   ``patch_model``. Training wraps the result for several processes
   (``wrap_parallel``, :func:`plait.train.loop.build_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import pluggy
    import torch
    from transformers import PreTrainedTokenizerBase

    from plait.config.schema import CoreConfig


def setup_tokenizer(cfg, pm):
    """The run's tokenizer: ``load_tokenizer`` (firstresult), then every
    plugin's ``tokenizer_loaded`` (a family's chat template, pad token) before
    any row is tokenized or the model's embeddings are sized to it."""
    from plait.plugins import call_required

    tokenizer = call_required(pm, "load_tokenizer", cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    return tokenizer


def setup_model(cfg: CoreConfig, pm: pluggy.PluginManager, tokenizer: PreTrainedTokenizerBase, *,
                for_training: bool, device: torch.device, saved_adapter: Optional[Path] = None,
                train_data=None, say: Callable[[str], None] = lambda message: None) -> torch.nn.Module:
    """The model, ready to train (``for_training``) or to run in eval mode.

    ``load_model`` (firstresult) -> gradient checkpointing when training
    (:func:`plait.model.recompute.apply_gradient_checkpointing`) -> ``device``
    unless the config or the loader placed it (:func:`placed_by_config`,
    :func:`placed_by_loader`)
    -> when training: ``fix_untrained_tokens`` (from ``train_data``, the
    tokenized training rows), the packed-rows and head probes -> the adapter
    -> when training: ``neftune_noise_alpha``, the trained parameters
    (``unfrozen_parameters``, fp16's float32 masters) and ``patch_model``.

    The adapter: training asks ``load_adapter`` with the run config (a plugin
    answers when ``cfg.adapter`` asks); otherwise only ``saved_adapter``, a
    folder holding a saved one, is attached. ``say`` prints what was changed
    (the loop passes its main-rank log).
    """
    import torch

    from plait.data.packing import check_loaded_model
    from plait.errors import ConfigError
    from plait.model.forward import head_plan
    from plait.model.neftune import attach_neftune
    from plait.model.recompute import apply_gradient_checkpointing
    from plait.model.unfreeze import freeze_except
    from plait.model.untrained_tokens import fix_untrained_tokens
    from plait.plugins import call_required

    model = call_required(pm, "load_model", cfg=cfg, tokenizer=tokenizer)
    if for_training:
        apply_gradient_checkpointing(cfg, pm, model)
    if not (placed_by_config(cfg) or placed_by_loader(model)):
        model = model.to(device)
    if cfg.gemma4_hybrid_attn_impl:  # training, and loading the trained model with the backends it trained with
        from plait.model.hybrid_attention import apply_hybrid_attention

        say(apply_hybrid_attention(model))
    if for_training:
        if cfg.fix_untrained_tokens not in (None, False):
            # before adapters: lora_modules_to_save copies the fixed rows
            fixed = fix_untrained_tokens(model, train_data, cfg.fix_untrained_tokens)
            say(f"fix_untrained_tokens: set {len(fixed)} untrained token rows to the trained mean"
                + (f" (ids {fixed[:20]}{' ...' if len(fixed) > 20 else ''})" if fixed else ""))
        # validate_config could only read a local config.json: check the real one (packed rows kept apart)
        check_loaded_model(cfg, model)
        from plait.model.transformers_kernels import describe_experts_kernel

        experts_line = describe_experts_kernel(cfg, model)
        if experts_line:
            say(experts_line)
        # which module feeds the head, and whether the fused loss reproduces the logits: one probe, before wrappers
        head_plan(model)
        adapted = pm.hook.load_adapter(cfg=cfg, model=model)
    elif saved_adapter is not None:
        if "lora_model_dir" not in type(cfg).model_fields:
            raise ConfigError(f"{saved_adapter} holds a LoRA adapter; install plait-peft to load it")
        adapter_cfg = cfg.model_copy(update={"lora_model_dir": str(saved_adapter), "adapter": cfg.adapter or "lora"})
        adapted = pm.hook.load_adapter(cfg=adapter_cfg, model=model)
    else:
        adapted = None
    model = adapted if adapted is not None else model
    if not for_training:
        model.eval()
        return model
    if cfg.neftune_noise_alpha:
        attach_neftune(model, cfg.neftune_noise_alpha)  # training forwards only; eval and the saved model see none
        say(f"neftune_noise_alpha: noise of alpha {cfg.neftune_noise_alpha} on the input embeddings in training")
    if cfg.unfrozen_parameters:
        trained = freeze_except(model, cfg.unfrozen_parameters)
        say(f"unfrozen_parameters: training {len(trained)} parameter tensors, the rest frozen")
    if cfg.fp16:
        # fp16 needs float32 master weights: the GradScaler refuses to unscale fp16 gradients
        for param in model.parameters():
            if param.requires_grad and param.dtype == torch.float16:
                param.data = param.data.float()
    for changes in pm.hook.patch_model(cfg=cfg, model=model):
        for target, kernel in (changes or {}).items():
            say(f"kernel: {target} -> {kernel}")
    return model


def placed_by_config(cfg) -> bool:
    """Whether the config places the model itself (``device_map`` / ``max_memory``,
    one process): from_pretrained split it, and moving it would undo that."""
    return getattr(cfg, "device_map", None) is not None or getattr(cfg, "max_memory", None) is not None


def placed_by_loader(model) -> bool:
    """Whether the loader already put ``model`` where it must be: quantized
    (bitsandbytes places weights as it quantizes them) or device-mapped
    (``hf_device_map``: ``.to()`` would undo the map). With
    :func:`placed_by_config`, the one rule for training and for loading a
    trained model."""
    return bool(getattr(model, "hf_device_map", None) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_quantized", False))
