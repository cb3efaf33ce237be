"""``precompute_ref_log_probs: true``: the reference's log-probabilities, once.

Before the first step, the starting model (the base with the adapter switched
off under LoRA) scores every sequence of the training and eval rows, once,
eval mode, no gradients; each row's per-segment sums are stored in a file
beside the prepared dataset, named by a key of the model and the data, and
the rows the loop collates carry them (``ref_logps`` in the row's extras,
``batch["ref_logps"]`` after collation). The objective then runs no
reference forward and keeps no frozen copy of the model.

With several processes each data-parallel rank scores a share of the rows
and all ranks exchange them; rank 0 decides whether the file exists, reads
it and writes it, and the others take its answer, so every rank trains on
the same values.

The file is what makes resuming possible: after a restart the model holds
trained weights and cannot score for the reference again, so a resumed run
reads the file its first run wrote (the same key), and refuses, naming the
file, when it is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

#: bump when the stored values would change meaning
FORMAT = 1


def model_key(cfg, model) -> dict:
    """What decides the reference's log-probabilities besides the data: the
    starting weights (files, sizes, modification times, the revision and the
    config overrides they load with), their dtype and quantization, the
    precision the forward computes in, the adapter the run starts from.

    Not the world size, nor how rows are dealt to ranks or batched: each
    row's values are stored at its index in the prepared dataset, whichever
    rank scored it in whichever batch (test_precompute.py finds one process's
    file in two processes' under FSDP2 and under TP), so a file is reused
    across layouts. What a layout changes in the arithmetic is in the key:
    FSDP2's mixed precision casts fp32 weights to bf16 for the forward
    (``bf16: true`` with ``torch_dtype: float32``), where one process computes
    in fp32 (:func:`precision`)."""
    def files(path):
        if not path or not os.path.isdir(path):
            return path
        found = []
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin", ".json")):
                stat = os.stat(os.path.join(path, name))
                found.append([name, stat.st_size, stat.st_mtime_ns])
        return {"path": os.path.abspath(path), "files": found}

    return {"base_model": files(cfg.base_model), "lora_model_dir": files(getattr(cfg, "lora_model_dir", None)),
            "revision": getattr(cfg, "revision_of_model", None),
            "overrides": getattr(cfg, "overrides_of_model_config", None) or None,
            "precision": precision(cfg, model), "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
            "load_in_8bit": bool(getattr(cfg, "load_in_8bit", False)), "format": FORMAT}


def precision(cfg, model) -> dict:
    """The dtypes of the scoring forward: the weights' (as loaded), the one
    the config asks the loop to compute in (``torch_dtype``/``bf16``/``fp16``,
    core's autocast on an accelerator), and the one FSDP2 gathers sharded
    weights in (``None``: not sharded, or no cast)."""
    from plait.model.loading import compute_dtype
    from plait_preference.sharded_reference import gathered_dtype

    first = next(iter(model.parameters()), None)
    return {"weights": str(getattr(first, "dtype", None)), "compute": str(compute_dtype(cfg)),
            "gathered": gathered_dtype(model)}


def data_key(dataset) -> str:
    if dataset is None:
        return ""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return f"{fingerprint}:{len(dataset)}"
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps([row["input_ids"], row["labels"], row.get("extras")]).encode())
    return digest.hexdigest()


def cache_file(cfg, model, train, eval_data) -> Path:
    key = hashlib.sha256(json.dumps({"model": model_key(cfg, model), "train": data_key(train),
                                     "eval": data_key(eval_data)}, sort_keys=True).encode()).hexdigest()[:20]
    home = _prepared_dir(train) or Path(cfg.output_dir)
    return home / "ref_log_probs" / f"{key}.safetensors"


def _prepared_dir(dataset):
    """The folder of the prepared dataset's Arrow files (the dataset cache entry)."""
    files = getattr(dataset, "cache_files", None) or []
    return Path(files[0]["filename"]).parent.parent if files else None


def compute(run, dataset) -> tuple:
    """``(values [segments] float32, offsets [rows + 1] int64)``: each row's
    reference log-prob sums over its response tokens, in segment order.

    The rows go in batches of ``micro_batch_size``; with several processes
    the data-parallel ranks take turns (batch ``b`` on rank ``b % ranks``),
    so each scores its share, and every rank ends up with all of them
    (:func:`_exchange`). A rank out of batches scores its first one again and
    drops the result: an FSDP2 forward is a collective every rank must join.
    """
    import torch

    from plait.data.batching import materialize
    from plait.model.forward import probing
    from plait_preference.collate import to_device
    from plait_preference.logps import segment_logps

    objective = run.objective
    size = max(1, int(run.cfg.micro_batch_size or 1))
    batches = [list(range(start, min(start + size, len(dataset)))) for start in range(0, len(dataset), size)]
    rank, ranks = (run.dp_rank, run.dp_size) if run.world_size > 1 else (0, 1)
    mine = batches[rank::ranks]
    turns = -(-len(batches) // ranks)
    scored = {}  # row index -> its segments' sums
    # under the step's autocast: a frozen copy scores inside the step, so stored values must be computed the same way
    with probing(run.model), run.forward_precision(), objective.reference_context(run.model, precomputing=True) as model:
        for turn in range(turns):
            indices = mine[turn] if turn < len(mine) else batches[0]
            rows = [materialize(dataset, [i]) for i in indices]
            batch = to_device(run.pm.hook.collate(cfg=run.cfg, rows=rows, tokenizer=run.tokenizer), run.device)
            sums = segment_logps(model, batch, batch["scoring_plan"]).completion.float().cpu().tolist()
            if turn >= len(mine):
                continue
            for i, row in zip(indices, rows):
                scored[i], sums = sums[:len(row["seq_lens"])], sums[len(row["seq_lens"]):]
    if run.world_size > 1:
        scored = _exchange(scored)
    values, offsets = [], [0]
    for i in range(len(dataset)):
        values += scored[i]
        offsets.append(len(values))
    return torch.tensor(values, dtype=torch.float32), torch.tensor(offsets, dtype=torch.long)


def _exchange(scored: dict) -> dict:
    """Every rank's ``{row: sums}`` merged, on every rank (ranks that share a
    batch, tensor-parallel ones, gave the same values)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, scored)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def _from_main(run, read):
    """``read()`` on rank 0, its result on every rank: whether the file is
    there and what it holds must be one answer for all, or a rank would skip
    the scoring the others wait for in a collective."""
    if run.world_size <= 1:
        return read()
    import torch.distributed as dist

    box = [read() if run.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def attach(run) -> None:
    """Load (or compute and store) the reference log-probs of the run's rows and
    let its training and eval rows carry them."""
    from safetensors.torch import load_file, save_file

    from plait.errors import TrainingError

    path = cache_file(run.cfg, run.model, run.train_data, run.eval_data)
    splits = {"train": run.train_data, "eval": run.eval_data}
    if _from_main(run, path.exists):
        stored = _from_main(run, lambda: load_file(str(path)))
        _say(run, f"precompute_ref_log_probs: reference log-probs read from {path}")
    else:
        resumed = run.resumed_at_step
        if resumed is not None and run.objective.needs_starting_weights:
            raise TrainingError(
                f"precompute_ref_log_probs: true: the reference log-probs of this run ({path}) are missing and the "
                f"model resumed at step {resumed} holds trained weights, so it cannot score as the reference; "
                f"restore the file, or start the run over (without resuming)")
        stored = {}
        for name, dataset in splits.items():
            if dataset is not None and len(dataset):
                stored[f"{name}.values"], stored[f"{name}.offsets"] = compute(run, dataset)
        if run.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".tmp{os.getpid()}")
            save_file(stored, str(partial))
            os.replace(partial, path)  # whole or absent: a crash mid-write leaves no half file
        _say(run, f"precompute_ref_log_probs: reference log-probs of {sum(len(v) for k, v in stored.items() if k.endswith('values'))} "
                  f"sequences stored in {path}")
    run.train_data = WithRefLogps(run.train_data, stored["train.values"], stored["train.offsets"])
    if run.eval_data is not None and "eval.values" in stored:
        run.eval_data = WithRefLogps(run.eval_data, stored["eval.values"], stored["eval.offsets"])


def _say(run, message: str) -> None:
    if run.is_main:  # one line per run, not one per process
        print(message, file=sys.stderr, flush=True)


class WithRefLogps:
    """A prepared dataset whose rows' extras also hold ``ref_logps`` (one per
    segment); everything else is the dataset's own."""

    def __init__(self, dataset, values, offsets):
        self.dataset = dataset
        self.values, self.offsets = values.tolist(), offsets.tolist()
        if len(self.offsets) != len(dataset) + 1:
            raise ValueError(f"reference log-probs for {len(self.offsets) - 1} rows, the dataset has {len(dataset)}")

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def _extras(self, index: int, extras: str | None) -> str:
        data = json.loads(extras) if extras else {}
        data["ref_logps"] = self.values[self.offsets[index]:self.offsets[index + 1]]
        return json.dumps(data)

    def __getitem__(self, key):
        if isinstance(key, int):
            row = dict(self.dataset[key])
            row["extras"] = self._extras(key, row.get("extras"))
            return row
        if isinstance(key, str):
            return self.dataset[key]
        indices = [int(i) for i in key]
        rows = dict(self.dataset[indices])
        rows["extras"] = [self._extras(i, e) for i, e in zip(indices, rows.get("extras") or [None] * len(indices))]
        return rows
