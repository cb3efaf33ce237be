"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the model and optimizer state in
parallel; DCP records the global layout, so a checkpoint saved at one world
size (or mesh shape) loads at another: a 2-process FSDP run resumes in one
process or in four. Frozen parameters (the base model under LoRA) are not
written: they come back from the base model.

A checkpoint directory holds::

    __0_0.distcp ...   DCP shards ("model" and "optim" entries)
    .metadata          DCP's index
    plait_sharded.json base model, adapter or full, extra state (step, ...)
    config.json        the model config (full fine-tunes need no base weights)
    adapter/           adapter_config.json (LoRA)

:func:`consolidate` turns it into a normal Hugging Face model or a peft
adapter (``plait merge-sharded``).

Loading reads DCP's pickled index and non-tensor entries through
:mod:`plait_parallel.safe_load`, so a crafted checkpoint runs no code.
"""

from __future__ import annotations

import json
from pathlib import Path

META_FILE = "plait_sharded.json"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _options(model, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, **extra)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_options(model))}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(path, model, optimizer=None, extra_state: dict | None = None) -> Path:
    """Write ``model`` (and ``optimizer``) shards to ``path``; collective: call on every rank.

    ``extra_state`` is a JSON-serialisable dict (step, epoch, data position)
    returned by :func:`load_sharded`.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(model, optimizer), checkpoint_id=str(path))
    if _rank() == 0:
        base = model.get_base_model() if _is_peft(model) else model
        meta = {
            "format": "plait-sharded/1",
            "base_model": getattr(base.config, "_name_or_path", None),
            "adapter": _is_peft(model),
            "has_optimizer": optimizer is not None,
            # frozen parameters are not written; consolidation reloads them from the base
            "frozen_params_saved": all(p.requires_grad for p in model.parameters()),
            "extra_state": extra_state or {},
        }
        base.config.to_json_file(str(path / "config.json"))
        if _is_peft(model):
            for name, config in model.peft_config.items():
                config.save_pretrained(str(path / "adapter" / ("" if name == "default" else name)))
        tmp = path / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(path / META_FILE)  # last: its presence marks a complete checkpoint
    _barrier()
    return path


def read_meta(path) -> dict:
    """The checkpoint's ``plait_sharded.json``; DataError when it is missing."""
    from plait.errors import DataError

    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise DataError(f"not a complete plait sharded checkpoint (no {META_FILE})", path=str(path))
    return json.loads(meta_path.read_text())


def load_sharded(path, model, optimizer=None) -> dict:
    """Load shards from ``path`` into ``model`` (and ``optimizer``), however they
    are sharded now; returns the ``extra_state`` given to :func:`save_sharded`.
    Collective when the process group is initialised."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from plait_parallel.safe_load import safe_load

    meta = read_meta(path)
    if optimizer is not None and not meta.get("has_optimizer"):
        optimizer = None  # the checkpoint has no optimizer state: keep the fresh one
    state = _state(model, optimizer)
    # DCP's default reader unpickles freely: these run no code from the checkpoint
    safe_load(state, str(path))
    options = _options(model, strict=False)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
    return meta.get("extra_state", {})


def consolidate(path, output_dir, base_model: str | None = None) -> Path:
    """Write the checkpoint at ``path`` as a Hugging Face model (full fine-tune)
    or a peft adapter (LoRA) in ``output_dir``, in one process.

    ``base_model`` overrides the base recorded at save time. A LoRA
    checkpoint, or one saved with frozen parameters, needs the base's
    weights; one holding every weight only uses the base's tokenizer when
    present.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.errors import DataError

    path, output_dir = Path(path), Path(output_dir)
    meta = read_meta(path)
    base = base_model or meta.get("base_model")
    needs_base = meta["adapter"] or not meta.get("frozen_params_saved", True)
    if needs_base:
        if not base:
            raise DataError("this checkpoint holds only the trained parameters and records no base model; "
                            "pass --base-model", path=str(path))
        try:
            model = AutoModelForCausalLM.from_pretrained(base)
        except OSError as exc:
            raise DataError(f"base model {base!r} could not be loaded ({exc}); pass --base-model",
                            path=str(path)) from None
    else:  # every weight is in the checkpoint: the config is enough
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    if meta["adapter"]:
        from peft import PeftConfig, get_peft_model

        model = get_peft_model(model, PeftConfig.from_pretrained(str(path / "adapter")))
    state = {"model": get_model_state_dict(model, options=_options(model))}
    from plait_parallel.safe_load import safe_load

    # partial: parameters frozen at save time are not in the checkpoint; they keep the base's values
    safe_load(state, str(path), no_dist=True, allow_partial_load=True)
    set_model_state_dict(model, state["model"], options=_options(model, strict=False))
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    if base and Path(base).exists():
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base).save_pretrained(str(output_dir))
        except (OSError, ValueError):
            pass  # a base directory without a tokenizer: weights alone are still usable
    return output_dir
