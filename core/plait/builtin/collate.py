"""Core's default collation: right-pad plain rows, or lay out packed bins.

A micro-batch whose rows carry ``seq_lens`` (bins made by sample packing, see
:mod:`plait.data.packing`) gets per-row ``position_ids``, masked first labels
and the attention fields of the configured backend, so no token attends to or
is trained on another row. Rows without ``seq_lens`` (plain rows, or eval
without ``eval_sample_packing``) are right-padded with a 2D ``attention_mask``,
which is correct for every backend except ``plait_varlen`` (torch's varlen
kernel sees no mask): for it, plain rows are laid out like one-row bins.

Also checks at config time that packing can be isolated for the chosen
attention (:func:`validate_config`).
"""

from __future__ import annotations

from plait.hookspecs import hookimpl
from plait.data.packing import collate_packed
from plait.model.batch import pad_rows


def is_packed(rows) -> bool:
    """True when any row of the micro-batch is a bin of several packed rows."""
    return any(row.get("seq_lens") for row in rows)


@hookimpl(trylast=True)
def collate(cfg, rows, tokenizer):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None
    # plait_varlen sees no mask, only segment offsets: plain rows go through the
    # packed layout too (one segment each, the padding tail its own segment)
    if not is_packed(rows) and cfg.attn_implementation != "plait_varlen":
        return pad_rows(rows, pad_id, pad_to)
    from plait.model.loading import compute_dtype

    return collate_packed(rows, pad_id, cfg.attn_implementation, pad_to=pad_to, dtype=compute_dtype(cfg),
                          device=attention_device())


def attention_device():
    """Where packed attention fields are built: the current CUDA device when
    there is one (the loop calls ``collate`` in the training process, after
    ``torch.cuda.set_device``), else the CPU. Building the ``[B, 1, W, W]``
    mask there costs microseconds instead of ~80 ms per 2 x 4096 on a CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


@hookimpl
def validate_config(cfg):
    """Refuse packing set-ups where rows could see each other, and
    ``varlen_attention`` where it cannot run."""
    if cfg.varlen_attention:
        check_varlen_support(cfg)
    if not (cfg.sample_packing or cfg.eval_sample_packing):
        return
    from plait.data.packing import check_packing_support

    check_packing_support(cfg)


def check_varlen_support(cfg) -> None:
    """``varlen_attention: true`` needs a CUDA GPU, torch's varlen module and
    ``sample_packing`` (the kernel's whole point is packed rows; plain rows
    would still be isolated, see :func:`collate`, but only pay for padding)."""
    from plait.model.varlen import varlen_available
    from plait.errors import ConfigError

    if not cfg.sample_packing:
        raise ConfigError(
            f"varlen_attention: true needs sample_packing: true (sample_packing is {cfg.sample_packing!r}); "
            "turn packing on, or use sdp_attention / flash_attention for unpacked batches"
        )
    if not varlen_available():
        raise ConfigError(
            "varlen_attention: true needs a CUDA GPU and a torch with torch.nn.attention.varlen; this machine "
            "has none; set sdp_attention: true (or flex_attention) instead"
        )
