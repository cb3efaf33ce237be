"""Sample packing: plan which rows share a sequence, and build the model inputs
that keep them apart.

Packing puts several short tokenized rows into one sequence of at most
``sequence_len`` tokens so a micro-batch holds real tokens instead of padding.
Three rows of lengths 3, 2 and 2 packed into ``sequence_len = 8``::

    input_ids     a0 a1 a2 b0 b1 c0 c1 <pad>
    seq_lens      [3, 2, 2]            (+1 padding segment)
    position_ids   0  1  2  0  1  0  1  0        restart per row
    labels        -100 a1 a2 -100 b1 -100 c1 -100
                  ^ first label of every row masked: after the loop's shift,
                    position 2 (a2) would otherwise be trained to predict b0

    attention (1 = may attend), block-diagonal causal:
          a0 a1 a2 b0 b1 c0 c1 pad
    a0     1
    a1     1  1
    a2     1  1  1
    b0              1
    b1              1  1
    c0                    1
    c1                    1  1
    pad                         1     padding is its own segment, so no row of
                                      the mask is empty (SDPA would give NaN)

How the boundaries reach attention depends on the backend
(:func:`packed_attention_inputs`): SDPA and eager get the 4D mask above
(transformers uses a 4D mask as given, ``masking_utils._preprocess_mask_arguments``);
flash attention gets ``cu_seq_lens_q/k`` and ``max_length_q/k`` for its varlen
kernel; flex attention gets a ``BlockMask`` with a document mask. Nothing relies
on transformers re-deriving boundaries from ``position_ids``.

The plan (:func:`plan_packed_batches`) is best-fit-decreasing bin packing,
recomputed every epoch from ``seed`` and ``epoch`` and split evenly over ranks.
This module imports torch only inside the functions that build tensors.
"""

from __future__ import annotations

import bisect
import random
import traceback
from pathlib import Path
from typing import Sequence

from plait.errors import ConfigError, DataError, MachineFactError, PlaitError

#: attention backends whose packed rows this module can isolate
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention", "plait_varlen")

#: backends that take segment offsets (cu_seq_lens) instead of a mask
VARLEN_ATTENTION = ("flash_attention_2", "plait_varlen")


def is_varlen_attention(attn_implementation: str) -> bool:
    """A backend fed segment offsets: flash-attn, torch's varlen kernel, or a
    hub attention kernel, which transformers runs through the same flash
    attention wrapper (it reads ``cu_seq_lens_q/k``; checked after loading by
    :func:`check_hub_kernel_packing`)."""
    from plait.model.names import is_hub_kernel

    return attn_implementation in VARLEN_ATTENTION or is_hub_kernel(attn_implementation)


# -------------------------------------------------------------------- plan


def pack_bins(lengths: Sequence[int], sequence_len: int, *, seed: int = 0,
              max_rows_per_bin: int | None = None) -> list[list[int]]:
    """Best-fit-decreasing bin packing of row ``lengths`` into bins of ``sequence_len``.

    Rows are taken longest first; each goes into the open bin with the least
    room that still fits it (ties between equal lengths are broken by a
    ``seed``-shuffled order, so different seeds give different neighbours).
    Open bins are kept in buckets by remaining room, with a sorted list of the
    distinct room values, so one placement costs a bisect, not a scan of all
    bins: a million rows pack in seconds.

    Returns bins as lists of row indices. Raises :class:`DataError` for a row
    longer than ``sequence_len`` (the data step should have dropped or
    truncated it) or of length 0.
    """
    for index, length in enumerate(lengths):
        if length > sequence_len or length <= 0:
            raise DataError(
                f"row {index} has {length} tokens; packing needs 1..sequence_len={sequence_len} "
                "(over-long rows are dropped or truncated by excess_length_strategy before packing)"
            )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: shuffled order breaks ties

    bins: list[list[int]] = []
    room_of: list[int] = []
    buckets: dict[int, list[int]] = {}  # room left -> open bin ids
    rooms: list[int] = []  # sorted distinct keys of ``buckets``

    def open_bin_with(room: int, bin_id: int) -> None:
        if room <= 0 or (max_rows_per_bin is not None and len(bins[bin_id]) >= max_rows_per_bin):
            return  # full: never offered again
        if room not in buckets:
            buckets[room] = []
            bisect.insort(rooms, room)
        buckets[room].append(bin_id)

    for index in order:
        length = lengths[index]
        at = bisect.bisect_left(rooms, length)
        if at == len(rooms):
            bin_id = len(bins)
            bins.append([index])
            room_of.append(sequence_len - length)
        else:
            room = rooms[at]
            bucket = buckets[room]
            bin_id = bucket.pop()
            if not bucket:
                del buckets[room]
                rooms.pop(at)
            bins[bin_id].append(index)
            room_of[bin_id] = room - length
        open_bin_with(room_of[bin_id], bin_id)
    return bins


