"""Where the peak device memory of a bench SFT step sits, worked out on the CPU.

One training step of a ``bench/throughput.py`` shape (``--shape``: 1b, 8b,
moe, the smoke shapes) with LoRA r=16 on every linear layer (and the fused
experts of an MoE shape), non-reentrant gradient checkpointing (``--offload``:
``gradient_checkpointing: offload``), plait-kernels' Triton paths, bf16
weights under autocast, AdamW: Plait's own model set-up (``setup_model``:
checkpointing, plait-peft's LoRA, plait-kernels' patches and routed experts),
core's forward and loss step (``loss_of``: the fused head's chunked
cross-entropy), backward, gradient clipping, AdamW -- on *fake* tensors,
counted by plait-preference's :class:`LiveBytes` (every storage from its first
appearance to its release; see ``bench/preference_peak_cpu.py`` for what it
models and leaves out). Triton kernels are launched as no-ops; the routing of
a fake tensor has no values, which changes no allocation (every routed
tensor's size is ``tokens * k`` rows whatever the experts chosen).

    .venv/bin/python bench/train_peak_cpu.py --shape moe            # the MoE bench step (bench/moe_peak_cpu.py)
    .venv/bin/python bench/train_peak_cpu.py --shape 8b --micro-batch 1 --seq 16384 --offload
    .venv/bin/python bench/train_peak_cpu.py --shape 8b --micro-batch 1 --offload --max-seq 79
    .venv/bin/python bench/train_peak_cpu.py --shape 8b --micro-batch 1 --offload --max-seq 79 --host-gib 100
    .venv/bin/python bench/train_peak_cpu.py --shape 8b --calibrate   # the 8B steps measured on the H100

With ``--offload`` the bytes parked in host memory (each checkpointed layer's
input and the projections kept for its recompute) are not in the peak; their
highest total is printed beside it (``host_peak_bytes``): the host's pinned
memory can end a long sequence before the GPU's does.

``--max-seq GIB`` searches the longest sequence whose counted peak fits GIB
(powers of two from ``--search-start``, then a bisection to a multiple of
``--granule``), as ``bench/long_context.py --max-seq-search`` does on the GPU
against a real out-of-memory error.

Checked against the H100: the MoE step (bench/RESULTS.md, stop 23), before the
folded backward freed its tensors early, counted 24.94 GiB for the unfolded
routed path (``max_memory_allocated`` 25.10, 0.16 above) and 25.17 GiB for the
folded path with the Triton combine (25.24, 0.07 above). The 8B LoRA steps of
stop 19: see ``--calibrate`` (:data:`CALIBRATION`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # Plait picks its Triton paths on the CPU, as on CUDA

sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 2**30

#: the steps measured on the H100, by shape: name -> (micro batch, seq, offload, Plait keys, peak GiB by
#: max_memory_allocated); MoE: bench/RESULTS.md stop 23; 8B: stop 19 (calls 12 and 13)
CALIBRATION = {
    "moe": {
        "unfolded (stop 21's path)": (4, 2048, False, {"lora_experts_fold": False, "moe_combine_kernel": False,
                                                       "moe_weight_in_gate": False}, 25.10),
        "folded + combine kernel (stop 23)": (4, 2048, False, {"moe_weight_in_gate": False}, 25.24),
    },
    "8b": {
        "LoRA, offload, 1 x 16384 (stop 19 call 12)": (1, 16384, True, {}, 19.34),
        "QLoRA, offload, 1 x 16384 (stop 19 call 12)": (1, 16384, True, {"adapter": "qlora", "load_in_4bit": True},
                                                        9.70),
        "LoRA, offload, 4 x 2048 (stop 19 call 13)": (4, 2048, True, {}, 17.55),
    },
}


def _model(dims: dict, model_type: str, max_positions: int):
    """The bench's model of a shape, made in bf16 (``.to()`` cannot swap fake weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **dims, max_position_embeddings=max_positions, use_cache=False,
                                  attn_implementation="sdpa", dtype="bfloat16")
    if "num_experts" in dims:
        config._experts_implementation = "grouped_mm"  # the bench's experts_implementation
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)


