"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction
Finetuning"): noise on the input embeddings while training.

``neftune_noise_alpha: a`` adds ``uniform(-1, 1) x a / sqrt(L x d)`` to every
input embedding of a training forward, where ``d`` is the embedding width and
``L`` the real length of the row the token belongs to (the paper's sequence
length: padding not counted, each row of a packed sequence its own length).
Evaluation, ``plait evaluate`` and inference never see noise: the hook adds it
only while the embedding module is in training mode, and only the training
loop attaches it.

Two hooks do it: a pre-forward hook on the module that owns the embeddings
(the backbone, which receives ``attention_mask`` and ``position_ids``) works
out each token's row length, and a forward hook on the embedding module adds
the noise of that scale to its output.
"""

from __future__ import annotations

import math


def token_row_lengths(input_shape, attention_mask=None, position_ids=None):
    """``[batch, width]``: for every token, the real length of its row.

    A 2-D 0/1 ``attention_mask`` (padded rows): each row's count of ones.
    Otherwise ``position_ids`` restarting at 0 (packed rows, whatever their
    attention input: a 4-D mask, a flex ``BlockMask``, varlen offsets): the
    length of each run from one 0 to the next. Neither: the full width.
    """
    import torch

    batch, width = input_shape
    # Plait's packed layouts never use a 2-D mask (a 4-D mask, a BlockMask or cu_seq_lens): a 2-D one is padding
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
            and not attention_mask.dtype.is_floating_point:
        return attention_mask.sum(-1, keepdim=True).expand(batch, width)
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == width:
        starts = (position_ids == 0)
        starts[:, 0] = True
        segment = starts.long().cumsum(-1) - 1  # 0-based segment index of every token
        counts = torch.zeros(position_ids.shape[0], width, dtype=torch.long, device=position_ids.device)
        counts.scatter_add_(1, segment, torch.ones_like(segment))
        return counts.gather(1, segment).expand(batch, width)
    return torch.full((batch, width), width, dtype=torch.long)


def owner_of(model, module):
    """The module that holds ``module`` as a direct child (the backbone)."""
    for parent in model.modules():
        if any(child is module for child in parent.children()):
            return parent
    return None


def attach_neftune(model, alpha: float) -> list:
    """Add NEFTune noise of ``alpha`` to ``model``'s input embeddings in
    training forwards; returns the hook handles (``.remove()`` detaches)."""
    from plait.model.forward import unwrap

    causal_lm = unwrap(model)
    embedding = causal_lm.get_input_embeddings()
    backbone = owner_of(causal_lm, embedding)
    seen: dict = {}

    def note_rows(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = tuple(ids.shape) if ids is not None and hasattr(ids, "shape") and ids.dim() == 2 else None
        seen["lengths"] = None if shape is None else token_row_lengths(
            shape, kwargs.get("attention_mask"), kwargs.get("position_ids"))

    def add_noise(module, args, output):
        if not module.training:
            return output
        lengths = seen.pop("lengths", None)  # this forward's rows only
        if lengths is None or tuple(lengths.shape) != tuple(output.shape[:2]):
            # a forward the backbone did not see (called on the embedding alone): the width counts
            scale = alpha / math.sqrt(output.shape[1] * output.shape[-1])
            return output + (output.new_empty(output.shape).uniform_(-1, 1) * scale)
        lengths = lengths.to(output.device).clamp(min=1)
        scale = alpha / (lengths.to(output.dtype) * output.shape[-1]).sqrt()
        return output + output.new_empty(output.shape).uniform_(-1, 1) * scale.unsqueeze(-1)

    handles = [embedding.register_forward_hook(add_noise)]
    if backbone is not None:
        handles.append(backbone.register_forward_pre_hook(note_rows, with_kwargs=True))
    return handles
