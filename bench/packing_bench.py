"""Benchmark and GPU check of sample packing.

    python bench/packing_bench.py            # H200: 1B-shaped Llama, bf16 (< 6 min)
    python bench/packing_bench.py --smoke    # CPU: tiny model, 2 steps, checks the script works

Two parts, both printed as markdown tables:

1. Isolation on the device: for each packed backend (SDPA with a 4D
   block-diagonal mask, flex attention with a ``BlockMask``, flash-attn varlen
   when installed, torch's own ``varlen_attn`` as ``plait_varlen`` when
   ``torch.nn.attention.varlen`` exists on CUDA), a small random Llama runs a few rows packed and the same
   rows one by one through plain SDPA; the summed loss and every gradient must match. fp32 for
   SDPA/flex (loss within 2e-5 relative, each gradient within 1e-4 of its norm,
   TF32 off), bf16 for flash and plait_varlen (their kernels have
   no fp32; loss within 1e-2 relative and gradient cosine similarity
   >= 0.999). A leaky control (plain causal attention over the packed
   sequence) shows the size of a real leak next to it.
2. Throughput: a random 1B-shaped Llama (hidden 2048, 16 layers, 32 heads,
   8 KV heads, intermediate 8192, vocab 128256) in bf16 takes forward +
   backward + AdamW steps on rows of 30-1500 tokens (lognormal, median ~200),
   padded (micro-batches of 8 rows, right-padded to the longest, 2D mask) vs
   packed (micro-batches of 2 bins of 4096 tokens). "Useful tokens/s" counts
   only real tokens, so padding is not rewarded.

Inputs are built by core's own ``collate_packed``/``pad_rows``; the loss is
core's chunked cross-entropy over the backbone's hidden states, as the
training loop computes it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # run from a checkout without installing

import torch  # noqa: E402

from plait.data.packing import collate_packed  # noqa: E402
from plait.model.batch import pad_rows  # noqa: E402
from plait.model.head import chunked_linear_cross_entropy  # noqa: E402
from plait.data.packing import plan_packed_batches, sample_packing_efficiency  # noqa: E402

BIG = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
           intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192)
SMALL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1024, max_position_embeddings=8192)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, max_position_embeddings=1024)


#: packed backends whose kernels have no fp32 (checked in bf16)
HALF_ONLY = ("flash_attention_2", "plait_varlen")


def have_torch_varlen(device) -> bool:
    """torch's ``varlen_attn`` is usable: CUDA and a torch that ships ``torch.nn.attention.varlen``."""
    try:
        found = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        found = False
    return found and device.type == "cuda"


