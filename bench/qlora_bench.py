"""QLoRA throughput and peak memory: Plait against Hugging Face Trainer + peft.

One command on one H200:

    python bench/qlora_bench.py --out qlora_bench.md

For each shape below it saves a random-init Llama (bf16) once, then trains
QLoRA on it in two separate processes, so neither sees the other's CUDA
allocator state:

* **plait**: ``plait.train.loop.train`` with ``adapter: qlora`` and
  ``load_in_4bit`` (plait-bnb loads, plait-peft attaches LoRA), the loop's own
  loss step (hidden states -> head + cross-entropy, so kernels plugins apply);
* **plait-kernels**: the same with plait-kernels added (``plait_kernels:
  triton``: RMSNorm, rotary, the LoRA SwiGLU MLP over the 4-bit weights and the
  fused linear + cross-entropy);
* **plait-kernels-offload**: the same with ``gradient_checkpointing: offload``
  (checkpointed layer inputs held in pinned host memory);
* **unsloth**: Unsloth's ``FastLanguageModel`` with ``load_in_4bit`` and its
  own offloaded checkpointing, under the same Trainer recipe as hf
  (``bench/unsloth_worker.py``);
* **hf**: ``AutoModelForCausalLM.from_pretrained(quantization_config=...)``,
  ``peft.prepare_model_for_kbit_training``, ``get_peft_model`` and
  ``transformers.Trainer`` (the usual QLoRA recipe).

Both: nf4 with double quantization, bf16 compute, LoRA r=16 alpha=32 on every
linear layer of the decoder, non-reentrant gradient checkpointing, SDPA
attention, torch's fused AdamW on a GPU (Unsloth's worker uses it too), constant lr, sequence 2048 of random tokens, every
token trained. Tokens/s counts input tokens over the steps after ``--warmup``;
peak memory is ``torch.cuda.max_memory_allocated`` over the whole process
(load + train).

========  ======  ======  =====  ========  =====  ======  ====  ===========
shape     hidden  layers  heads  kv heads  inter  vocab   tied  micro batch
========  ======  ======  =====  ========  =====  ======  ====  ===========
1b        2048    16      32     8         8192   128256  yes   8
8b        4096    32      32     8         14336  128256  no    4
========  ======  ======  =====  ========  =====  ======  ====  ===========

A full run (two shapes, two implementations, the 8B checkpoint written once)
takes several minutes; where one command is limited to 10 minutes, run
``--shapes 1b`` and ``--shapes 8b`` as two commands.

``--smoke`` runs the same code on a tiny model on the CPU (bitsandbytes has CPU
kernels), to check the script without a GPU. Plugins are registered by module
path as well as by entry point, so ``PYTHONPATH=core:plugins/plait-bnb:plugins/plait-peft``
works without installing them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, micro_batch=8),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, micro_batch=4),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True, micro_batch=2),
}
LORA_R, LORA_ALPHA, LR = 16, 32, 1e-4
PLUGIN_MODULES = ["plait_bnb.plugin", "plait_peft.plugin"]
KERNEL_PLUGINS = ["plait_models", "plait_kernels.plugin"]


# ---------------------------------------------------------------- helpers


def cuda():
    import torch

    return torch.cuda.is_available()


def now() -> float:
    """Wall time after the GPU finished its queued work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def random_rows(n_rows: int, seq: int, vocab: int):
    """A ``datasets.Dataset`` of random token rows, every token trained."""
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n_rows, seq), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "length": [seq] * n_rows})


