"""Unsloth as a benchmark baseline: one training run, its throughput and peak memory.

Meant to run as a worker in a process of its own (Unsloth patches transformers and
peft when imported, so it must be imported before them, and its patches must not
leak into another case), from bench/throughput.py or bench/qlora_bench.py, or alone:

    python3 bench/unsloth_worker.py --model-dir D --data F --mode lora [--load-in-4bit] \\
        --seq 2048 --micro-batch 8 --warmup 5 --steps 20 --work-dir W

It prints its result as one JSON line, the last line on stdout.

The recipe is the HF baseline's (bench/throughput.py ``worker_hf``), with Unsloth's
loader and LoRA in place of transformers' and peft's:

* ``FastLanguageModel.from_pretrained`` of the local random-init Llama (bf16, or
  bitsandbytes 4-bit with ``load_in_4bit``), offline (``local_files_only``,
  ``HF_HUB_OFFLINE``; Unsloth's statistics ping off with ``UNSLOTH_DISABLE_STATISTICS``);
* ``FastLanguageModel.get_peft_model``: LoRA r=16 alpha=32 dropout 0 on q/k/v/o/gate/up/down,
  Unsloth's offloaded gradient checkpointing (``use_gradient_checkpointing="unsloth"``;
  so the Trainer's own ``gradient_checkpointing`` stays off, as it would replace it);
* a plain ``transformers.Trainer`` (Unsloth patches its training loop and loss itself)
  on pre-tokenized rows, labels = input_ids: bf16, adamw_torch_fused, constant lr,
  weight decay 0, max_grad_norm 1.0, gradient accumulation 1, seed 0.

With ``packing`` (rows of real, varying lengths) the Trainer is TRL's ``SFTTrainer``
with ``packing=True`` (best-fit-decreasing bins of ``seq`` tokens, padding-free), the
path through which Unsloth applies its own packed attention; tokens/s then counts the
real tokens of each step (the Trainer's ``num_input_tokens_seen``, non-padding).
MoE models (Qwen3-MoE) need nothing more: ``get_peft_model`` adds the fused expert
weights to peft's ``target_parameters`` itself when gate/up/down are targeted.

Unsloth's own kernels, fused cross-entropy and compilation stay on. Without xformers or
flash-attn installed its attention runs through torch SDPA, as the HF baseline's does.

Measured: every optimizer step end synchronizes CUDA, then reads ``time.perf_counter``;
tokens/s = steps * micro_batch * seq / (time of the last step end - time of the end
of step ``warmup``). Peak memory is ``torch.cuda.max_memory_allocated`` over the process.
``first_step_wall`` is the wall clock (``time.time()``) at the end of step 1, for the
caller's time-to-first-step. ``steps`` 0 is a probe: ``warmup`` steps, then only the
peak memory is reported.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _versions() -> dict:
    out = {}
    for dist in ("unsloth", "unsloth_zoo", "trl", "datasets", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def train_unsloth(model_dir: str, data_path: str, *, mode: str, load_in_4bit: bool, seq: int, micro_batch: int,
                  warmup: int, steps: int, lora_r: int = 16, lora_alpha: int = 32, lr: float = 1e-4,
                  work_dir: str, packing: bool = False) -> dict:
    """Train ``warmup + steps`` optimizer steps with Unsloth; return tokens/s, peak GiB and facts."""
    if mode != "lora":
        raise NotImplementedError(f"mode {mode!r}: only 'lora' (with or without load_in_4bit) is benchmarked")
    if "transformers" in sys.modules or "peft" in sys.modules:
        print("warning: transformers/peft were imported before unsloth; its patches may be incomplete",
              file=sys.stderr)
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # its compiled-module cache goes under the work directory, not the current one
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(work_dir) / "unsloth_compiled_cache"))

    import unsloth  # noqa: F401  (first: it patches transformers and peft on import)
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []
    losses: list[float] = []
    seen: list[int] = []  # num_input_tokens_seen at every step end (packing)
    wall_offset = time.time() - time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            seen.append(state.num_input_tokens_seen)

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=load_in_4bit,
        local_files_only=True, use_exact_model_name=True,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=0, target_modules=TARGET_MODULES, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0,
    )
    facts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "total_params": sum(p.numel() for p in model.parameters()),
             "embedding_rows": model.get_input_embeddings().num_embeddings, "loss_fn": "unsloth"}

    with open(data_path) as f:
        rows = [json.loads(line)["input_ids"] for line in f]
    if not packing and any(len(r) != seq for r in rows):
        raise ValueError(f"every row of {data_path} must hold exactly {seq} tokens")
    common = dict(
        output_dir=str(Path(work_dir) / "unsloth_out"), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=1, max_steps=warmup + steps, learning_rate=lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", bf16=True,
        gradient_checkpointing=False,  # Unsloth's own ("unsloth", set above) does it
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, seed=0,
    )
    if packing:
        from trl import SFTConfig, SFTTrainer

        # pre-tokenized rows (no text field): SFTTrainer packs them into bins of max_length and its
        # collator makes the labels (every token) and the position ids that separate the rows
        targs = SFTConfig(**common, max_length=seq, packing=True, include_num_input_tokens_seen="non_padding")
        trainer = SFTTrainer(model=model, args=targs, train_dataset=Dataset.from_dict({"input_ids": rows}),
                             processing_class=tokenizer, callbacks=[Clock()])
    else:
        dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its "{'loss': ...}" lines would precede the result on stdout
    trainer.train()

    peak = torch.cuda.max_memory_allocated() / 2**30
    first = {"first_step_wall": times[0] + wall_offset if times else None, "peak_gib": peak,
             "final_loss": losses[-1] if losses else None, **facts, "versions": _versions()}
    if steps == 0:  # a probe: did it fit?
        if not times:
            raise RuntimeError("no step finished")
        return {"steps": len(times), **first}
    if len(times) < warmup + 2:
        raise RuntimeError(f"only {len(times)} steps were recorded; need {warmup + 2}")
    span = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    timed = len(times) - warmup if warmup else len(times) - 1
    if packing:
        tokens = seen[-1] - seen[len(times) - timed - 1]
    else:
        tokens = timed * micro_batch * seq
    return {"tokens_per_s": tokens / span, "step_s": span / timed, "tokens_per_step": tokens / timed,
            "timed_steps": timed, "timed_s": span, "steps": len(times), **first}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help="JSON lines, each {\"input_ids\": [...]} of --seq tokens")
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--packing", action="store_true", help="rows of varying lengths, packed by TRL's SFTTrainer")
    a = p.parse_args(argv)
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    result = train_unsloth(a.model_dir, a.data, mode=a.mode, load_in_4bit=a.load_in_4bit, seq=a.seq,
                           micro_batch=a.micro_batch, warmup=a.warmup, steps=a.steps, lora_r=a.lora_r,
                           lora_alpha=a.lora_alpha, lr=a.lr, work_dir=a.work_dir, packing=a.packing)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
