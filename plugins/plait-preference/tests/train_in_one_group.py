"""``plait train`` on each config given, one after another, in one process
group: run under ``torchrun`` by test_precompute.py (starting the
processes is most of a small run's time, so one launch trains every case).

Rank 0 (where step events run) also writes ``reference.rank0.json`` into the
run's output_dir at its first step: what the objective scores the reference
with, for a model how its parameters are laid out on that rank, and the
local shape of the policy's first q_proj weight.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from plait import hookimpl
from plait.cli import main


class ReferenceLayout:
    @hookimpl
    def on_step_end(self, run, metrics):
        if run.step != 1:
            return
        reference = run.objective.reference
        seen = {"reference": reference if isinstance(reference, str) else type(reference).__name__}
        # the policy's layout on this rank: proof that FSDP2 or TP split it (a run left whole logs the same losses)
        q_proj = ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.base_layer.weight")  # LoRA's base
        policy_q = next(p for name, p in run.model.named_parameters() if name.endswith(q_proj))
        seen["policy_local_shape"] = list((policy_q.to_local() if hasattr(policy_q, "to_local") else policy_q).shape)
        if not isinstance(reference, str):
            params = dict(reference.named_parameters())
            weight = params["model.layers.0.self_attn.q_proj.weight"]
            seen.update(type=type(weight).__name__, full_shape=list(weight.shape),
                        local_shape=list(weight.to_local().shape) if hasattr(weight, "to_local") else None,
                        requires_grad=any(p.requires_grad for p in params.values()),
                        policy_local_elements=sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                                  for p in run.model.parameters()),
                        local_elements=sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                           for p in params.values()))
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.output_dir) / f"reference.rank{run.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    dist.init_process_group("gloo")  # train() keeps a group it did not start
    try:
        for config in sys.argv[1:]:
            code = main(["train", *config.split()], extra_plugins=[ReferenceLayout()])
            if code:
                sys.exit(code)
    finally:
        dist.destroy_process_group()
