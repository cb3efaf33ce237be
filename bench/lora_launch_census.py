"""Kernel launches of one checkpointed LoRA training step, counted on the CPU.

A tiny Llama (``plait.testing.make_tiny_model``) in bfloat16 with float32 LoRA
factors on every linear layer (peft's default under a bf16 base), patched with
plait-kernels' Triton paths run by the interpreter, non-reentrant gradient
checkpointing: one forward and backward is counted with
:mod:`plait_kernels.census` (each aten op that would launch a device kernel,
each Triton launch). ``--cast-once`` holds the factor-cast cache as a training
run does (``plait_kernels.factor_casts``), emptied before the counted step as
an optimizer step empties it. On a GPU each launch is host work; this counts
them without one.

    TRITON_INTERPRET=1 .venv/bin/python bench/lora_launch_census.py
    TRITON_INTERPRET=1 .venv/bin/python bench/lora_launch_census.py --cast-once
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cast-once", action="store_true", help="hold the factor-cast cache, as a run does")
    parser.add_argument("--top", type=int, default=12, help="list the most launched ops")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before plait_kernels defines its kernels

    import torch

    from plait.testing import make_tiny_model
    from plait_kernels import factor_casts
    from plait_kernels.census import counting
    from plait_kernels.patch import patch
    from plait_kernels.testing import lora_model

    with tempfile.TemporaryDirectory() as tmp:
        model = lora_model(make_tiny_model(Path(tmp) / "llama"), torch.bfloat16, "cpu")  # r 4 on every linear
    cfg = type("Cfg", (), {"torch_compile": False, "plugin_manager": None})()
    report = patch(cfg, model, dict(rms_norm="triton", rope="triton", glu="triton", loss=None))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    hold = factor_casts.hold_for_run(optimizer) if args.cast_once else None

    def step():
        model(input_ids=ids).logits.float().sum().backward()
        optimizer.zero_grad(set_to_none=True)  # no gradient accumulation adds in the counted step

    step()  # the first call sets things up (rotary tables, ...)
    factor_casts.clear()  # as the optimizer step does: the counted step casts its factors once
    with counting() as census:
        step()
    if hold is not None:
        hold.remove()
    layers = model.config.num_hidden_layers
    print(f"patched: {report}")
    print(f"{layers} layers, factor casts {'once a step' if args.cast_once else 'at every use'}: "
          f"{census.total_launches} launches ({census.total_launches / layers:.0f} a layer, the head included)")
    for name, count in census.launches.most_common(args.top):
        print(f"  {count:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