def pack_in_order(lengths: Sequence[int], sequence_len: int, *,
                  max_rows_per_bin: int | None = None) -> list[list[int]]:
    """Next-fit packing: rows in their order, each into the current bin while
    it fits (and the bin holds fewer than ``max_rows_per_bin`` rows), else into
    a new bin. Rows never change order, so a curriculum stays a curriculum."""
    bins: list[list[int]] = []
    room = 0
    for index, length in enumerate(lengths):
        if length > sequence_len or length <= 0:
            raise DataError(f"row {index} has {length} tokens; packing needs 1..sequence_len={sequence_len} "
                            "(over-long rows are dropped or truncated by excess_length_strategy before packing)")
        full = max_rows_per_bin is not None and bins and len(bins[-1]) >= max_rows_per_bin
        if not bins or length > room or full:
            bins.append([])
            room = sequence_len
        bins[-1].append(index)
        room -= length
    return bins


def plan_packed_batches(lengths: Sequence[int], sequence_len: int, micro_batch_size: int, seed: int, epoch: int,
                        rank: int = 0, world_size: int = 1, *,
                        max_rows_per_bin: int | None = None, in_order: bool = False,
                        sequential: bool = False) -> list[list[list[int]]]:
    """This rank's packed micro-batches for one epoch.

    ``in_order`` (``curriculum_sampling``): bins are filled next-fit in row
    order and kept in that order, the same every epoch (Axolotl's sequential
    packing). ``sequential`` (``sample_packing_sequentially``): the rows are
    shuffled with the seed and epoch, then filled next-fit in that order and
    the bins kept in it, as Axolotl packs its sampler's order (rows that sit
    together in the shuffle share a bin; no best-fit search). The rest below
    is about the default, best-fit and shuffled plan.

    Returns a list of micro-batches; each is a list of ``micro_batch_size``
    bins (the last may have fewer); each bin is a list of row indices whose
    lengths sum to at most ``sequence_len``.

    - Deterministic: the same ``(lengths, seed, epoch)`` give the same plan on
      every rank, so ranks agree without talking to each other.
    - A new ``epoch`` reshuffles which equal-length rows share a bin and the
      order of the bins.
    - Ranks: the shuffled bins are dealt round robin (bin ``i`` goes to rank
      ``i % world_size``). When the number of bins is not a multiple of
      ``world_size``, the remainder (fewer than ``world_size`` bins) is
      dropped so every rank takes the same number of steps; the dropped bins
      are the least full ones, chosen before shuffling, so the loss is as few
      tokens as possible, and the next epoch packs differently. A single
      process drops nothing.
    """
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size: {micro_batch_size} is not accepted; give an integer >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    epoch_seed = (int(seed) * 1_000_003 + int(epoch)) & 0xFFFFFFFF
    if in_order:
        bins = pack_in_order(lengths, sequence_len, max_rows_per_bin=max_rows_per_bin)
    elif sequential:
        order = list(range(len(lengths)))
        random.Random(epoch_seed + 2).shuffle(order)
        bins = [[order[j] for j in b]
                for b in pack_in_order([lengths[i] for i in order], sequence_len, max_rows_per_bin=max_rows_per_bin)]
    else:
        bins = pack_bins(lengths, sequence_len, seed=epoch_seed, max_rows_per_bin=max_rows_per_bin)
    if len(bins) < world_size:
        raise DataError(
            f"{len(lengths)} rows pack into {len(bins)} sequences of sequence_len={sequence_len}, fewer than the "
            f"{world_size} ranks; add data, lower sequence_len or run on fewer processes"
        )
    remainder = len(bins) % world_size
    if remainder:
        # drop the emptiest bins; ties by first row index so every rank agrees
        fill = [sum(lengths[i] for i in b) for b in bins]
        by_fill = sorted(range(len(bins)), key=lambda b: (fill[b], min(bins[b])))
        dropped = set(by_fill[:remainder])
        bins = [b for i, b in enumerate(bins) if i not in dropped]
    if not (in_order or sequential):
        random.Random(epoch_seed + 1).shuffle(bins)
    mine = bins[rank::world_size]
    return [mine[start:start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]


def sample_packing_efficiency(plan, lengths: Sequence[int], sequence_len: int) -> float:
    """Share of token slots that hold real tokens: ``sum(lengths) / (bins * sequence_len)``.

    ``plan`` is what :func:`plan_packed_batches` returns (micro-batches of
    bins) or a flat list of bins. 1.0 means no padding at all, when every
    sequence is padded to ``sequence_len``.
    """
    bins = [b for item in plan for b in (item if item and isinstance(item[0], list) else [item])]
    if not bins:
        return 0.0
    used = sum(lengths[i] for b in bins for i in b)
    return used / (len(bins) * sequence_len)


def use_packing(cfg, split: str = "train") -> bool:
    """Whether rows of ``split`` ("train" or "eval") are packed.

    Eval follows ``eval_sample_packing`` when it is set, otherwise
    ``sample_packing`` (Axolotl's rule).
    """
    if split == "eval" and cfg.eval_sample_packing is not None:
        return bool(cfg.eval_sample_packing)
    return bool(cfg.sample_packing)


# ------------------------------------------------------------------ inputs


def segment_lengths(row: dict) -> list[int]:
    """Lengths of the rows packed into ``row`` (``seq_lens``), or one segment."""
    n = len(row["input_ids"])
    lens = list(row.get("seq_lens") or [n])
    if sum(lens) != n or any(length <= 0 for length in lens):
        raise ValueError(f"packed row has seq_lens {lens} (sum {sum(lens)}) but {n} input_ids")
    return lens


def packed_attention_inputs(seq_lens: list[list[int]], width: int, attn_implementation: str, *,
                            dtype=None, device=None) -> dict:
    """The attention fields for a packed micro-batch of ``width`` tokens per bin.

    ``seq_lens[b]`` are the row lengths of bin ``b``; the tail up to
    ``width`` is padding and is treated as one more segment. Returns what
    the chosen backend needs to keep segments apart:

    - ``sdpa``: ``attention_mask`` bool ``[B, 1, W, W]``, True = may attend;
    - ``eager``: ``attention_mask`` additive float ``[B, 1, W, W]`` in
      ``dtype`` (0 or the dtype's minimum), since eager adds the mask to the
      scores;
    - ``flash_attention_2`` and ``plait_varlen`` (torch's ``varlen_attn``,
      :mod:`plait.model.varlen`): ``cu_seq_lens_q/k`` (int32 offsets over
      the flattened batch) and ``max_length_q/k`` (ints) for the varlen kernel;
    - ``flex_attention``: ``attention_mask`` as a ``BlockMask`` on ``device``.

    Everything is built on ``device`` (default: the CPU, or for flex the
    current CUDA device); on a GPU that turns the ``W x W`` compare from tens
    of milliseconds per micro-batch into microseconds and skips the copy.
    """
    import torch

    if attn_implementation not in SUPPORTED_ATTENTION and not is_varlen_attention(attn_implementation):
        raise ConfigError(
            f"sample_packing: attention {attn_implementation!r} cannot isolate packed rows; accepted: "
            f"{', '.join(SUPPORTED_ATTENTION)} (set sdp_attention, eager_attention, flash_attention or flex_attention)"
        )
    segments = [list(lens) + ([width - sum(lens)] if width > sum(lens) else []) for lens in seq_lens]

    if is_varlen_attention(attn_implementation):
        flat = [length for lens in segments for length in lens]
        offsets = torch.zeros(len(flat) + 1, dtype=torch.int32, device=device)
        offsets[1:] = torch.cumsum(torch.tensor(flat, dtype=torch.int32, device=device), 0)
        longest = max(flat)
        return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets.clone(),
                "max_length_q": longest, "max_length_k": longest}

    if attn_implementation == "flex_attention":
        return {"attention_mask": flex_document_mask(document_ids(segments, width), device=device)}

    doc_ids = document_ids(segments, width).to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
    allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # [B, 1, W, W]
    if attn_implementation == "sdpa":
        return {"attention_mask": allowed}
    dtype = dtype or torch.float32
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": additive}


