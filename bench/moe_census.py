"""What one MoE layer's routed LoRA experts launch per training step, counted on the CPU.

One Qwen3-MoE experts module at ``throughput.py --shape moe``'s layer (hidden 2048,
moe_intermediate 768, 128 experts, top-8, LoRA r 16 on gate_up_proj and down_proj
through peft ``target_parameters``), bf16, under non-reentrant gradient
checkpointing as the bench trains it (Plait's: the recompute pass is marked, so
what only makes the discarded output is skipped there): the forward, its recompute
in the backward, and the backward. For each variant of plait-kernels' routed path
(``plait_kernels.lora_experts``) it counts with :mod:`plait_kernels.census` the
aten kernels and interpreted Triton launches, the bytes they read and write (a
traffic model: every input read once, every output written once), the matmul
FLOPs, the launches that touch a ``[tokens * k, ...]`` tensor, and the bytes
autograd keeps from the layer's forward for its backward (parameters excluded).

The CPU cannot hold a step of 8192 tokens quickly, so each variant runs at two
small token counts (routing drawn uniformly at random) and every number is
extrapolated linearly to the bench's 8192 tokens (4 x 2048): the routed work is
linear in the tokens, and what does not depend on them (the factors' copies,
the sort's fixed costs) is the line's intercept.

    TRITON_INTERPRET=1 PYTHONPATH=core:plugins/plait-kernels .venv/bin/python bench/moe_census.py

``--tokens 64,128`` the two counts, ``--target 8192``, ``--small`` the test's tiny
shape (seconds), ``--out FILE`` writes the markdown table too.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton variants run on the CPU interpreter

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

BENCH = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, r=16)
SMALL = dict(hidden_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=4, r=8)

#: name -> install_routed_lora_experts keywords
VARIANTS = {
    "before: routed, weight on the down output (stop 21's default)": dict(weight_in_gate=False),
    "before: fold + combine kernel + Triton GLU": dict(weight_in_gate=False, fold=True, combine_kernel=True,
                                                       triton_glu=True),
    "after: routed, weight in the gate, PyTorch gate": dict(weight_in_gate=True),
    "after: routed, weight in the Triton GLU (the default on CUDA)": dict(weight_in_gate=True, triton_glu=True),
    "after: + combine kernel": dict(weight_in_gate=True, triton_glu=True, combine_kernel=True),
    "after: fold + combine kernel + Triton GLU": dict(weight_in_gate=True, fold=True, combine_kernel=True,
                                                      triton_glu=True),
}


def experts_wrapper(dims: dict, dtype, seed: int = 0):
    """The outermost peft ``ParamWrapper`` of one Qwen3-MoE experts module with LoRA on both projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=dims["hidden_size"], intermediate_size=64,
                            moe_intermediate_size=dims["moe_intermediate_size"], num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=dims["num_experts"], num_experts_per_tok=dims["num_experts_per_tok"],
                            decoder_sparse_step=1)
    config._experts_implementation = "grouped_mm"
    model = Qwen3MoeForCausalLM(config).to(dtype)
    r = dims["r"]
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj",
                                                                "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def count_step(model, variant: dict, tokens: int, dims: dict, dtype):
    """One checkpointed forward + backward of the experts module, counted."""
    from plait_kernels import lora_experts
    from plait.model.recompute import mark_recompute
    from plait_kernels.census import counting, saved_for_backward

    model = copy.deepcopy(model)
    assert lora_experts.install_routed_lora_experts(model, **variant) == ["Qwen3MoeExperts"]
    wrapper = lora_experts.outermost_expert_wrappers(model)[0]
    generator = torch.Generator().manual_seed(tokens)
    k, hidden = dims["num_experts_per_tok"], dims["hidden_size"]
    x = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    scores = torch.rand(tokens, dims["num_experts"], generator=generator)
    weights, index = scores.topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=generator).to(dtype)
    # as Plait checkpoints a layer: non-reentrant, its recompute pass marked (plait.model.recompute.is_recomputing)
    checkpointed = mark_recompute(lambda function, *args: checkpoint(function, *args, use_reentrant=False))
    with counting(big_rows=tokens * k) as census:
        out = checkpointed(wrapper, x, index, weights)
        out.backward(grad)
    # what the layer keeps from its recompute to its backward (the peak a checkpointed layer adds)
    with saved_for_backward(exclude=list(model.parameters()) + [x, weights]) as saved:
        out = wrapper(x, index, weights)
    census.saved_bytes = saved["bytes"]
    return census


def extrapolate(small, large, t_small: int, t_large: int, target: int) -> float:
    return small + (large - small) * (target - t_small) / (t_large - t_small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64,128", help="the two token counts run (default 64,128)")
    parser.add_argument("--target", type=int, default=8192, help="tokens extrapolated to (default 8192)")
    parser.add_argument("--small", action="store_true", help="a tiny shape (hidden 64): seconds")
    parser.add_argument("--top", type=int, default=8, help="ops listed per variant, by bytes (default 8)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    dims = SMALL if args.small else BENCH
    dtype = torch.bfloat16
    t1, t2 = (int(t) for t in args.tokens.split(","))
    model = experts_wrapper(dims, dtype)
    rows, tops = [], []
    for name, variant in VARIANTS.items():
        a, b = count_step(model, variant, t1, dims, dtype), count_step(model, variant, t2, dims, dtype)
        at = lambda f: extrapolate(f(a), f(b), t1, t2, args.target)  # noqa: E731
        # launch counts do not grow with the tokens: the larger run's
        rows.append((name, b.total_launches, sum(b.big.values()),
                     at(lambda c: c.total_bytes) / 1e9, at(lambda c: c.flops) / 1e9,
                     at(lambda c: c.saved_bytes) / 1e9))
        per_op = sorted(b.bytes, key=lambda op: -at(lambda c: c.bytes.get(op, 0)))
        tops.append((name, [(op, at(lambda c: c.launches.get(op, 0)), at(lambda c: c.bytes.get(op, 0)) / 1e9)
                            for op in per_op[:args.top]]))
    shape = ", ".join(f"{key} {value}" for key, value in dims.items())
    lines = [f"One MoE layer's routed experts, forward + checkpoint recompute + backward, bf16, {shape}; "
             f"counted at {t1} and {t2} tokens on the CPU, extrapolated to {args.target} tokens "
             f"({args.target * dims['num_experts_per_tok']} routed rows)", "",
             "| variant | kernels | kernels on [rows, *] | GB moved | GEMM GFLOP | GB saved for backward |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {k} | {big} | {gb:.2f} | {fl:.0f} | {sv:.2f} |" for n, k, big, gb, fl, sv in rows]
    lines += ["", "Largest ops by bytes (launches, GB):", ""]
    lines += [f"- {n}: " + "; ".join(f"{op} {k:.0f}x {gb:.2f}" for op, k, gb in ops) for n, ops in tops]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
