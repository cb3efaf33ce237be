"""Where the peak device memory of the MoE bench's training step sits, worked out on the CPU.

``bench/throughput.py --shape moe`` trains a Qwen3-MoE with Qwen3-30B-A3B's
layer (hidden 2048, 128 experts of 768, top-8; 16 layers, micro batch 4 x
2048 tokens, LoRA r=16 on attention and the fused experts, non-reentrant
gradient checkpointing, plait-kernels' Triton paths, bf16 weights under
autocast, AdamW). This script runs the same SFT step -- Plait's own model
set-up (``setup_model``: checkpointing, plait-peft's LoRA, plait-kernels'
patches and routed experts), core's forward and loss step (``loss_of``: the
fused head's chunked cross-entropy), backward, gradient clipping, AdamW -- on
*fake* tensors, counted by plait-preference's :class:`LiveBytes` (every
storage from its first appearance to its release; see
``bench/preference_peak_cpu.py`` for what it models and leaves out). Triton
kernels are launched as no-ops; the routing of a fake tensor has no values,
which changes no allocation (every routed tensor's size is ``tokens * k``
rows whatever the experts chosen).

    .venv/bin/python bench/moe_peak_cpu.py                       # the default routed path
    .venv/bin/python bench/moe_peak_cpu.py --keys '{"lora_experts_fold": false, "moe_combine_kernel": false, "moe_weight_in_gate": false}'
    .venv/bin/python bench/moe_peak_cpu.py --top 25              # the 25 largest live tensors at the peak

Checked against the H100 (bench/RESULTS.md, stop 23; ``--calibrate``): before the
folded backward freed its tensors early, this count gave 24.94 GiB for the
unfolded routed path (``max_memory_allocated`` 25.10, 0.16 above) and 25.17 GiB
for the folded path with the Triton combine (25.24, 0.07 above); the default
path (the routing weight in the gate) counted 25.17 GiB too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # Plait picks its Triton paths on the CPU, as on CUDA

sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 2**30

#: the configurations measured on the H100 (bench/RESULTS.md, stop 23), peak GiB by max_memory_allocated
CALIBRATION = {
    "unfolded (stop 21's path)": ({"lora_experts_fold": False, "moe_combine_kernel": False,
                                   "moe_weight_in_gate": False}, 25.10),
    "folded + combine kernel (stop 23)": ({"moe_weight_in_gate": False}, 25.24),
}


def _qwen3_moe(dims: dict):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**dims, max_position_embeddings=4096, use_cache=False, attn_implementation="sdpa",
                            dtype="bfloat16")
    config._experts_implementation = "grouped_mm"  # the bench's experts_implementation
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16, as the bench loads it (.to() cannot swap fake weights)
    try:
        return Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


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


def fake_sft_peak(dims: dict, *, micro_batch: int, seq: int, keys: dict | None = None, steps: int = 2) -> dict:
    """One SFT step's peak (the last of ``steps``: AdamW's state exists then)
    of the MoE shape ``dims`` on fake tensors; the same result dict as
    :func:`plait_preference.peak_memory.fake_dpo_peak`."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from plait.hookspecs import hookimpl
    from plait.model.recompute import is_recomputing
    from plait.pipeline import setup_model
    from plait.testing import build_run_config
    from plait.train.loop import loss_of
    from plait_preference import peak_memory as pk

    import throughput

    raw = {"base_model": "unused", "adapter": "lora", "lora_r": throughput.LORA_R,
           "lora_alpha": throughput.LORA_ALPHA, "lora_dropout": 0.0, "lora_target_linear": True,
           "lora_target_experts": True, "experts_implementation": "grouped_mm", "bf16": True,
           "gradient_checkpointing": True, "plait_kernels": "triton", "sequence_len": seq,
           "micro_batch_size": micro_batch, "learning_rate": 1e-4, "weight_decay": 0.0, "max_grad_norm": 1.0,
           **(keys or {})}
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    class FakeModel:
        @hookimpl(tryfirst=True)
        def load_model(self, cfg, tokenizer):
            from plait.model import forward

            model = _qwen3_moe(dims)  # fake: setup_model runs under the fake mode
            # the head probe compares values, which fake tensors lack: a small real model's answer is this one's
            small = {**dims, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
                     "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256}
            with unset_fake_temporarily():
                forward._PLANS[model] = forward.probe_head(_qwen3_moe(small))
            return model

    cfg, pm = build_run_config(raw, plugins=[FakeModel()])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, dims["vocab_size"], (micro_batch, seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}  # full rows, as the bench's: no padding, no mask
    tracker = pk.LiveBytes()
    with pk.env_set("TRITON_INTERPRET", "1"), pk.triton_launches_skipped(), pk.fake_modules_movable(), \
            _every_label_trained(), fake:
        model = setup_model(cfg, pm, None, for_training=True, device=torch.device("cpu"))
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, foreach=False)
        run = SimpleNamespace(model=model, device=torch.device("cpu"), input_device=None, pm=pm, cfg=cfg,
                              loss_fn=pm.hook.build_loss(cfg=cfg, model=model))

        def step():
            tracker.phase = "policy forward"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_sum, n_tokens = loss_of(run, batch, training=True)
            tracker.phase = "backward"
            (loss_sum / (micro_batch * (seq - 1))).backward()
            del loss_sum
            tracker.phase = "optimizer"
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(steps - 1):
            step()
        for module in model.modules():
            for tensor in module.parameters(recurse=False):
                tracker.known(tensor, "LoRA parameters" if tensor.requires_grad else "weights (frozen)")
            for tensor in module.buffers(recurse=False):
                tracker.known(tensor, "buffers (rotary tables)")
            folded = getattr(module, "_plait_folded_lora", None)
            if folded is not None:  # the fold's buffers: the frozen expert weights are views of them
                for tensor in (folded.gate_up, folded.down, folded.down_a):
                    tracker.known(tensor, "weights (frozen)")
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    tracker.known(value, "AdamW state")
        relabels = pk.grad_labels(trained, tracker)
        with tracker, pk.module_names(model, tracker), pk.PhaseOfRecompute(tracker, is_recomputing):
            step()
        for handle in relabels:
            handle.remove()
    peak, at = tracker.peak()
    live = tracker.live_at(at)
    groups: dict[str, int] = {}
    for sid, nbytes in live.items():
        name = pk.group_of(tracker.labels[sid])
        groups[name] = groups.get(name, 0) + nbytes
    largest = sorted(((nbytes, tracker.labels[sid]) for sid, nbytes in live.items()), reverse=True)
    return {"peak_bytes": peak, "peak_at": tracker.labels[tracker.events[at][0]],
            "groups": sorted(groups.items(), key=lambda item: -item[1]), "largest": largest,
            "phase_peaks": tracker.phase_peaks(), "tokens": int(ids.numel())}