def collate_packed(rows, pad_token_id: int, attn_implementation: str, *, pad_to: int | None = None,
                   dtype=None, device=None):
    """Lay out packed bins as one micro-batch ``[B, W]``.

    ``rows`` are dicts with ``input_ids``, ``labels`` and ``seq_lens`` (a row
    without ``seq_lens`` is one segment). Returns ``input_ids``, ``labels``
    (first label of every packed row set to -100, padding -100),
    ``position_ids`` restarting at 0 per row (and for the padding tail), and
    the attention fields of :func:`plait.data.packing.packed_attention_inputs`.
    ``dtype`` is the model's compute dtype (eager's additive mask), ``device``
    where a flex ``BlockMask`` is built.
    """
    import torch

    from plait.model.batch import pad_rows

    seq_lens = [segment_lengths(row) for row in rows]
    width = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)
    batch = pad_rows(rows, pad_token_id, width)
    del batch["attention_mask"]  # replaced by the packing fields below
    labels = batch["labels"]
    position_ids = torch.zeros_like(batch["input_ids"])
    for b, lens in enumerate(seq_lens):
        tail = width - sum(lens)
        start = 0
        for length in lens + ([tail] if tail else []):
            position_ids[b, start:start + length] = torch.arange(length)
            # after the loop's shift, this label is the target of the previous
            # row's last token: never train across a boundary
            labels[b, start] = -100
            start += length
    batch["position_ids"] = position_ids
    batch.update(packed_attention_inputs(seq_lens, width, attn_implementation, dtype=dtype, device=device))
    return batch


