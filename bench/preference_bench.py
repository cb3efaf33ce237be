"""DPO + LoRA throughput and peak memory: Plait (plait-preference) against TRL's DPOTrainer + peft.

One command on one GPU (the repository root as working directory):

    python3 bench/preference_bench.py --shape 1b                 # plait, plait-varlen, trl
    python3 bench/preference_bench.py --shape 8b --micro-batch 2
    .venv/bin/python bench/preference_bench.py --smoke           # tiny model on the CPU, ~2 minutes

Every case trains the same random-init Llama (``bench/throughput.py``'s shapes,
created once, saved under /tmp, loaded by each case) on the same preference
pairs, each case in its own process so peak memory is per case:

* **plait**: ``plait.train.loop.train`` with ``rl: dpo`` (plait-preference),
  plait-peft's LoRA, plait-kernels (``plait_kernels: auto``: its Triton
  kernels on CUDA, the model's PyTorch code in ``--smoke`` on the CPU) and
  plait-models; chosen and rejected of a pair are one row of two isolated
  sequences (SDPA with a block-diagonal mask), the reference is the base with
  the adapter switched off.
* **plait-varlen**: the same with ``sample_packing: true`` and
  ``varlen_attention: true`` (torch's varlen kernel takes the two sequences'
  offsets instead of a mask; CUDA only: on the CPU it is the plain plait case).
* **trl**: ``trl.DPOTrainer`` with a ``peft.LoraConfig`` (its reference is the
  adapter switched off too), SDPA, ``bf16``.
* **unsloth**: Unsloth's ``PatchDPOTrainer()`` + the same ``trl.DPOTrainer`` settings on
  Unsloth's ``FastLanguageModel`` LoRA model (same targets, r, alpha; its offloaded
  gradient checkpointing in place of the Trainer's), reference = adapter off. Needs
  ``unsloth`` on the device (``bench/fetch_device_wheels.sh`` puts it in
  ``.whl_unsloth/``) and CUDA; offline like every case.

``plait[key=value,...]`` adds Plait config keys to one plait case, as in
``throughput.py``.

Shared settings: sequence 2048 per pair, each pair a 512-token prompt and two
512-token responses (+ EOS, so chosen and rejected are ~1024 tokens each),
random word-level tokens; LoRA r=16 alpha=32 dropout 0 on every linear layer
of the decoder; beta 0.1, sigmoid loss; non-reentrant gradient checkpointing;
bf16 weights with autocast; constant lr 1e-5, weight decay 0, max_grad_norm
1.0; fused AdamW; gradient accumulation 1; micro-batch = pairs per step (1b: 4,
8b: 2 by default).

Measurements: **tokens/s** = tokens of the timed steps' sequences (both of
every pair, 2 x ~1024 each) / their wall time, each step end CUDA-synchronized,
the first ``--warmup`` (3) steps untimed, the next ``--steps`` (10) timed;
**peak GiB** = ``torch.cuda.max_memory_allocated`` over the whole process.
TRL needs ``trl`` installed on the device (``bench/fetch_device_wheels.sh``
puts trl in ``.whl_unsloth/``).

With ``$OUT`` set (or ``--out DIR``) the JSON, the markdown table and every
worker's log are written there (``preference_<shape>.json`` / ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (shapes, model preparation, step clock, worker environment)

DEFAULT_MICRO_BATCH = {"1b": 4, "8b": 2, "smoke": 2}
LORA_R, LORA_ALPHA, LR, BETA = 16, 32, 1e-5, 0.1
PLUGIN_MODULES = ["plait_formats.plugin", "plait_models", "plait_peft.plugin", "plait_kernels.plugin",
                  "plait_preference.plugin"]
#: the chat template the prepare worker saves: message contents concatenated, so the
#: word-level tokens of the rows come out as written
CASES = ("plait", "plait-varlen", "trl", "unsloth")


def pair_texts(rng: random.Random, vocab: int, prompt: int, response: int) -> dict:
    words = lambda n: " ".join(f"t{rng.randrange(len(throughput.SPECIALS), vocab)}" for _ in range(n))  # noqa: E731
    return {"prompt": words(prompt) + " ", "chosen": words(response), "rejected": words(response)}


def worker_prepare(args) -> dict:
    """The model and tokenizer (``throughput``'s prepare), then the pairs as JSON."""
    args.rows = 1
    result = throughput.worker_prepare(args)
    rng = random.Random(0)
    vocab = throughput.SHAPES[args.shape]["vocab_size"]
    half = args.seq // 4  # prompt and each response: a quarter of the pair's tokens
    pairs = [pair_texts(rng, vocab, half - 1, half) for _ in range(args.pairs)]
    Path(args.data).write_text(json.dumps(pairs))
    return result


def pair_rows_for_plait(path: str) -> str:
    """The pairs in chat_template.default's layout (messages + chosen + rejected)."""
    pairs = json.loads(Path(path).read_text())
    out = Path(path).with_name("plait_pairs.json")
    out.write_text(json.dumps([{"messages": [{"role": "user", "content": p["prompt"]}], "chosen": p["chosen"],
                                "rejected": p["rejected"]} for p in pairs]))
    return str(out)


def worker_plait(args) -> dict:
    from plait.config import build_config
    from plait.hookspecs import hookimpl
    from plait.plugins import build_plugin_manager
    from plait.train.loop import train

    gpu = throughput.on_gpu()
    clock = throughput.StepClock(args.warmup + args.steps)
    facts: dict = {"sequence_tokens": []}
    profiler = Profiled(args, clock)

    class BenchPlugin:
        @hookimpl
        def on_train_start(self, run):
            facts["trainable"] = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            facts["start_s"] = time.perf_counter() - throughput.process_start

        @hookimpl
        def on_step_end(self, run, metrics):
            if run.step <= clock.total:
                clock.tick(metrics["loss"])
                facts["sequence_tokens"].append(metrics["input_tokens"])
            if profiler.step_ended(run.step):
                raise throughput._Finished

    work = Path(args.work_dir)
    raw = {
        "base_model": args.model_dir, "plugins": PLUGIN_MODULES, "rl": "dpo", "rl_beta": BETA,
        "datasets": [{"path": pair_rows_for_plait(args.data), "type": "chat_template.default"}],
        "val_set_size": 0, "dataset_prepared_path": str(work / "prepared"), "output_dir": str(work / "plait_out"),
        "sequence_len": args.seq, "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1,
        "num_epochs": 1, "max_steps": clock.total + profiler.extra_steps, "learning_rate": LR,
        "lr_scheduler": "constant",
        "weight_decay": 0.0, "max_grad_norm": 1.0, "optimizer": "adamw_torch_fused" if gpu else "adamw_torch",
        "bf16": gpu, "gradient_checkpointing": True, "plait_kernels": "auto", "logging_steps": 1, "seed": 0,
        "adapter": "lora", "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
        "lora_target_linear": True, "shuffle_merged_datasets": False,
    }
    if args.case_name == "plait-varlen" and gpu:
        raw.update({"sample_packing": True, "varlen_attention": True})
    raw.update(json.loads(args.case_keys or "{}"))
    pm = build_plugin_manager(config_plugins=raw["plugins"], entry_points=False, extra=[BenchPlugin()])
    cfg = build_config(pm, raw, {k: "file" for k in raw})
    try:
        train(cfg, pm)
    except throughput._Finished:
        pass
    profiler.write()
    return summary(clock, args, facts["sequence_tokens"], {k: v for k, v in facts.items() if k != "sequence_tokens"})


def dpo_trainer(args, model, tokenizer, clock, profiler, *, gradient_checkpointing: bool, peft_config=None):
    """TRL's DPOTrainer on the pairs, the shared settings; the clock ticks at every step end."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    gpu = throughput.on_gpu()

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step <= clock.total:
                clock.tick()
            profiler.step_ended(state.global_step)

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.global_step <= clock.total:
                clock.losses.append(float(logs["loss"]))

    config = DPOConfig(
        output_dir=str(Path(args.work_dir) / "trl_out"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1, max_steps=clock.total + profiler.extra_steps, learning_rate=LR, beta=BETA,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused" if gpu else "adamw_torch", bf16=gpu, use_cpu=not gpu, max_length=args.seq,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    pairs = json.loads(Path(args.data).read_text())
    return DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Clock()])


def step_tokens(args, trainer) -> list[int]:
    """The tokens each step reads: both sequences of every pair, without padding (equal-length pairs)."""
    lengths = [len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
               for r in trainer.train_dataset]
    return [sum(lengths[:args.micro_batch])] * (args.warmup + args.steps)


def worker_trl(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpu = throughput.on_gpu()
    clock = throughput.StepClock(args.warmup + args.steps)
    profiler = Profiled(args, clock)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation="sdpa")
    trainer = dpo_trainer(args, model, tokenizer, clock, profiler, gradient_checkpointing=True,
                          peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    facts = {"trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
             "start_s": time.perf_counter() - throughput.process_start}
    trainer.train()
    profiler.write()
    return summary(clock, args, step_tokens(args, trainer), facts)


def worker_unsloth(args) -> dict:
    """Unsloth's ``PatchDPOTrainer`` + TRL's DPOTrainer on Unsloth's LoRA model
    (``FastLanguageModel``: its kernels, its offloaded gradient checkpointing),
    the same random-init model and pairs, offline. CUDA only (Unsloth needs a GPU).

    Unsloth patches transformers, peft and TRL when imported, so it is imported
    before them, in this worker's own process; ``PatchDPOTrainer()`` is called as
    Unsloth's DPO recipe does (recent releases apply their TRL patches on import
    and keep it for compatibility)."""
    from unsloth_worker import TARGET_MODULES, _versions

    for key, value in {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1",
                       "UNSLOTH_COMPILE_LOCATION": str(Path(args.work_dir) / "unsloth_compiled_cache")}.items():
        os.environ.setdefault(key, value)
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl on import)
    from unsloth import FastLanguageModel, PatchDPOTrainer

    import torch

    PatchDPOTrainer()
    clock = throughput.StepClock(args.warmup + args.steps)
    profiler = Profiled(args, clock)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=False,
        local_files_only=True, use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(
        model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0, target_modules=TARGET_MODULES, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0)
    # the reference is the adapter switched off (no ref_model), as in the trl case; the
    # Trainer's own checkpointing stays off: Unsloth's ("unsloth", above) does it
    trainer = dpo_trainer(args, model, tokenizer, clock, profiler, gradient_checkpointing=False)
    facts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "start_s": time.perf_counter() - throughput.process_start, "versions": _versions()}
    trainer.train()
    profiler.write()
    return summary(clock, args, step_tokens(args, trainer), facts)


class Profiled:
    """``--profile``: torch's profiler over ``throughput.PROFILE_STEPS`` steps after the
    timed ones (so its overhead is not in them); the kernel table and the timeline
    go next to the case's log."""

    def __init__(self, args, clock):
        self.path = Path(args.profile_path) if args.profile_path else None
        self.extra_steps = throughput.PROFILE_STEPS if self.path else 0
        self.clock = clock
        self.profiler = throughput.make_profiler(throughput.on_gpu()) if self.path else None

    def step_ended(self, step: int) -> bool:
        """Start after the last timed step; True once the run should end."""
        if self.profiler is not None and step == self.clock.total:
            self.profiler.start()
        return step >= self.clock.total + self.extra_steps

    def write(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            throughput.write_profile(self.profiler, self.path)


def summary(clock, args, step_tokens: list[int], facts: dict) -> dict:
    warm = args.warmup
    timed = len(clock.times) - warm
    if timed < 1:
        raise RuntimeError(f"only {len(clock.times)} steps were recorded; need {warm + 1}")
    span = clock.times[-1] - clock.times[warm - 1]
    tokens = sum(step_tokens[warm:warm + timed])
    return {"steps": len(clock.times), "timed_steps": timed, "timed_s": span, "tokens_per_s": tokens / span,
            "tokens_per_step": tokens / timed, "step_s": span / timed, "peak_gib": throughput.peak_gib(),
            "final_loss": clock.losses[-1] if clock.losses else None, **facts}


WORKERS = {"prepare": worker_prepare, "plait": worker_plait, "plait-varlen": worker_plait, "trl": worker_trl,
           "unsloth": worker_unsloth}


def run_worker(name: str, extra: list[str], opts, log_dir: Path, label: str) -> dict:
    """One worker process of this file (``throughput.run_worker``'s runner)."""
    return throughput.run_worker(name, extra, opts, log_dir, opts.case_timeout, log_name=label,
                                 script=Path(__file__).resolve())


def table(results: list[dict], meta: dict) -> str:
    head = ("| shape | case | pairs/step | seq | tokens/s | s/step | peak GiB | trainable | final loss | vs trl | "
            "vs unsloth |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    trl, unsloth = (next((r for r in results if r["case"] == name and "tokens_per_s" in r), None)
                    for name in ("trl", "unsloth"))
    for r in results:
        first = f"| {meta['shape']} | {r['case']} | {meta['micro_batch']} | {meta['seq']} |"
        if "tokens_per_s" not in r:
            rows.append(first + f" failed: {r.get('error', '?')[:100]} |" + " |" * 6)
            continue
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a (CPU)"
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else ""
        ratio = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else ""
        vs_unsloth = f"{r['tokens_per_s'] / unsloth['tokens_per_s']:.2f}x" if unsloth else ""
        rows.append(first + f" {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {peak} | {r.get('trainable', 0):,} | "
                            f"{loss} | {ratio} | {vs_unsloth} |")
    return "\n".join(rows)


def main() -> int:
    throughput.process_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["1b", "8b"], default="1b")
    parser.add_argument("--micro-batch", type=int, default=None, help="pairs per step (default 1b: 4, 8b: 2)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated: plait, plait-varlen, trl, unsloth; plait[key=value,...] adds Plait keys")
    parser.add_argument("--seq", type=int, default=None, help="tokens per pair (default 2048; smoke 128)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the results (default $OUT)")
    parser.add_argument("--case-timeout", type=float, default=540)
    parser.add_argument("--keep", action="store_true", help="keep the temporary model/data directory")
    parser.add_argument("--profile", action="store_true",
                        help="profile 2 steps after the timed ones of every case (kernel table + gzipped timeline "
                             "beside the logs; bench/trace_gaps.py reads the timeline)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--data", "--work-dir", "--worker-shape", "--case-keys", "--case-name",
                   "--profile-path"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)  # throughput's prepare reads it
    args = parser.parse_args()

    if args.worker:
        args.shape = args.worker_shape
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0

    shape = "smoke" if args.smoke else args.shape
    seq = args.seq or (128 if args.smoke else 2048)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    steps = args.steps or (2 if args.smoke else 10)
    micro_batch = args.micro_batch or DEFAULT_MICRO_BATCH[shape]
    # Unsloth needs CUDA: --smoke (the CPU) leaves it out unless named
    default = [c for c in CASES if not (args.smoke and c == "unsloth")]
    cases = [throughput.parse_case(spec) for spec in throughput.split_cases(args.cases or ",".join(default))]
    if bad := [name for name, _ in cases if name not in WORKERS or name == "prepare"]:
        parser.error(f"--cases: {bad} unknown; accepted: {', '.join(CASES)}")
    if warmup < 1:
        parser.error("--warmup must be at least 1")
    meta = {"shape": shape, "micro_batch": micro_batch, "seq": seq, "warmup_steps": warmup, "timed_steps": steps,
            "dims": throughput.SHAPES[shape], "lora": {"r": LORA_R, "alpha": LORA_ALPHA}, "beta": BETA}
    out = Path(args.out) if args.out else None
    args.stem = f"preference_{shape}"
    work = Path(tempfile.mkdtemp(prefix=f"plait_{args.stem}_", dir="/tmp" if os.path.isdir("/tmp") else None))
    log_dir = out if out else work
    log_dir.mkdir(parents=True, exist_ok=True)
    common = ["--worker-shape", shape, "--seq", str(seq), "--micro-batch", str(micro_batch), "--warmup",
              str(warmup), "--steps", str(steps), "--model-dir", str(work / "model"), "--data",
              str(work / "pairs.json")]
    results: list[dict] = []

    def write() -> str:
        text = table(results, meta)
        if out:
            (out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
            (out / f"{args.stem}.md").write_text(text + "\n")
        return text

    try:
        extra_steps = throughput.PROFILE_STEPS if args.profile else 0
        prep = run_worker("prepare", common + ["--pairs", str((warmup + steps + extra_steps) * micro_batch), "--work-dir",
                                               str(work)], args, log_dir, "prepare")
        if "error" in prep:
            return 1
        meta.update({k: prep[k] for k in ("device", "versions")})
        for index, (name, keys) in enumerate(cases):
            label = name + (f"[{','.join(f'{k}={v}' for k, v in keys.items())}]" if keys else "")
            case_dir = work / f"case{index}_{name}"
            case_dir.mkdir()
            extra = ["--profile-path", str(log_dir / f"{args.stem}_profile{index}_{name}.txt")] if args.profile else []
            result = run_worker(name, common + ["--work-dir", str(case_dir), "--case-keys", json.dumps(keys),
                                                "--case-name", name] + extra, args, log_dir, f"{index}_{name}")
            result["case"] = label
            results.append(result)
            write()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(write())
    if out:
        print(f"wrote {out / (args.stem + '.json')} and {out / (args.stem + '.md')}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
