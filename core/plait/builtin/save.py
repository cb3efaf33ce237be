"""Core's final save: Hugging Face format, safetensors, with the tokenizer."""

from __future__ import annotations

from plait.hookspecs import hookimpl


def _distributed_rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


@hookimpl(trylast=True)
def save_model(cfg, model, tokenizer, path):
    """A peft model writes only its adapter; a plain model its full weights.

    In a multi-process run every rank calls this: sharded weights (FSDP2,
    tensor parallel) are gathered to full CPU tensors collectively, and rank 0
    writes them.
    """
    from plait.model.forward import unwrap_data_parallel

    model = unwrap_data_parallel(model)
    state_dict = None
    rank = _distributed_rank()
    if rank is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return path
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path, save_jinja_files=cfg.tokenizer_save_jinja_files)
    return path