def document_ids(segments: list[list[int]], width: int):
    """``[B, W]`` long tensor numbering the segments of each bin 0, 1, 2, ..."""
    import torch

    ids = torch.empty(len(segments), width, dtype=torch.long)
    for b, lens in enumerate(segments):
        ids[b] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return ids


def flex_document_mask(doc_ids, device=None):
    """A flex-attention ``BlockMask``: causal within a document, nothing across.

    Built on ``device`` (default: the current CUDA device when there is one),
    because the mask function reads ``doc_ids`` on the device where the
    attention kernel runs.
    """
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    doc_ids = doc_ids.to(device)

    def document_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx])

    batch, width = doc_ids.shape
    return create_block_mask(document_causal, B=batch, H=None, Q_LEN=width, KV_LEN=width, device=device)


# ------------------------------------------------------------ config check

#: model types whose attention adds ALiBi biases instead of taking position_ids
ALIBI_MODEL_TYPES = ("bloom", "mpt")

#: ALiBi models whose bias is built from the 2-D padding mask (``build_alibi_tensor``
#: reads ``attention_mask.shape`` as ``[batch, seq]``) and folded into the causal mask their
#: layers get, so a packed 4-D mask can reach them neither at the top nor at the layers (BLOOM
#: keeps the bias apart from the mask: its layers take the packed one, see ``record_layer_masks``)
ALIBI_FROM_PADDING_MASK = ("falcon",)


def _model_config(source: str) -> dict:
    """The model's ``config.json`` when ``source`` is a local directory, else {}."""
    import json
    from pathlib import Path

    path = Path(source) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


#: layer types that are causal softmax attention under the mask they are given, so a packed
#: block-diagonal mask isolates rows exactly; "indexed_attention" is DeepSeek sparse attention
#: (DSA), whose indexer scores keys under that same mask and picks its top-k among them
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention")

#: layer types whose sequence mixing crosses packed rows whatever mask attention gets
#: (what the refusal says about them); checked in transformers' modeling code
CROSSING_LAYER_TYPES = {
    "linear_attention": "linear-attention layers carry a recurrent state along the sequence, from one packed row "
                        "into the next",
    "conv": "short-convolution layers mix each token with the ones before it, across packed row boundaries",
    "hybrid": "its attention layers run a short convolution over the sequence (on keys/values), which mixes "
              "tokens across packed row boundaries",
    "hybrid_sliding": "its attention layers run a short convolution over the sequence (on keys/values), which mixes "
                      "tokens across packed row boundaries",
    "compressed_sparse_attention": "compressed attention pools blocks of consecutive tokens into shared keys, "
                                   "which straddle packed row boundaries",
    "heavily_compressed_attention": "compressed attention pools blocks of consecutive tokens into shared keys, "
                                    "which straddle packed row boundaries",
}


