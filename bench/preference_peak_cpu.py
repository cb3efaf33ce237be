"""Where the peak device memory of a DPO step sits at a GPU bench shape, worked out on the CPU.

``bench/preference_bench.py --shape 1b`` trains a 1.2B Llama with DPO (LoRA
r=16 on every linear layer, reference = the adapter switched off,
non-reentrant gradient checkpointing, plait-kernels' Triton paths, bf16
weights under autocast, fused AdamW); on an H100 its peak was 3.83 GiB. This
script runs the same step -- Plait's own model set-up (``setup_model``:
checkpointing, plait-peft's LoRA, plait-kernels' patches), plait-preference's
objective, backward, gradient clipping, AdamW -- on *fake* tensors
(``torch._subclasses.FakeTensorMode``): every tensor has a shape, a dtype and
a storage of its size, and no data, so the 1b shape runs in seconds on a CPU.
Triton kernels are launched as no-ops (``TRITON_INTERPRET=1`` makes Plait pick
them on the CPU, as it does on CUDA; a kernel only writes into tensors torch
allocated, so skipping it changes no allocation).

A dispatch mode counts every storage from its first appearance to its release
(a weak reference to it), so the peak is the largest sum of live storages; the
storages live at that moment are then grouped by where they were made:

* weights (frozen, bf16), LoRA parameters, their gradients, AdamW's state;
* activations by phase (policy forward, reference forward, backward, recompute
  of a checkpointed layer) and module (``layers.N``, the head's log-probs in
  ``plait_preference/logps.py``, ...).

This is what ``torch.cuda.max_memory_allocated`` counts, less what is not
modelled: the allocator's rounding of each block (to 512 bytes), cuBLAS's
workspaces (which the caching allocator serves) and scratch memory of CUDA
kernels. ``--offload`` models ``gradient_checkpointing: offload``: a
checkpointed layer's input is counted as host memory once saved, and as a
fresh device copy when its backward fetches it (with the one the backward
needs next, as the prefetch does).

    .venv/bin/python bench/preference_peak_cpu.py                  # --shape 1b, the default path
    .venv/bin/python bench/preference_peak_cpu.py --offload
    .venv/bin/python bench/preference_peak_cpu.py --top 25         # the 25 largest live tensors at the peak

Checked against the H100 (bench/RESULTS.md, stop 21), before the LoRA MLP's
backward wrote its activation gradient in place: this count gave 3.760 GiB
(default) and 3.469 GiB (offload) where ``max_memory_allocated`` was 3.83 and
3.53 GiB, 0.06-0.07 GiB above it each, and the same 0.29-0.30 GiB between them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Plait picks its Triton paths on the CPU, as on CUDA

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["1b", "8b", "smoke"], default="1b")
    parser.add_argument("--pairs", type=int, default=None, help="pairs a step (the bench's: 1b 4, 8b 2)")
    parser.add_argument("--prompt", type=int, default=511, help="prompt tokens of a pair (the bench's: 511)")
    parser.add_argument("--response", type=int, default=513, help="tokens of each response (the bench's: 512 + EOS)")
    parser.add_argument("--offload", action="store_true", help="gradient_checkpointing: offload")
    parser.add_argument("--keys", default="{}", help="more Plait config keys, as JSON")
    parser.add_argument("--top", type=int, default=12, help="list this many of the largest live tensors at the peak")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = parser.parse_args()

    from plait.pipeline import setup_model
    from plait_preference.peak_memory import fake_dpo_peak

    import preference_bench
    import throughput
    import train_peak_cpu

    pairs = args.pairs or preference_bench.DEFAULT_MICRO_BATCH[args.shape]
    result = fake_dpo_peak(throughput.SHAPES[args.shape], setup_model, pairs=pairs, prompt=args.prompt,
                           response=args.response, lora_r=preference_bench.LORA_R,
                           lora_alpha=preference_bench.LORA_ALPHA, keys=json.loads(args.keys), offload=args.offload)
    print(f"shape {args.shape}, {pairs} pairs of {args.prompt} + {args.response} + {args.response}, "
          f"{'offload' if args.offload else 'default'} checkpointing; {result['tokens']} tokens a step")
    train_peak_cpu.report(result, args.top)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