def report(result: dict, top: int) -> None:
    print(f"peak {result['peak_bytes'] / GiB:.3f} GiB, at: {result['peak_at']}")
    for name, nbytes in result["groups"]:
        print(f"  {nbytes / GiB:7.3f} GiB  {name}")
    print("highest live bytes while each phase allocated:")
    for phase, nbytes in result["phase_peaks"].items():
        print(f"  {nbytes / GiB:7.3f} GiB  {phase}")
    print("largest live tensors at the peak:")
    for nbytes, label in result["largest"][:top]:
        print(f"  {nbytes / 2**20:9.1f} MiB  {label}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["moe", "smoke_moe"], default="moe")
    parser.add_argument("--micro-batch", type=int, default=None, help="rows a step (the bench's: 4)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--keys", default="{}", help="more Plait config keys, as JSON")
    parser.add_argument("--calibrate", action="store_true", help="also the configurations measured on the H100")
    parser.add_argument("--top", type=int, default=12, help="list this many of the largest live tensors at the peak")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = parser.parse_args()

    import throughput

    micro_batch = args.micro_batch or throughput.DEFAULT_MICRO_BATCH[args.shape]
    dims = throughput.SHAPES[args.shape]
    result = fake_sft_peak(dims, micro_batch=micro_batch, seq=args.seq, keys=json.loads(args.keys))
    print(f"shape {args.shape}, {micro_batch} x {args.seq} tokens, keys {args.keys}")
    report(result, args.top)
    if args.calibrate:
        for name, (keys, h100) in CALIBRATION.items():
            other = fake_sft_peak(dims, micro_batch=micro_batch, seq=args.seq, keys=keys)
            print(f"\n{name}: {other['peak_bytes'] / GiB:.3f} GiB here, {h100:.2f} GiB on the H100")
            report(other, args.top)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