def crossing_layers(model_config: dict, sequence_len: int | None = None, model=None) -> str | None:
    """Why some layers of the model mix tokens across packed rows whatever the
    attention mask (recurrent state, convolutions, pooled keys), or None.
    ``sequence_len`` and the loaded ``model``, when given, rule out BigBird's
    block-sparse attention where it does not run (:func:`block_sparse_limit`).

    A layer type Plait has not checked is named as unknown rather than guessed."""
    text = model_config.get("text_config") or model_config
    limit = block_sparse_limit(text, model)
    if limit is not None and (sequence_len is None or sequence_len > limit):
        return (f"attention_type 'block_sparse': BigBird's block-sparse attention, which it runs on sequences "
                f"longer than {limit} tokens, reads blocks of the whole sequence (both ways) and ignores the packed "
                f"mask; sequence_len: {limit} or less, or model_config: {{attention_type: original_full}}, keeps it "
                f"exact")
    layer_types = sorted(set(text.get("layer_types") or ()) - set(MASKED_LAYER_TYPES))
    if not layer_types:
        return None
    causes = sorted({CROSSING_LAYER_TYPES.get(kind, f"layer type {kind!r} is not one Plait knows to keep packed "
                                                     f"rows apart") for kind in layer_types})
    return f"layer_types {layer_types}: {'; '.join(causes)}"


def block_sparse_limit(text_config: dict, model=None) -> int | None:
    """The longest sequence BigBird attends to in full, when its block-sparse attention is on; else None.

    BigBird runs ``attention_type: block_sparse`` only on sequences longer than
    ``(5 + 2 * num_random_blocks) * block_size`` tokens (its global, sliding
    and random blocks), switching itself to full attention below that, where
    the packed mask applies. A loaded ``model`` with no module set to
    block-sparse attention has none to run (BigBirdPegasus's causal LM is its
    decoder, which attends in full whatever the config says)."""
    if text_config.get("attention_type") != "block_sparse":
        return None
    if model is not None and not any(getattr(m, "attention_type", None) == "block_sparse" for m in model.modules()):
        return None
    return (5 + 2 * int(text_config.get("num_random_blocks") or 3)) * int(text_config.get("block_size") or 64)


def windowed_attention(model_config: dict, sequence_len: int) -> str | None:
    """Why the model's attention is not plain causal over the sequence, or None.

    A sliding window (Mistral, Qwen2 with ``use_sliding_window``, Gemma's
    alternating layers) or chunked attention (Llama 4) is built by
    transformers' mask functions; a packed 4D mask or ``BlockMask`` replaces
    them, which would silently widen the window. A window of at least
    ``sequence_len`` never cuts anything, so the packed mask is exact there.
    Under SDPA/eager such a model packs through transformers' own masks
    instead (:func:`masks_from_positions`).
    """
    text = model_config.get("text_config") or model_config
    layer_types = set(text.get("layer_types") or ())
    window = text.get("sliding_window")
    windowed = "sliding_attention" in layer_types or (window and text.get("use_sliding_window", True))
    if windowed and not window:
        return f"layer_types {sorted(layer_types)} without a sliding_window"
    if windowed and window < sequence_len:
        return f"sliding_window={window} < sequence_len={sequence_len}"
    if text.get("attention_chunk_size"):
        return f"attention_chunk_size={text['attention_chunk_size']}"
    if "chunked_attention" in layer_types:
        return f"layer_types {sorted(layer_types)} without an attention_chunk_size"
    return None


def masks_from_positions(attn: str, window_why: str) -> str | None:
    """None when a windowed model can pack under ``attn`` by handing transformers
    only the restarting ``position_ids`` (no mask), else why not.

    With ``attention_mask=None`` and no cache, transformers' ``masking_utils``
    finds the packed rows from where ``position_ids`` restart
    (``find_packed_sequence_indices``) and builds a block-diagonal mask with the
    model's own sliding or chunked window inside each row, for SDPA and eager.
    A sliding window compares token distances, which are the same inside a
    packed row; chunks are counted from the start of the sequence, so they need
    the per-row positions transformers remaps them to
    (``remap_positions_for_packed_sequence``, in 5.25 but not in 5.17).
    Whether the loaded model builds its masks there at all is proved at load
    (:func:`packed_rows_leak`).
    """
    if attn not in ("sdpa", "eager"):
        return f"{attn} attention takes Plait's packed mask, which would replace the window"
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "this transformers does not find packed rows from position_ids"
    if "chunk" in window_why and not hasattr(masking_utils, "remap_positions_for_packed_sequence"):
        return "this transformers counts attention chunks from the start of the packed sequence, not of each row"
    return None