def build_model(shape, attn, dtype, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, attn_implementation=attn, use_cache=False, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def make_rows(n, vocab, lo, hi, median, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = max(lo, min(hi, int(rng.lognormvariate(math.log(median), 0.9))))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(0, length // 3)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def materialize(rows, bin_):
    if len(bin_) == 1:
        return dict(rows[bin_[0]])
    return {"input_ids": [t for i in bin_ for t in rows[i]["input_ids"]],
            "labels": [t for i in bin_ for t in rows[i]["labels"]],
            "seq_lens": [len(rows[i]["input_ids"]) for i in bin_]}


def to_device(batch, device):
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def loss_of(model, batch):
    """Summed CE over trained tokens from the backbone's hidden states (the loop's way)."""
    labels = batch["labels"][:, 1:]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    return chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                        labels.reshape(-1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- isolation


def packed_batches(rows, attn, seq_len, mbs, device, dtype, pad_to=None):
    plan = plan_packed_batches([len(r["input_ids"]) for r in rows], seq_len, mbs, seed=0, epoch=0)
    for micro_batch in plan:
        yield to_device(collate_packed([materialize(rows, b) for b in micro_batch], 0, attn, pad_to=pad_to,
                                       dtype=dtype, device=device), device)


def run_and_grads(model, batches):
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss, _ = loss_of(model, batch)
        loss.backward()
        total += loss.item()
    return total, [p.grad.float().clone() for p in model.parameters()]


def isolation_check(attn, device, shape):
    """Packed vs one by one: loss rel. diff, worst grad rel. diff, min grad cosine, and the
    loss and worst grad rel. diffs of the leaky control."""
    dtype = torch.bfloat16 if attn in HALF_ONLY or attn.startswith("flash") else torch.float32
    model = build_model(shape, attn, dtype, device, seed=1)
    with torch.no_grad():  # sharper attention, so a leak would show in the loss
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    rows = make_rows(12, shape["vocab_size"], 5, 120, 40, seed=2)
    one_by_one = (to_device({"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["labels"]])},
                            device) for r in rows)
    # the reference runs through SDPA, an independent kernel, with no mask at all;
    # it also spares flex a recompile for every row length
    model.set_attn_implementation("sdpa")
    ref_loss, ref_grads = run_and_grads(model, one_by_one)
    model.set_attn_implementation(attn)
    loss, grads = run_and_grads(model, packed_batches(rows, attn, 256, 2, device, dtype, pad_to=256))
    # leaky control: the same packed tokens with plain causal attention and positions 0..W-1
    model.set_attn_implementation("sdpa")
    leak_loss, leak_grads = run_and_grads(model, ({"input_ids": b["input_ids"], "labels": b["labels"]}
                                         for b in packed_batches(rows, "sdpa", 256, 2, device, dtype)))
    grad_rel = max(((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(grads, ref_grads))
    cos = min(torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
              for g, r in zip(grads, ref_grads) if r.norm() > 0)
    leak_rel = max(((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(leak_grads, ref_grads))
    return abs(loss - ref_loss) / ref_loss, grad_rel, cos, abs(leak_loss - ref_loss) / ref_loss, leak_rel


# --------------------------------------------------------------- throughput


def throughput(model, batches, steps, warmup, device):
    """Useful (non-pad) tokens per second over ``steps`` timed AdamW steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batches = iter(batches)
    useful, slots, peak = 0, 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        batch = next(batches)
        real_tokens = batch.pop("real_tokens")
        loss, _ = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            useful += real_tokens
            slots += batch["input_ids"].numel()
    sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    del optimizer
    return useful / elapsed, useful / slots, elapsed / steps, peak


def cycle_padded(rows, mbs, device, seed=0):
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order) - mbs + 1, mbs):
            chosen = [rows[i] for i in order[start:start + mbs]]
            batch = pad_rows(chosen, 0)
            batch["real_tokens"] = sum(len(r["input_ids"]) for r in chosen)
            yield to_device(batch, device)


def cycle_packed(rows, attn, seq_len, mbs, device, dtype):
    lengths = [len(r["input_ids"]) for r in rows]
    epoch = 0
    while True:
        for micro_batch in plan_packed_batches(lengths, seq_len, mbs, seed=0, epoch=epoch):
            batch = collate_packed([materialize(rows, b) for b in micro_batch], 0, attn, pad_to=seq_len,
                                   dtype=dtype, device=device)
            batch["real_tokens"] = sum(lengths[i] for b in micro_batch for i in b)
            yield to_device(batch, device)
        epoch += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args(argv)

    if args.smoke:
        device, dtype, shape, check_shape = torch.device("cpu"), torch.float32, TINY, TINY
        seq_len, packed_mbs, padded_mbs, n_rows, lo, hi, median = 256, 2, 8, 64, 8, 200, 30
        steps, warmup = args.steps or 2, args.warmup if args.warmup is not None else 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: skipping (use --smoke on the CPU)")
            return 0
        device, dtype, shape, check_shape = torch.device("cuda"), torch.bfloat16, BIG, SMALL
        seq_len, packed_mbs, padded_mbs, n_rows, lo, hi, median = 4096, 2, 8, 3000, 30, 1500, 200
        steps, warmup = args.steps or 12, args.warmup if args.warmup is not None else 3
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 equality checks need exact fp32
        torch.backends.cudnn.allow_tf32 = False

    have_flash = importlib.util.find_spec("flash_attn") is not None and device.type == "cuda"
    # flex attention has no CPU backward; on the GPU it is one of the measured backends
    packed_backends = ["sdpa"] + (["flex_attention"] if device.type == "cuda" else ["eager"])
    packed_backends += ["flash_attention_2"] if have_flash else []
    have_varlen = have_torch_varlen(device)
    if have_varlen:
        from plait.model.varlen import register_varlen_attention

        register_varlen_attention()  # "plait_varlen" must exist before a model or set_attn_implementation names it
        packed_backends.append("plait_varlen")

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"flash-attn {'yes' if have_flash else 'not installed'}; "
          f"torch varlen_attn {'yes' if have_varlen else 'no'}\n")

    print("## Isolation: packed vs one row at a time\n")
    print("| backend | dtype | loss rel. diff | worst grad rel. diff | min grad cosine | leaky control: loss / grad diff | ok |")
    print("|---|---|---|---|---|---|---|")
    failures = 0
    for attn in packed_backends:
        loss_rel, grad_rel, cos, leak, leak_grad = isolation_check(attn, device, check_shape)
        if attn in HALF_ONLY:
            ok = loss_rel < 1e-2 and cos >= 0.999
            dtype_name = "bf16"
        else:
            ok = loss_rel < 2e-5 and grad_rel < 1e-4
            dtype_name = "fp32"
        failures += not ok
        print(f"| {attn} | {dtype_name} | {loss_rel:.2e} | {grad_rel:.2e} | {cos:.6f} | {leak:.2e} / {leak_grad:.2e} | "
              f"{'yes' if ok else '**NO**'} |")

    rows = make_rows(n_rows, shape["vocab_size"], lo, hi, median, seed=0)
    lengths = [len(r["input_ids"]) for r in rows]
    plan = plan_packed_batches(lengths, seq_len, packed_mbs, seed=0, epoch=0)
    print(f"\n## Throughput: {'1B-shaped Llama, bf16' if not args.smoke else 'tiny Llama, fp32 (smoke)'}; {n_rows} rows of "
          f"{min(lengths)}-{max(lengths)} tokens (median {sorted(lengths)[len(lengths) // 2]}); "
          f"packing efficiency {sample_packing_efficiency(plan, lengths, seq_len):.4f} at sequence_len {seq_len}\n")
    print("| layout | attention | tokens / micro-batch | useful tokens/s | real-token share | s/step | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    model = build_model(shape, "sdpa", dtype, device)
    model.train()
    cases = [("padded", "sdpa", f"{padded_mbs} rows, padded to longest")]
    cases += [("packed", attn, f"{packed_mbs} x {seq_len}") for attn in packed_backends]
    results = {}
    for layout, attn, shape_text in cases:
        model.set_attn_implementation(attn)
        batches = (cycle_padded(rows, padded_mbs, device) if layout == "padded"
                   else cycle_packed(rows, attn, seq_len, packed_mbs, device, dtype))
        tps, share, step_s, peak = throughput(model, batches, steps, warmup, device)
        results[(layout, attn)] = tps
        print(f"| {layout} | {attn} | {shape_text} | {tps:,.0f} | {share:.3f} | {step_s:.3f} | {peak:.1f} |")
    base = results[("padded", "sdpa")]
    best = max((v, k) for k, v in results.items() if k[0] == "packed")
    print(f"\nbest packed ({best[1][1]}) vs padded sdpa: {best[0] / base:.2f}x useful tokens/s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