def save_model(shape: str, path: Path) -> None:
    """A random-init Llama of ``shape`` in bf16 with a tiny tokenizer beside it
    (token ids beyond the tokenizer are fine: nothing decodes them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.testing import make_tiny_tokenizer

    dims = {k: v for k, v in SHAPES[shape].items() if k != "micro_batch"}
    config = AutoConfig.for_model("llama", max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=2, **dims)
    device = "cuda" if cuda() else "cpu"
    dtype = torch.bfloat16 if cuda() else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialising 8B parameters on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path, chat_template=None)
    del model
    if cuda():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- workers


def worker_plait(args) -> dict:
    """QLoRA through Plait's loop; a tiny plugin records step times."""
    from types import SimpleNamespace

    from plait.hookspecs import hookimpl
    from plait.testing import build_run_config
    from plait.train.loop import train

    times: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    facts: dict = {}

    class Recorder:
        @hookimpl
        def on_train_start(self, run):
            facts.update(model_facts(run.model))

        @hookimpl
        def on_step_end(self, run, metrics):
            times.append(now())
            tokens.append(args.micro_batch * args.seq)
            losses.append(metrics["loss"])

    kernels = args.worker.startswith("plait-kernels")
    keys = {
        "base_model": args.model_dir, "plugins": PLUGIN_MODULES + (KERNEL_PLUGINS if kernels else []),
        **({"plait_kernels": "triton"} if kernels else {}),
        "adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "lora_target_linear": True,
        "gradient_checkpointing": "offload" if args.worker.endswith("-offload") else True,
        "sequence_len": args.seq, "micro_batch_size": args.micro_batch, "max_steps": args.steps, "learning_rate": LR, "lr_scheduler": "constant",
        # the optimizer every implementation runs (Unsloth's worker too): torch's fused AdamW on a GPU
        "optimizer": "adamw_torch_fused" if cuda() else "adamw_torch",
        "output_dir": args.work_dir, "logging_steps": 1, "max_grad_norm": 1.0,
        **({"bf16": True, "bnb_4bit_compute_dtype": "bfloat16"} if cuda() else {"bf16": False}),
    }
    cfg, pm = build_run_config(keys, plugins=[Recorder()])
    data = SimpleNamespace(train=random_rows(args.micro_batch * args.steps, args.seq, args.vocab), eval=None)
    started = now()
    train(cfg, pm, data=data)
    return {**summarize(args.worker, times, tokens, args, started), "final_loss": losses[-1] if losses else None,
            **facts}


def worker_hf(args) -> dict:
    """QLoRA the usual way: transformers + peft + Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    on_gpu = cuda()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    times: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []

    class Recorder(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            times.append(now())
            tokens.append(args.micro_batch * args.seq)

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    started = now()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0} if on_gpu else None, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=args.work_dir, per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
        learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch_fused" if on_gpu else "adamw_torch", bf16=on_gpu, logging_steps=1,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        max_grad_norm=1.0, use_cpu=not on_gpu,
    )
    facts = model_facts(model)
    rows = random_rows(args.micro_batch * args.steps, args.seq, args.vocab).remove_columns(["length"])
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Recorder()])
    trainer.train()
    return {**summarize("hf", times, tokens, args, started), "final_loss": losses[-1] if losses else None, **facts}


def worker_unsloth(args) -> dict:
    """Unsloth's own QLoRA (4-bit FastLanguageModel), same rows and recipe."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unsloth_worker import train_unsloth

    data = Path(args.work_dir) / "rows.jsonl"
    with data.open("w") as f:
        for ids in random_rows(args.micro_batch * args.steps, args.seq, args.vocab)["input_ids"]:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    result = train_unsloth(args.model_dir, str(data), mode="lora", load_in_4bit=True, seq=args.seq,
                           micro_batch=args.micro_batch, warmup=args.warmup, steps=args.steps - args.warmup,
                           lora_r=LORA_R, lora_alpha=LORA_ALPHA, lr=LR, work_dir=args.work_dir)
    return {"impl": "unsloth", "shape": args.shape, "micro_batch": args.micro_batch, "seq": args.seq, **result}


#: the implementations --impls accepts
WORKERS = ("plait", "plait-kernels", "plait-kernels-offload", "hf", "unsloth")


def model_facts(model) -> dict:
    """What makes the two runs comparable: 4-bit layers, trainable LoRA
    parameters, and the dtype the frozen embedding ended up in."""
    import bitsandbytes as bnb

    return {
        "linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "embedding_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }


def summarize(name: str, times, tokens, args, started) -> dict:
    warm = min(args.warmup, len(times) - 1)
    span = times[-1] - times[warm - 1] if warm > 0 else times[-1] - started
    counted = sum(tokens[warm:]) if warm > 0 else sum(tokens)
    return {"impl": name, "shape": args.shape, "micro_batch": args.micro_batch, "seq": args.seq,
            "steps": len(times), "timed_steps": len(times) - warm, "tokens_per_s": counted / span,
            "peak_gib": peak_gib(), "total_s": times[-1] - started}


# ---------------------------------------------------------------- driver


def run_worker(impl: str, shape: str, model_dir: Path, opts, vocab: int) -> dict:
    """Run one measurement in a fresh process; its last stdout line is JSON."""
    work = tempfile.mkdtemp(prefix=f"qlora_{impl}_{shape}_")
    cmd = [sys.executable, __file__, "--worker", impl, "--shape", shape, "--model-dir", str(model_dir),
           "--micro-batch", str(opts["micro_batch"]), "--seq", str(opts["seq"]), "--steps", str(opts["steps"]),
           "--warmup", str(opts["warmup"]), "--vocab", str(vocab), "--work-dir", work]
    print(f"[{shape}/{impl}] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"[{shape}/{impl}] failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"impl": impl, "shape": shape, "error": tail.splitlines()[-1] if tail else f"exit {proc.returncode}"}
    result = json.loads(lines[-1])
    print(f"[{shape}/{impl}] {result}", flush=True)
    return result


def table(results: list[dict]) -> str:
    rows = ["| shape | impl | micro batch | seq | timed steps | tokens/s | peak GiB | final loss | vs hf | vs unsloth "
            "| 4-bit layers | trainable | embedding |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["shape"], r["impl"]): r for r in results}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['shape']} | {r['impl']} | | | | failed: {r['error'][:80]} | | | | | | | |")
            continue
        def versus(impl):
            other = by_key.get((r["shape"], impl))
            ok = r["impl"] != impl and other and "error" not in other
            return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if ok else ""

        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)"
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else ""
        rows.append(f"| {r['shape']} | {r['impl']} | {r['micro_batch']} | {r['seq']} | {r['timed_steps']} | "
                    f"{r['tokens_per_s']:.0f} | {peak} | {loss} | {versus('hf')} | {versus('unsloth')} | "
                    f"{r.get('linear4bit', '')} | {r['trainable']:,} | {r.get('embedding_dtype', '')} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps")
    parser.add_argument("--shapes", default="1b,8b", help="comma-separated: 1b, 8b")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed (default 2; smoke 1)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; smoke 64)")
    parser.add_argument("--impls", default="plait,plait-kernels,hf", help=f"comma-separated: {', '.join(WORKERS)}")
    parser.add_argument("--out", default=None, help="also write the markdown table here (and .json beside it)")
    # worker mode (internal)
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = {"hf": worker_hf, "unsloth": worker_unsloth}.get(args.worker, worker_plait)(args)
        print(json.dumps(result), flush=True)
        return 0

    if bad := [impl for impl in args.impls.split(",") if impl not in WORKERS]:
        parser.error(f"--impls: {bad} unknown; accepted: {', '.join(WORKERS)}")
    shapes = ["smoke"] if args.smoke else args.shapes.split(",")
    if not args.smoke and not cuda():
        parser.error("the full benchmark needs a CUDA GPU; use --smoke on the CPU")
    opts = {"steps": args.steps or (3 if args.smoke else 12), "warmup": args.warmup if args.warmup is not None
            else (1 if args.smoke else 2), "seq": args.seq or (64 if args.smoke else 2048)}
    results = []
    with tempfile.TemporaryDirectory(prefix="qlora_bench_") as tmp:
        for shape in shapes:
            model_dir = Path(tmp) / shape
            started = time.perf_counter()
            save_model(shape, model_dir)
            print(f"[{shape}] random-init model saved in {time.perf_counter() - started:.0f}s", flush=True)
            for impl in args.impls.split(","):
                results.append(run_worker(impl, shape, model_dir,
                                          {**opts, "micro_batch": SHAPES[shape]["micro_batch"]},
                                          SHAPES[shape]["vocab_size"]))
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