def alibi_attention(model_config: dict) -> str | None:
    """Why the model's attention is ALiBi (biases from token distances, not
    from ``position_ids``), or None.

    ALiBi needs no ``position_ids``: the bias a query gives a key grows with
    the key's index, and adding the same amount to every key a query may see
    does not change its softmax, so under a block-diagonal mask each packed
    row sees exactly what it sees alone (MPT; proved at load by
    :func:`packed_rows_leak`)."""
    text = model_config.get("text_config") or model_config
    model_type = text.get("model_type") or model_config.get("model_type")
    if model_type in ALIBI_MODEL_TYPES:
        return f"model_type {model_type!r} uses ALiBi"
    if text.get("alibi") or (text.get("attn_config") or {}).get("alibi"):
        return "alibi: true"
    if text.get("position_embedding_type") == "alibi":
        return "position_embedding_type: alibi"
    return None


def alibi_from_padding_mask(model_config: dict) -> str | None:
    """Why an ALiBi model cannot take a packed mask at all, or None."""
    text = model_config.get("text_config") or model_config
    model_type = text.get("model_type") or model_config.get("model_type")
    why = alibi_attention(model_config)
    if why and model_type in ALIBI_FROM_PADDING_MASK:
        return f"{why}, and {model_type} builds the ALiBi bias from a 2-D padding mask, which a packed mask is not"
    return None


def takes_position_ids(model) -> bool:
    """Whether the causal LM's ``forward`` names a ``position_ids`` argument
    (one that only swallows ``**kwargs`` would drop the per-row restart)."""
    import inspect

    from plait.model.forward import unwrap

    try:
        return "position_ids" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def check_packing_support(cfg, model=None) -> None:
    """Raise :class:`ConfigError` when packed rows could not be kept apart.

    Called twice when ``sample_packing`` or ``eval_sample_packing`` is on:
    from core's ``validate_config`` hookimpl before any model is loaded
    (``model`` None: the model's config is read from ``base_model_config``
    or ``base_model`` when it is a local directory), and from the loop right
    after ``load_model`` (:func:`check_loaded_model`) on the loaded model's
    ``config``, so a hub name is checked too.
    """
    import importlib.util

    attn = cfg.attn_implementation
    keys = "sample_packing" + (" / eval_sample_packing" if cfg.eval_sample_packing else "")
    if attn not in SUPPORTED_ATTENTION and not is_varlen_attention(attn):
        raise ConfigError(f"{keys}: attention {attn!r} cannot isolate packed rows; accepted: "
                          f"{', '.join(SUPPORTED_ATTENTION)}, or a hub flash-attention kernel")
    if model is not None:
        check_hub_kernel_packing(keys, attn)
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise MachineFactError(
            "attn_implementation: flash_attention_2 (flash_attention: true) with sample_packing needs the flash-attn "
            "package, which is not installed here; install it, or use attn_implementation: flex_attention (GPU) "
            "or sdpa"
        )
    if model is None:
        model_config = _model_config(getattr(cfg, "base_model_config", None) or cfg.base_model)
    else:
        model_config = model.config.to_dict()
    why = alibi_from_padding_mask(model_config)
    from plait.model.forward import segment_mixers

    # recurrent layers run one packed row at a time (record_segment_mixers): the rows reach them whatever the inputs
    per_row = model is not None and segment_mixers(model) is not None
    if why is None and model is not None and not takes_position_ids(model) and not alibi_attention(model_config) \
            and not per_row:
        # (an ALiBi model needs no position_ids: its positions are key distances, per row under the mask)
        from plait.model.forward import position_module

        # a model whose positions are only relative (RoFormer's rotary on queries and keys) needs none per row:
        # under the packed mask its rows are exact as they are, which a packed test batch shows
        if position_module(model) is None and packed_rows_leak(cfg, model) is not None:
            kinds = recurrent_layer_kinds(model)
            why = (f"{type(model).__name__}.forward takes no position_ids, and no module of it takes position_ids "
                   f"that reproduce its own positions" + (f"; its {', '.join(kinds[:3])} layers carry state along "
                                                          f"the sequence" if kinds else ""))
    if why:
        raise ConfigError(
            f"{keys}: the model cannot take packed rows ({why}): nothing in its inputs can tell it where each "
            f"packed row starts; "
            f"set {' and '.join(k + ': false' for k in keys.split(' / '))}"
        )
    if attn != "flash_attention_2" and not is_varlen_attention(attn):
        # which modules carry the state is known only once loaded (the load-time check refuses or routes them)
        why = crossing_layers(model_config, cfg.sequence_len, model) if model is not None and not per_row else None
        if why:
            raise ConfigError(f"{keys} with {attn} attention: packed rows would not be kept apart ({why}); "
                              f"set {' and '.join(k + ': false' for k in keys.split(' / '))}")
        why = windowed_attention(model_config, cfg.sequence_len)
        cannot = why and masks_from_positions(attn, why)
        if cannot:
            raise ConfigError(
                f"{keys} with {attn} attention: the model uses windowed attention ({why}), and {cannot}; "
                "set flash_attention: true (varlen keeps the window per row) or sample_packing: false"
            )