def _small(dims: dict) -> dict:
    """A one-layer model of the same kind as ``dims``, to probe the head on real values."""
    small = {**dims, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    if "num_experts" in dims:
        small.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
    else:
        small.pop("head_dim", None)
    return small


@contextlib.contextmanager
def _every_label_trained():
    """plait-kernels' fused cross-entropy finds its trained rows with ``nonzero``,
    whose size a fake tensor cannot know: the bench's rows train every token,
    so the rows are all of them (the same int64 tensor ``nonzero`` makes)."""
    import torch

    from plait_kernels.ops import cross_entropy

    def every_row(hidden, head_weight, labels, head_bias=None, softcap=None, chunk_rows=None):
        rows = torch.arange(labels.numel(), device=labels.device)
        loss = cross_entropy.FusedLinearCrossEntropy.apply(hidden, head_weight, labels, head_bias, softcap,
                                                           chunk_rows, rows)
        return loss, rows.numel()

    class LabelsInRange:  # the module's torch, less the host read of the labels' bounds (no values here)
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def stack(tensors, *args, **kwargs):
            return SimpleNamespace(tolist=lambda: [0, 0])

    before = cross_entropy.fused_linear_cross_entropy, cross_entropy.torch
    cross_entropy.fused_linear_cross_entropy, cross_entropy.torch = every_row, LabelsInRange()
    try:
        yield
    finally:
        cross_entropy.fused_linear_cross_entropy, cross_entropy.torch = before


def fake_sft_peak(dims: dict, *, micro_batch: int, seq: int, keys: dict | None = None, offload: bool = False,
                  model_type: str = "llama", max_positions: int | None = None, steps: int = 2,
                  host_budget_bytes: int | None = None) -> dict:
    """One SFT step's peak (the last of ``steps``: AdamW's state exists then)
    of the shape ``dims`` (a transformers ``model_type``) on fake tensors; the
    same result dict as :func:`plait_preference.peak_memory.fake_dpo_peak`.
    ``offload``: ``gradient_checkpointing: offload`` (peak_memory's
    :func:`offload_counted`), with the offloader's host budget (what the GPU
    machine's free memory would give it; ``None``: no budget, every layer keeps
    its projections); ``max_positions``: the model's
    ``max_position_embeddings`` (default ``max(4096, seq)``, as the bench's)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from plait.hookspecs import hookimpl
    from plait.model import recompute
    from plait.pipeline import setup_model
    from plait.testing import build_run_config
    from plait.train.loop import loss_of
    from plait_preference import peak_memory as pk

    import throughput

    raw = {"base_model": "unused", "adapter": "lora", "lora_r": throughput.LORA_R,
           "lora_alpha": throughput.LORA_ALPHA, "lora_dropout": 0.0, "lora_target_linear": True,
           "bf16": True, "gradient_checkpointing": "offload" if offload else True, "plait_kernels": "triton", "sequence_len": seq,
           "micro_batch_size": micro_batch, "learning_rate": 1e-4, "weight_decay": 0.0, "max_grad_norm": 1.0,
           **({"lora_target_experts": True, "experts_implementation": "grouped_mm"} if "num_experts" in dims else {}),
           **(keys or {})}
    if raw.get("load_in_4bit") or raw.get("load_in_8bit") or raw.get("adapter") == "qlora":
        # plait-bnb quantizes while loading the weights (values a fake tensor lacks), and here load_model
        # is answered with a bf16 fake model: its count would be the LoRA one's, not a QLoRA step's
        raise ValueError(f"keys {keys}: a quantized base (adapter: qlora, load_in_4bit/8bit) is not counted "
                         "on fake tensors; use the LoRA shape")
    positions = max_positions or max(4096, seq)
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    class FakeModel:
        @hookimpl(tryfirst=True)
        def load_model(self, cfg, tokenizer):
            from plait.model import forward

            model = _model(dims, model_type, positions)  # fake: setup_model runs under the fake mode
            # the head probe compares values, which fake tensors lack: a small real model's answer is this one's
            with unset_fake_temporarily():
                forward._PLANS[model] = forward.probe_head(_model(_small(dims), model_type, 4096))
            return model

    cfg, pm = build_run_config(raw, plugins=[FakeModel()])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, dims["vocab_size"], (micro_batch, seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}  # full rows, as the bench's: no padding, no mask
    tracker = pk.LiveBytes()
    # the offloader reads its budget from this machine's free memory: the GPU machine's is modelled instead
    budget = contextlib.nullcontext() if not offload else \
        mock.patch.object(recompute, "host_budget_from_environment", lambda: host_budget_bytes)
    with pk.env_set("TRITON_INTERPRET", "1"), pk.triton_launches_skipped(), pk.fake_modules_movable(), \
            _every_label_trained(), budget, fake:
        model = setup_model(cfg, pm, None, for_training=True, device=torch.device("cpu"))
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, foreach=False)
        run = SimpleNamespace(model=model, device=torch.device("cpu"), input_device=None, pm=pm, cfg=cfg,
                              loss_fn=pm.hook.build_loss(cfg=cfg, model=model))

        def step():
            pk.counted_step(tracker, lambda: loss_of(run, batch, training=True)[0] / (micro_batch * (seq - 1)),
                            trained, optimizer)

        result = pk.peak_of_step(tracker, model, optimizer, trained, step, steps, offload)
    return {**result, "tokens": int(ids.numel())}


def search_max_seq(peak_of, budget_bytes: int, *, start: int = 16384, granule: int = 1024, report=print,
                   host_of=None, host_budget_bytes: int | None = None) -> tuple[int, dict[int, int]]:
    """The longest multiple of ``granule`` whose ``peak_of(seq)`` (bytes) fits
    ``budget_bytes``: powers of two from ``start`` (up while they fit, down from
    ``start`` while it does not), then a bisection between the longest fitting
    and the shortest failing probe. Returns it (0 if not even ``granule`` fits)
    and every probe's peak; ``report(line)`` is told each probe. With
    ``host_of`` (called after ``peak_of``, same ``seq``) the host's bytes must
    fit ``host_budget_bytes`` too (offloaded activations in pinned memory)."""
    peaks: dict[int, int] = {}

    def fits(seq: int) -> bool:
        peaks[seq] = peak_of(seq)
        ok = peaks[seq] <= budget_bytes
        line = f"  seq {seq:7d}: peak {peaks[seq] / GiB:8.3f} GiB"
        if host_of is not None:
            host = host_of(seq)
            ok = ok and host <= host_budget_bytes
            line += f", host {host / GiB:8.3f} GiB"
        report(f"{line}  {'fits' if ok else 'over'}")
        return ok

    if fits(start):
        good, bad = start, None
        while bad is None:
            if fits(2 * good):
                good *= 2
            else:
                bad = 2 * good
    else:
        good, bad = 0, start
        seq = start // 2
        while seq >= granule and good == 0:
            if fits(seq):
                good = seq
            else:
                bad, seq = seq, seq // 2
    while bad - good > granule:
        middle = (good + bad) // 2 // granule * granule
        if middle in (good, bad):
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, peaks


def report(result: dict, top: int) -> None:
    print(f"peak {result['peak_bytes'] / GiB:.3f} GiB, at: {result['peak_at']}")
    if result.get("host_peak_bytes"):
        print(f"  (offloaded to the host at most: {result['host_peak_bytes'] / GiB:.3f} GiB, not counted above)")
    for name, nbytes in result["groups"]:
        print(f"  {nbytes / GiB:7.3f} GiB  {name}")
    print("highest live bytes while each phase allocated:")
    for phase, nbytes in result["phase_peaks"].items():
        print(f"  {nbytes / GiB:7.3f} GiB  {phase}")
    print("largest live tensors at the peak:")
    for nbytes, label in result["largest"][:top]:
        print(f"  {nbytes / 2**20:9.1f} MiB  {label}")


def main(argv: list[str] | None = None, default_shape: str = "8b") -> int:
    import throughput

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(throughput.SHAPES), default=default_shape)
    parser.add_argument("--micro-batch", type=int, default=None, help="rows a step (default the bench's)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--offload", action="store_true", help="gradient_checkpointing: offload")
    parser.add_argument("--keys", default="{}", help="more Plait config keys, as JSON")
    parser.add_argument("--max-positions", type=int, default=None,
                        help="the model's max_position_embeddings (default max(4096, seq))")
    parser.add_argument("--max-seq", type=float, default=None, metavar="GIB",
                        help="search the longest sequence whose counted peak fits GIB")
    parser.add_argument("--host-gib", type=float, default=None,
                        help="the host memory free for offloading: with --max-seq the offloaded bytes must fit "
                             "it, and the offloader keeps projections within 80%% of it, as on the GPU machine")
    parser.add_argument("--search-start", type=int, default=16384, help="first probe of --max-seq")
    parser.add_argument("--granule", type=int, default=1024, help="--max-seq's answer is a multiple of this")
    parser.add_argument("--calibrate", action="store_true", help="also the configurations measured on the H100")
    parser.add_argument("--top", type=int, default=12, help="list this many of the largest live tensors at the peak")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = parser.parse_args(argv)

    micro_batch = args.micro_batch or throughput.DEFAULT_MICRO_BATCH[args.shape]
    dims = throughput.SHAPES[args.shape]
    model_type = throughput.MODEL_TYPES.get(args.shape, "llama")
    keys = json.loads(args.keys)
    # the offloader's own budget (core's host_budget_from_environment): 80% of what the host has free
    offload_budget = None if args.host_gib is None else int(0.8 * args.host_gib * GiB)
    peak_of = lambda seq, **more: fake_sft_peak(  # noqa: E731
        dims, micro_batch=more.get("micro_batch", micro_batch), seq=seq, keys=more.get("keys", keys),
        offload=more.get("offload", args.offload), model_type=model_type, max_positions=args.max_positions,
        host_budget_bytes=offload_budget)
    checkpointing = "offload" if args.offload else "default"
    out = {"args": vars(args)}
    if args.max_seq is not None:
        print(f"shape {args.shape}, micro batch {micro_batch}, {checkpointing} checkpointing, keys {args.keys}: "
              f"the longest sequence whose counted peak fits {args.max_seq} GiB"
              + (f" and whose offloaded bytes fit {args.host_gib} GiB of host memory" if args.host_gib else ""))
        results: dict[int, dict] = {}

        def probe(seq: int) -> int:
            results[seq] = peak_of(seq)
            return results[seq]["peak_bytes"]

        host = None if args.host_gib is None else (lambda seq: results[seq]["host_peak_bytes"])  # noqa: E731
        longest, peaks = search_max_seq(probe, int(args.max_seq * GiB), start=args.search_start,
                                        granule=args.granule, host_of=host,
                                        host_budget_bytes=None if args.host_gib is None else int(args.host_gib * GiB))
        print(f"longest fitting: {longest}")
        out.update(max_seq=longest, probe_peaks=peaks)
        if longest:
            print(f"at seq {longest}, {micro_batch * longest} tokens a step:")
            report(results[longest], args.top)
            out.update(results[longest])
    else:
        result = peak_of(args.seq)
        print(f"shape {args.shape}, {micro_batch} x {args.seq} tokens, {checkpointing} checkpointing, keys {args.keys}")
        report(result, args.top)
        out.update(result)
    if args.calibrate:
        for name, (rows, seq, offload, more, h100) in CALIBRATION.get(args.shape, {}).items():
            try:
                other = peak_of(seq, micro_batch=rows, keys=more, offload=offload)
            except Exception as error:  # noqa: BLE001 -- a path the fake tensors cannot run is reported, not fatal
                print(f"\n{name}: not counted here ({type(error).__name__}: {str(error)[:200]})")
                continue
            print(f"\n{name}: {other['peak_bytes'] / GiB:.3f} GiB here, {h100:.2f} GiB on the H100 "
                  f"({other['peak_bytes'] / GiB - h100:+.2f})")
            report(other, args.top)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
