"""Time plait-kernels' Triton kernels against PyTorch (and liger-kernel when importable).

Forward + backward, bf16, Llama-3.2-1B-like shapes: 16384 tokens (4 x 4096),
hidden 2048, MLP 8192, 32 query / 8 KV heads of 64, vocabulary 128256. Prints a
markdown table (and writes it to ``--out`` when given).

    PYTHONPATH=core:plugins/plait-kernels python3 bench/kernels_bench.py --out bench.md

"PyTorch" is the code a Hugging Face model runs without kernels (eager
``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``silu(g) * u``), and for the loss
both core's chunked head + cross-entropy and the fully materialised logits.
Peak memory is what one forward + backward allocates above its inputs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

TOKENS, BATCH, SEQ = 16384, 4, 4096
HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 8192, 32, 8, 64, 128256
DT = torch.bfloat16


def _liger():
    try:
        from liger_kernel.transformers import functional as lf

        return lf
    except Exception:  # not installed, or built for another torch/triton
        return None


def measure(fn, inputs):
    """(median ms of forward + backward, peak MiB above the inputs)."""
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) if o.dim() == 0 else grads_for(o) for o in outs])

    step()  # compile / autotune / warm the allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(step, grad_to_none=[t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                  warmup=50, rep=300)
    return ms, peak


_grad_cache: dict = {}


def grads_for(out):
    key = (tuple(out.shape), out.dtype)
    if key not in _grad_cache:
        _grad_cache[key] = torch.randn_like(out)
    return _grad_cache[key]


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=DT) * scale).requires_grad_(True)


def cases():
    """(kernel, shape text, inputs, {implementation: fn})"""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from plait.model.head import chunked_linear_cross_entropy
    from plait_kernels.ops.cross_entropy import fused_linear_cross_entropy
    from plait_kernels.ops.glu import geglu, swiglu
    from plait_kernels.ops.rms_norm import rms_norm
    from plait_kernels.ops.rope import apply_rope

    lf = _liger()
    hf_norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to("cuda", DT)
    w = hf_norm.weight

    x, r = leaf(TOKENS, HIDDEN), leaf(TOKENS, HIDDEN)
    impls = {"pytorch (HF LlamaRMSNorm)": lambda x: hf_norm(x), "plait triton": lambda x: rms_norm(x, w, 1e-5)}
    if lf:
        impls["liger"] = lambda x: lf.liger_rms_norm(x, w, 1e-5, in_place=False)
    yield "rms_norm", f"{TOKENS}x{HIDDEN}", [x], impls

    def torch_add_norm(x, r):
        s = x + r
        return hf_norm(s), s

    impls = {"pytorch (add + HF norm)": torch_add_norm,
             "plait triton": lambda x, r: rms_norm(x, w, 1e-5, residual=r)}
    if lf:
        impls["liger"] = lambda x, r: lf.liger_fused_add_rms_norm(x, r, w, 1e-5, in_place=False)
    yield "add + rms_norm", f"{TOKENS}x{HIDDEN}", [x, r], impls

    # q/k as attention modules make them: [B, S, H, D] projections viewed as [B, H, S, D]
    q = leaf(BATCH, SEQ, Q_HEADS, HEAD_DIM).detach().transpose(1, 2).requires_grad_(True)
    k = leaf(BATCH, SEQ, KV_HEADS, HEAD_DIM).detach().transpose(1, 2).requires_grad_(True)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.arange(SEQ, device="cuda").float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[None].expand(BATCH, SEQ, HEAD_DIM)
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    impls = {"pytorch (HF apply_rotary_pos_emb)": lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
             "plait triton": lambda q, k: apply_rope(q, k, cos, sin)}
    if lf:
        impls["liger"] = lambda q, k: lf.liger_rope(q, k, cos, sin)
    yield "rope q+k", f"q {BATCH}x{Q_HEADS}x{SEQ}x{HEAD_DIM}, k {KV_HEADS} heads", [q, k], impls

    g, u = leaf(TOKENS, INTER), leaf(TOKENS, INTER)
    impls = {"pytorch": lambda g, u: F.silu(g) * u, "plait triton": swiglu}
    if lf:
        impls["liger"] = lf.liger_swiglu
    yield "swiglu", f"{TOKENS}x{INTER}", [g, u], impls
    impls = {"pytorch": lambda g, u: F.gelu(g, approximate="tanh") * u, "plait triton": geglu}
    if lf:
        impls["liger"] = lf.liger_geglu
    yield "geglu", f"{TOKENS}x{INTER}", [g, u], impls

    h = leaf(TOKENS, HIDDEN)
    head = leaf(VOCAB, HIDDEN, scale=0.02)
    for masked in (0.25, 0.0):
        labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
        if masked:
            labels[::int(1 / masked)] = -100  # prompt tokens: the fused kernel skips them, liger computes them

        def materialised(h, wt, labels=labels):
            return F.cross_entropy(F.linear(h, wt).float(), labels, ignore_index=-100, reduction="sum")

        impls = {"pytorch (full logits, fp32 CE)": materialised,
                 "core chunked (4096 rows)":
                     lambda h, wt, labels=labels: chunked_linear_cross_entropy(h, wt, labels)[0],
                 "plait triton": lambda h, wt, labels=labels: fused_linear_cross_entropy(h, wt, labels)[0]}
        if lf:
            impls["liger"] = lambda h, wt, labels=labels: lf.liger_fused_linear_cross_entropy(h, wt, labels,
                                                                                              reduction="sum")
        yield ("linear + cross-entropy", f"{TOKENS}x{HIDDEN} @ {VOCAB}x{HIDDEN}, {masked:.0%} masked", [h, head],
               impls)


def lora_mlp_case():
    """A LlamaMLP with LoRA (r=16) on all three projections: peft vs the fused path."""
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from plait_kernels.lora_mlp import PlaitLoRAGLUMLP
    from plait_kernels.ops.glu import swiglu

    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER))
    mlp = peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=["gate_proj", "up_proj", "down_proj"]), mlp)
    mlp = mlp.to("cuda", DT)
    for name, param in mlp.named_parameters():
        param.requires_grad_("lora_" in name)
    fused = PlaitLoRAGLUMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, swiglu, "triton", gelu=False)
    x = leaf(TOKENS, HIDDEN)
    return ("LoRA MLP (r=16)", f"{TOKENS}x{HIDDEN} -> {INTER} -> {HIDDEN}", [x],
            {"peft (HF LlamaMLP)": mlp, "plait triton lora_swiglu_mlp": fused})


def model_case():
    """A whole training step of a 4-layer Llama with Llama-3.2-1B dimensions."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from plait.model.head import chunked_linear_cross_entropy
    from plait_kernels.backends import get_backend
    from plait_kernels.patch import patch

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=4,
                         num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=True,
                         use_cache=False, attn_implementation="sdpa")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    labels = ids[:, 1:].reshape(-1)

    def step_of(model, loss_fn):
        def step(ids):
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, HIDDEN)
            return loss_fn(hidden, model.lm_head.weight, labels)[0]
        return step

    impls = {}
    for name in ("pytorch (HF modules + core chunked loss)", "plait triton (all four kernels)"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to("cuda", DT)
        if name.startswith("plait"):
            patch(SimpleNamespace(torch_compile=False, plugin_manager=None), model, dict.fromkeys(
                ("rms_norm", "rope", "glu", "loss"), "triton"))
            impls[name] = step_of(model, get_backend("triton")["loss"])
        else:
            impls[name] = step_of(model, chunked_linear_cross_entropy)
    return "train step", f"Llama 4 layers, 1B dims, tied head, {BATCH}x{SEQ} tokens", [ids], impls


def all_cases(lines):
    yield from cases()
    for builder in (lora_mlp_case, model_case):
        try:
            case = builder()
        except Exception as exc:  # peft missing, an older transformers, ...: report and go on
            lines.append(f"| {builder.__name__} | | | failed to build: {type(exc).__name__}: {str(exc)[:80]} | | |")
            continue
        yield case


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    import transformers

    lf = _liger()
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- GPU: {torch.cuda.get_device_name()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}, liger-kernel "
        + (importlib.metadata.version("liger-kernel") if lf else "not importable (skipped)"),
        f"- command: `PYTHONPATH=core:plugins/plait-kernels python3 bench/kernels_bench.py`",
        "- forward + backward, bf16, median of triton.testing.do_bench; speed-up is PyTorch time / this time",
        "",
        "| kernel | shape | implementation | fwd+bwd ms | speed-up vs PyTorch | peak MiB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for kernel, shape, inputs, impls in all_cases(lines):
        baseline = None
        for name, fn in impls.items():
            try:
                ms, peak = measure(fn, inputs)
            except Exception as exc:  # report, keep going
                lines.append(f"| {kernel} | {shape} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |")
                continue
            baseline = baseline or ms
            lines.append(f"| {kernel} | {shape} | {name} | {ms:.3f} | {baseline / ms:.2f}x | {peak:.0f} |")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