def check_hub_kernel_packing(keys: str, attn: str) -> None:
    """After loading: a hub kernel takes packed rows only when transformers
    registered it through its flash attention wrapper (the kernel has
    ``flash_attn_varlen_func``); a block-sparse or custom kernel does not read
    ``cu_seq_lens``, so packed rows would see each other."""
    from plait.model.names import is_hub_kernel

    if not is_hub_kernel(attn):
        return
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(attn) is not flash_attention_forward:
        raise ConfigError(f"{keys}: the hub kernel {attn!r} is not a flash-attention varlen kernel (transformers did "
                          f"not wrap it as flash attention), so it cannot keep packed rows apart; use a flash kernel "
                          f"such as kernels-community/flash-attn3, or set sample_packing: false")


def check_loaded_model(cfg, model) -> None:
    """:func:`check_packing_support` and :func:`packed_rows_leak` on the loaded
    ``model`` when the run packs (train or eval); the loop calls it right after
    ``load_model``, with the model on its device."""
    if cfg.sample_packing or cfg.eval_sample_packing:
        from plait.model.forward import (forget_layer_masks, forget_segment_mixers, mark_masks_from_positions,
                                         record_layer_masks, record_position_module, record_position_offset,
                                         record_segment_mixers)

        if not takes_position_ids(model):
            # BART-style decoders: the packed positions go to their position-embedding module instead
            record_position_module(model)
        forget_segment_mixers(model)
        try:
            check_packing_support(cfg, model)
            refusal = None
        except ConfigError as exc:
            # recurrent or convolutional layers: maybe exact when they run one packed row at a time
            if not record_segment_mixers(model):
                raise
            refusal = exc
            try:
                check_packing_support(cfg, model)  # what else it refuses still stands
            except ConfigError:
                forget_segment_mixers(model)
                raise

        # RoBERTa-style models count positions from padding_idx + 1: packed rows must too
        record_position_offset(model)
        attn = cfg.attn_implementation
        if attn in ("sdpa", "eager") and windowed_attention(model.config.to_dict(), cfg.sequence_len):
            # the window survives only in transformers' own masks: give it position_ids, no mask
            mark_masks_from_positions(model)
        keys = "sample_packing" + (" / eval_sample_packing" if cfg.eval_sample_packing else "")
        why = packed_rows_leak(cfg, model)
        if refusal is not None:
            if why:
                from plait.model.forward import segment_mixers, unwrap

                kinds = sorted({type(unwrap(model).get_submodule(n)).__name__ for n in segment_mixers(model)})
                forget_segment_mixers(model)
                raise ConfigError(f"{refusal} (running its {', '.join(kinds[:3])} modules one packed row at a "
                                  f"time does not make them exact either: {why})") from None
            return
        if why and record_layer_masks(model, _mask_builder(attn, model)):
            # the model's forward could not take the packed mask (BLOOM's ALiBi, GPT-1's own 4-D extension):
            # its decoder layers get it instead, if that is exact
            if packed_rows_leak(cfg, model) is None:
                why = None
            else:
                forget_layer_masks(model)
        if why and record_segment_mixers(model):
            # recurrent or convolutional state crosses the rows: run those modules one packed row at a time
            if packed_rows_leak(cfg, model) is None:
                why = None
            else:
                forget_segment_mixers(model)
        if why:
            what = ("this model cannot run a packed batch (its attention does not take Plait's packed inputs)"
                    if why.startswith(PACKED_BATCH_FAILED) else "packed rows are not kept apart by this model")
            raise ConfigError(f"{keys}: {what} ({why}): set {' and '.join(k + ': false' for k in keys.split(' / '))}")


def _mask_builder(attn: str, model):
    """``packed_mask(seq_lens, width, batch)`` for :func:`plait.model.forward.record_layer_masks`:
    the run's packed mask (``attn``) on the model's device and dtype, or ``None``
    for backends that take no tensor mask (varlen offsets, flex's ``BlockMask``)."""
    if attn not in ("sdpa", "eager"):
        return lambda seq_lens, width, batch: None
    weight = model.get_input_embeddings().weight

    def packed_mask(seq_lens, width, batch):
        return packed_attention_inputs([list(seq_lens)] * batch, width, attn, dtype=weight.dtype,
                                       device=weight.device)["attention_mask"]
    return packed_mask


#: how :func:`packed_rows_leak` starts its answer when the packed batch raised
PACKED_BATCH_FAILED = "a packed test batch failed"


def _describe_failure(exc: BaseException) -> str:
    """The exception's type and message; where the message is empty (a bare ``assert`` in the model's code,
    as XLM's mask check is), the function and file that raised it, so the refusal still says something."""
    text = " ".join(str(exc).split())[:200]
    if text:
        return f"{type(exc).__name__}: {text}"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} in {last.name}() of {Path(last.filename).name}, line {last.lineno}"


def recurrent_layer_kinds(model) -> list[str]:
    """Class names of the model's modules that look recurrent or convolutional
    (:data:`plait.model.forward.RECURRENT_HINTS`): named in a refusal as the likely cause. The
    models themselves (``MambaForCausalLM``, ``MambaModel``) are not layers."""
    from transformers import PreTrainedModel

    from plait.model.forward import RECURRENT_HINTS

    return sorted({type(m).__name__ for m in model.modules() if not isinstance(m, PreTrainedModel)
                   and any(h.lower() in type(m).__name__.lower() for h in RECURRENT_HINTS)})


def packed_rows_leak(cfg, model, lengths=(5, 7, 6)) -> str | None:
    """Why packing is not exact for ``model``, or ``None``: three rows of random
    tokens run one by one and packed into one bin (core's collation, the run's
    attention backend) must give the same logits at every position.

    This catches what no config key says: recurrent or convolutional state
    (Mamba, Jamba, Zamba, RecurrentGemma, LFM2) carried across the boundary,
    and position ids a model offsets itself (RoBERTa-style models start at
    ``padding_idx + 1``). Eval mode, no gradients; float32 must agree to 1e-3
    of the logits' scale, half precision to 5e-2.
    """
    import random

    import torch

    from plait.model.forward import forward_logits, probing, unwrap

    causal_lm = unwrap(model)
    embeddings = causal_lm.get_input_embeddings()
    device = embeddings.weight.device
    # the compute dtype (embeddings stay unquantized), for eager's additive mask
    dtype = embeddings.weight.dtype
    vocab = embeddings.num_embeddings
    rng = random.Random(0)
    rows = [[rng.randrange(min(8, vocab - 1), vocab) for _ in range(n)] for n in lengths]
    packed = collate_packed([{"input_ids": sum(rows, []), "labels": sum(rows, []), "seq_lens": list(lengths)}],
                            0, cfg.attn_implementation, dtype=dtype, device=device)
    packed = {k: v.to(device) if hasattr(v, "to") else v for k, v in packed.items() if k != "labels"}
    try:
        with probing(causal_lm):
            together = forward_logits(model, packed).logits[0].float()
            alone = torch.cat([forward_logits(model, _one_row(row, cfg.attn_implementation, dtype, device)).logits[0]
                               for row in rows]).float()
    except PlaitError:  # the model's own refusal (e.g. it does not run on token ids alone) says it better
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot run a packed batch cannot train on one
        return f"{PACKED_BATCH_FAILED}: {_describe_failure(exc)}"
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    scale = float(alone.abs().max()) + 1e-6
    diff = float((together - alone).abs().max())
    if diff <= tolerance * scale:
        return None
    kinds = recurrent_layer_kinds(causal_lm)
    from plait.model.forward import masks_from_positions_marked

    if kinds:
        cause = f"its {', '.join(kinds[:3])} layers carry state along the sequence"
    elif masks_from_positions_marked(model):
        cause = ("its windowed attention is packed through transformers' masks built from position_ids, "
                 "and this model does not build its masks there")
    else:
        cause = "its positions or sequence mixing do not restart per row"
    return f"{cause}; logits differ by {diff:.3g} against rows run alone"


def _one_row(row: list[int], attn_implementation: str, dtype, device) -> dict:
    """One row as the model sees it alone: plain token ids (the model's own
    positions, so an offset it applies is part of the comparison), except for
    torch's varlen kernel, which has no unpacked path and takes a one-row bin."""
    import torch

    if attn_implementation != "plait_varlen":
        return {"input_ids": torch.tensor([row], device=device)}
    bin_ = collate_packed([{"input_ids": row, "labels": row}], 0, attn_implementation, dtype=dtype, device=device)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in bin_.items() if k != "labels"}
