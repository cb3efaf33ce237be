"""Training throughput, peak memory and MFU: Plait against Hugging Face Trainer + peft.

One command on one GPU (the repository root as working directory):

    python3 bench/throughput.py --shape 1b --mode lora --cases plait,hf

Both cases train the same random-init Llama (created once on the GPU, saved to a
temporary directory under /tmp, loaded by each case) on the same random-token
rows, each in its own process so peak memory is per case:

* **plait**: ``plait.train.loop.train`` itself, with a plugin manager built
  explicitly from module paths (no entry points needed): plait-formats reads a
  ``type: pretokenized`` JSON-lines file through core's dataset preparation,
  plait-models, plait-peft attaches LoRA, plait-kernels patches in its Triton
  kernels (``plait_kernels: triton``: RMSNorm, rotary, SwiGLU, fused linear +
  cross-entropy). The run stops right after its last step (a tiny plugin
  raises), so no model is saved and no plot is drawn.
* **hf**: ``AutoModelForCausalLM.from_pretrained`` + ``peft.get_peft_model`` +
  ``transformers.Trainer`` (SDPA, ``bf16=True``, ``adamw_torch_fused``).
* **unsloth**: Unsloth's ``FastLanguageModel`` (its LoRA kernels and its
  offloaded gradient checkpointing) under the same ``Trainer`` recipe
  (``bench/unsloth_worker.py``; LoRA only).

``plait[key=value,...]`` adds Plait config keys to one plait case, so variants
time side by side in one call: ``--cases "plait,plait[gradient_checkpointing=offload],hf"``;
``plait[adapter=qlora,load_in_4bit=true]`` and ``unsloth[load_in_4bit=true]`` are QLoRA.
``--profile`` profiles two more steps of each plait case after its timed ones
and writes the kernels that took the device's time beside the results.

Shared settings: sequence 2048, no sample packing, every token trained, LoRA
r=16 alpha=32 dropout 0 on every linear layer of the decoder (not the head),
non-reentrant gradient checkpointing, bf16 weights with autocast (LoRA weights
float32 in both, peft's default), constant lr, weight decay 0, max_grad_norm
1.0, gradient accumulation 1.

Measurements (per case):

* **tokens/s**: input tokens of the timed steps / their wall time. Every step
  end synchronizes CUDA before reading the clock; the first ``--warmup`` (5)
  steps (Triton autotuning, allocator warm-up) are not timed, the next
  ``--steps`` (20) are.
* **peak GiB**: ``torch.cuda.max_memory_allocated`` over the whole process
  (load + train).
* **MFU**: model FLOPs per second / the bf16 matmul ceiling measured in the
  same run (median of an 8192^3 ``torch.matmul``), and / the H200's 989 TFLOPS
  dense-bf16 datasheet figure. Model FLOPs per token (PaLM convention, causal
  mask NOT discounted, gradient-checkpointing recomputation NOT counted, norms
  and element-wise work ignored), with T = tokens, L = layers, d = hidden,
  s = sequence:

      full FT:  6 * N_matmul * T                            + 12 * L * d * s * T
      LoRA:     4 * N_matmul * T + 6 * N_lora * T           + 12 * L * d * s * T

  N_matmul counts the weights that take part in matmuls: every linear layer of
  the decoder plus the LM head (vocab x d, counted once even when tied; the
  embedding lookup is not a matmul). A frozen weight costs forward (2) + input
  gradient (2); a trained one also its weight gradient (2). N_lora = r * (in +
  out) summed over the adapted layers.

Cases: ``--shape 1b`` (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192,
vocab 128256, tied head; micro-batch 8 by default) or ``8b`` (4096, 32, 32, 8,
14336, 128256, untied; micro-batch 4), ``--mode lora|full``, ``--cases
plait,hf``.

``--shape moe``: a Qwen3-MoE (``qwen3_moe``) with Qwen3-30B-A3B's layer -- hidden
2048, 32 heads of 128, 4 KV heads, 128 experts of intermediate 768, 8 experts a
token, vocab 151936, untied -- and 16 of its 48 layers: 10.6B parameters (21 GB in
bf16, so the model, LoRA and activations fit one 80 GB card), 1.2B of them active a
token; micro-batch 4. LoRA goes on q/k/v/o and on the fused 3D expert weights
(``mlp.experts.gate_up_proj``/``down_proj``, peft ``target_parameters``: Plait's
``lora_target_experts: true``, the hf case's ``LoraConfig(target_parameters=...)``,
Unsloth's ``get_peft_model`` adds them itself); the router stays frozen. Both Plait
and hf run the experts with ``experts_implementation: grouped_mm`` (torch's grouped
GEMM; transformers 5's default). Its FLOPs count what a token runs through (router +
8 experts; peft's per-step merge of every expert's LoRA delta is not counted).

``--lengths real``: rows of real chat-data lengths (``REAL_LENGTH_QUANTILES``,
median 253 tokens) instead of rows of ``--seq`` tokens, packed into rows of
``--seq``: Plait with ``sample_packing: true`` (add ``plait[varlen_attention=true]``
for torch's varlen kernel), Unsloth through TRL's ``SFTTrainer(packing=True)``
(padding-free, its packed attention). tokens/s then counts the real (non-pad) tokens
of the timed steps (Plait's ``input_tokens``; the Trainer's non-padding
``num_input_tokens_seen``). No hf case (it would pad). Results go to
``throughput_<shape>_<mode>_packed.*``.

Time to the first step (``first step s``): from the driver starting the case's
process to the end of its first optimizer step (imports, model load, data
preparation, LoRA, compilation/autotuning, step 1), on the wall clock the driver
hands to the worker. ``--cold-caches`` gives every case empty Triton and Inductor
caches (a fresh machine's first run; Unsloth's compiled-module cache is always in
the case's own directory). Prints a markdown table; with ``$OUT`` set (or ``--out DIR``) also
writes ``throughput_<shape>_<mode>.json`` / ``.md`` and each case's log there.

``--smoke`` runs everything on the CPU with a tiny model (hidden 64, 2 layers,
vocab 512, sequence 64 (packed: 256), 2 + 2 steps; with ``--shape moe`` a tiny
Qwen3-MoE of 4 experts; the Triton kernels run in Triton's interpreter,
``TRITON_INTERPRET=1``), to check the script without a GPU; unsloth cases are left
out there (Unsloth needs CUDA).

The script puts ``core/`` and ``plugins/*/`` of this repository on the path of
its workers itself, so it needs no installed plugin entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    # Qwen3-30B-A3B's layer (hidden 2048, 32 heads of 128, 4 KV heads, 128 experts of 768, 8 per token,
    # vocab 151936, untied) with 16 of its 48 layers: 10.6B parameters (21 GB in bf16), 1.2B active a token
    "moe": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "smoke_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=512,
                      tie_word_embeddings=False),
}
#: transformers model type of a shape (llama unless named)
MODEL_TYPES = {"moe": "qwen3_moe", "smoke_moe": "qwen3_moe"}
#: the fused 3D expert parameters of the MoE shapes, adapted through peft's target_parameters
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_MICRO_BATCH = {"1b": 8, "8b": 4, "smoke": 2, "moe": 4, "smoke_moe": 2}
LORA_R, LORA_ALPHA, LR = 16, 32, 1e-4
#: the hookimpl modules of the plugin packages (their entry points in plugins/*/pyproject.toml)
PLUGIN_MODULES = ["plait_formats.plugin", "plait_models", "plait_peft.plugin", "plait_kernels.plugin"]
H200_BF16_DENSE_TFLOPS = 989.4
#: special tokens of the benchmark's word-level tokenizer; random ids start after them
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<unk>"]

#: Row lengths of real chat data: the 33 quantiles (0%, 3.125%, ..., 100%) of 1,599 rows
#: (alpaca_en_demo's 999 instruction/input/output rows, glaive_toolcall_en_demo's 300
#: and dpo_en_demo's 300 ShareGPT conversations with their chosen answer, from
#: hiyouga/LLaMA-Factory's data/), in tokens estimated as characters / 4 (Llama 3's
#: tokenizer averages about 4 characters a token on English) plus 5 per turn for the
#: chat template's markers. Median 253, mean 387, longest 3,955. ``--lengths real``
#: draws row lengths from it (inverse-CDF sampling, linear between quantiles).
REAL_LENGTH_QUANTILES = [22, 37, 43, 48, 54, 60, 71, 84, 101, 117, 136, 158, 171, 184, 202, 229, 253, 276, 292,
                         317, 342, 370, 398, 434, 463, 499, 549, 613, 756, 938, 1261, 1607, 3955]


def real_lengths(total_tokens: int, seq: int, seed: int = 0) -> list[int]:
    """Row lengths drawn from ``REAL_LENGTH_QUANTILES`` (at most ``seq``) until they sum to ``total_tokens``."""
    import random

    rng, table, lengths = random.Random(seed), REAL_LENGTH_QUANTILES, []
    while sum(lengths) < total_tokens:
        position = rng.random() * (len(table) - 1)
        low = int(position)
        high = min(low + 1, len(table) - 1)
        lengths.append(min(seq, round(table[low] + (position - low) * (table[high] - table[low]))))
    return lengths


FLOP_FORMULA = ("full FT: 6*N_matmul*T + 12*L*d*s*T; LoRA: 4*N_matmul*T + 6*N_lora*T + 12*L*d*s*T "
                "(N_matmul = decoder linear weights + LM head once; causal mask not discounted; "
                "checkpointing recompute not counted; d = heads * head_dim; MoE: N_matmul and N_lora count the "
                "router and the experts a token is routed to)")


# ---------------------------------------------------------------- helpers


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def synced_clock() -> float:
    """Wall time once the GPU has finished its queued work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def is_moe(shape: str) -> bool:
    return "num_experts" in SHAPES[shape]


def model_counts(dims: dict, lora: bool) -> dict:
    """Matmul weights and LoRA parameters from the shape alone (same for every case).

    For an MoE shape, ``n_matmul`` and ``n_lora_active`` count what one token
    runs through (the router and its ``num_experts_per_tok`` experts), while
    ``n_lora`` counts every trainable LoRA parameter (all experts' factors), the
    number the cases' trainable counts are checked against."""
    d, layers, inter, vocab = dims["hidden_size"], dims["num_hidden_layers"], dims["intermediate_size"], dims["vocab_size"]
    head_dim = dims.get("head_dim") or d // dims["num_attention_heads"]
    width, kv = dims["num_attention_heads"] * head_dim, dims["num_key_value_heads"] * head_dim
    attention = [(d, width), (d, kv), (d, kv), (width, d)]  # (in, out) of q, k, v, o
    lora_of = lambda linears: sum(LORA_R * (i + o) for i, o in linears) if lora else 0  # noqa: E731
    if "num_experts" in dims:
        experts, top_k, moe_inter = dims["num_experts"], dims["num_experts_per_tok"], dims["moe_intermediate_size"]
        expert = [(d, 2 * moe_inter), (moe_inter, d)]  # gate_up_proj, down_proj of one expert
        per_layer = sum(i * o for i, o in attention) + d * experts + top_k * sum(i * o for i, o in expert)
        n_lora = layers * (lora_of(attention) + experts * lora_of(expert))
        n_lora_active = layers * (lora_of(attention) + top_k * lora_of(expert))
    else:
        linears = attention + [(d, inter), (d, inter), (inter, d)]  # + gate, up, down
        per_layer = sum(i * o for i, o in linears)
        n_lora = n_lora_active = layers * lora_of(linears)
    return {"n_matmul": layers * per_layer + vocab * d, "n_lora": n_lora, "n_lora_active": n_lora_active,
            "layers": layers, "hidden": d, "attention_width": width, "vocab": vocab}


def flops_per_token(counts: dict, seq: int, lora: bool) -> float:
    attention = 12 * counts["layers"] * counts["attention_width"] * seq
    if lora:
        return 4 * counts["n_matmul"] + 6 * counts["n_lora_active"] + attention
    return 6 * counts["n_matmul"] + attention


def split_cases(text: str) -> list[str]:
    """Split ``--cases`` at the commas outside brackets."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(current)
            current = ""
        else:
            current += char
    return [spec.strip() for spec in specs + [current] if spec.strip()]


def parse_case(spec: str) -> tuple[str, dict]:
    """``plait[gradient_checkpointing=offload,lora_qkv_kernel=false]`` -> ("plait", {...}).

    The bracketed keys are Plait config keys added to the case's config (values
    read as YAML scalars), so one call can time variants side by side.
    """
    import yaml

    name, _, rest = spec.partition("[")
    keys = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"case {spec!r}: expected name[key=value,...]")
        for item in filter(None, rest[:-1].split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"case {spec!r}: {item!r} is not key=value")
            keys[key.strip()] = yaml.safe_load(value)
    return name.strip(), keys


def read_rows(path: str) -> list[list[int]]:
    with open(path) as f:
        return [json.loads(line)["input_ids"] for line in f]


# ---------------------------------------------------------------- workers


def worker_prepare(args) -> dict:
    """Save the random-init model, its tokenizer and the data; measure the matmul ceiling."""
    import importlib.metadata

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    dims = SHAPES[args.shape]
    model_dir, gpu = Path(args.model_dir), on_gpu()
    started = time.perf_counter()
    config = AutoConfig.for_model(MODEL_TYPES.get(args.shape, "llama"), max_position_embeddings=max(4096, args.seq),
                                  bos_token_id=0, eos_token_id=1, pad_token_id=2, **dims)
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):  # initialising 8B parameters on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if gpu else torch.float32)
    model.save_pretrained(model_dir)
    del model

    # a word-level tokenizer covering the whole vocabulary, so pretokenized rows
    # pass plait-formats' "id inside the vocabulary" check without resizing
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), dims["vocab_size"])})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                        pad_token=SPECIALS[2], unk_token=SPECIALS[3])
    # a template of its own, so plait-models does not add the llama3 chat markers (which would resize the vocabulary)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(model_dir)
    assert len(tokenizer) == dims["vocab_size"], len(tokenizer)

    gen = torch.Generator().manual_seed(0)
    if getattr(args, "lengths", "fixed") == "real":
        # rows of real lengths: 1.5x the tokens the steps need, so neither packer runs out of rows
        lengths = real_lengths(int(1.5 * args.rows * args.seq), args.seq)
        rows = [torch.randint(len(SPECIALS), dims["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    else:
        rows = torch.randint(len(SPECIALS), dims["vocab_size"], (args.rows, args.seq), generator=gen).tolist()
    with open(args.data, "w") as f:
        for ids in rows:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    prepared_s = time.perf_counter() - started

    result = {"prepare_s": prepared_s, "versions": {}}
    for dist in ("torch", "transformers", "peft", "triton", "accelerate", "datasets", "liger-kernel"):
        try:
            result["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            result["versions"][dist] = None
    result.update(matmul_ceiling(gpu))
    return result


def matmul_ceiling(gpu: bool) -> dict:
    """Median TFLOPS of an 8192^3 bf16 matmul (GPU) or a 512^3 float32 one (smoke, CPU)."""
    import torch

    if not gpu:
        n, dtype = 512, torch.float32
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        times.sort()
        return {"device": "cpu", "ceiling_tflops": 2 * n**3 / times[len(times) // 2] / 1e12,
                "ceiling_matmul": f"{n}^3 float32"}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return {"device": torch.cuda.get_device_name(0), "ceiling_tflops": 2 * n**3 / times[len(times) // 2] / 1e12,
            "ceiling_matmul": f"{n}^3 bf16"}


#: the driver's wall clock (``time.time()``) when it started a worker, handed over in the
#: environment, so a worker can report the time from its process start to its first step
SPAWN_WALL_ENV = "PLAIT_BENCH_SPAWN_WALL"


def since_spawn(wall: float | None) -> float | None:
    """Seconds from the driver starting this worker process to ``wall`` (a ``time.time()``)."""
    spawned = os.environ.get(SPAWN_WALL_ENV)
    return wall - float(spawned) if spawned and wall is not None else None


class StepClock:
    """CUDA-synchronized time at the end of every optimizer step (and, where a
    case counts them, the real tokens each step trained on)."""

    def __init__(self, total: int):
        self.total = total
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self.wall_offset = time.time() - time.perf_counter()  # perf_counter -> wall clock

    def tick(self, loss=None, tokens: int | None = None) -> None:
        self.times.append(synced_clock())
        if loss is not None:
            self.losses.append(float(loss))
        if tokens is not None:
            self.tokens.append(int(tokens))

    def summary(self, args) -> dict:
        """tokens/s over the steps after ``args.warmup``; the time to the end of step 1
        (``first_step_s``, from the driver's start of this process); with ``args.steps``
        0 (a probe: does it fit?) only the peak memory and the first step."""
        first = {"first_step_s": since_spawn(self.times[0] + self.wall_offset) if self.times else None,
                 "peak_gib": peak_gib(), "final_loss": self.losses[-1] if self.losses else None}
        if args.steps == 0:
            if not self.times:
                raise RuntimeError("no step finished")
            return {"steps": len(self.times), **first}
        warm = args.warmup
        if len(self.times) < warm + 1 + 1:
            raise RuntimeError(f"only {len(self.times)} steps were recorded; need {warm + 2}")
        span = self.times[-1] - self.times[warm - 1] if warm else self.times[-1] - self.times[0]
        timed = len(self.times) - warm if warm else len(self.times) - 1
        counted = self.tokens[len(self.times) - timed:] if len(self.tokens) == len(self.times) else None
        tokens = sum(counted) if counted is not None else timed * args.micro_batch * args.seq
        return {"steps": len(self.times), "timed_steps": timed, "timed_s": span, "tokens_per_s": tokens / span,
                "step_s": span / timed, "tokens_per_step": tokens / timed, **first}


class _Finished(Exception):
    """Raised after the last step: the benchmark needs neither the save nor the plot."""


def worker_plait(args) -> dict:
    """Plait's own ``train`` with the kernels and (LoRA) plait-peft."""
    from plait.config import build_config
    from plait.hookspecs import hookimpl
    from plait.plugins import build_plugin_manager
    from plait.train.loop import train

    gpu = on_gpu()
    clock = StepClock(args.warmup + args.steps)
    facts: dict = {}
    profiler = make_profiler(gpu) if args.profile_path else None

    class BenchPlugin:
        """Counts parameters at the start, clocks every step, ends the run after the last."""

        @hookimpl
        def on_train_start(self, run):
            facts["trainable"] = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            facts["total_params"] = sum(p.numel() for p in run.model.parameters())
            facts["embedding_rows"] = run.model.get_input_embeddings().num_embeddings
            facts["loss_fn"] = getattr(run.loss_fn, "__name__", type(run.loss_fn).__name__)
            facts["start_s"] = time.perf_counter() - process_start

        @hookimpl
        def on_step_end(self, run, metrics):
            if run.step <= clock.total:
                clock.tick(metrics["loss"], metrics.get("input_tokens"))  # real tokens: packed rows hold fewer
            if run.step == clock.total and profiler is not None:
                profiler.start()  # after the timed steps, so the profiler's overhead is not in them
            if run.step >= clock.total + (PROFILE_STEPS if profiler is not None else 0):
                raise _Finished

    work = Path(args.work_dir)
    raw = {
        "base_model": args.model_dir, "plugins": PLUGIN_MODULES,
        "datasets": [{"path": args.data, "type": "pretokenized"}], "val_set_size": 0,
        "dataset_prepared_path": str(work / "prepared"), "output_dir": str(work / "plait_out"),
        # rows of real lengths are packed into rows of sequence_len (--lengths real)
        "sequence_len": args.seq, "sample_packing": args.lengths == "real", "micro_batch_size": args.micro_batch,
        "gradient_accumulation_steps": 1, "num_epochs": 1,
        "max_steps": args.warmup + args.steps + (PROFILE_STEPS if profiler is not None else 0),
        "learning_rate": LR, "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
        "optimizer": "adamw_torch_fused" if gpu else "adamw_torch", "bf16": gpu,
        "gradient_checkpointing": True, "plait_kernels": "triton", "logging_steps": 1, "seed": 0,
    }
    if args.mode == "lora":
        raw.update({"adapter": "lora", "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
                    "lora_target_linear": True})
        if is_moe(args.shape):  # LoRA on the fused 3D expert weights too (plait-models' key -> peft target_parameters)
            raw["lora_target_experts"] = True
    if is_moe(args.shape):
        raw["experts_implementation"] = "grouped_mm"  # torch's grouped GEMM, one per projection (transformers' default)
    raw.update(json.loads(args.case_keys or "{}"))
    if raw.get("load_in_4bit") or raw.get("load_in_8bit"):  # a QLoRA case: plait[adapter=qlora,load_in_4bit=true]
        raw["plugins"] = PLUGIN_MODULES + ["plait_bnb.plugin"]
    # explicit module paths, no entry points: the device machine has none installed
    pm = build_plugin_manager(config_plugins=raw["plugins"], entry_points=False, extra=[BenchPlugin()])
    cfg = build_config(pm, raw, {k: "file" for k in raw})
    try:
        train(cfg, pm)
    except _Finished:
        pass
    if profiler is not None:
        profiler.stop()
        write_profile(profiler, Path(args.profile_path))
    return {**clock.summary(args), **facts, "plugins": sorted(p.name for p in pm.list_plugins())}


#: steps profiled after the timed ones (``--profile``)
PROFILE_STEPS = 2


def make_profiler(gpu: bool):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []))


def write_profile(profiler, path: Path) -> None:
    """The kernels that took the device's time, most first, per profiled step."""
    sort = "self_cuda_time_total" if on_gpu() else "self_cpu_time_total"
    text = profiler.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
    path.write_text(f"{PROFILE_STEPS} steps after the timed ones, sorted by {sort}\n\n{text}\n")
    # the timeline too, gzipped: where the device sits idle shows only there
    import gzip

    trace = path.with_suffix(".trace.json")
    profiler.export_chrome_trace(str(trace))
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()


def worker_hf(args) -> dict:
    """The usual recipe: transformers + peft + Trainer."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    gpu = on_gpu()
    clock = StepClock(args.warmup + args.steps)

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.tick()

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    if args.lengths == "real":
        raise ValueError("--lengths real: the hf case has no packing; time plait and unsloth")
    moe = is_moe(args.shape)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation="sdpa",
                                                 **({"experts_implementation": "grouped_mm"} if moe else {}))
    model.config.use_cache = False
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        # on an MoE the fused 3D experts are parameters, not nn.Linear: peft reaches them by target_parameters;
        # its "all-linear" would also adapt the router and give gate_up_proj a second adapter (peft 0.21), so
        # the attention projections are named (what Plait's lora_target_linear + lora_target_experts adapt)
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=ATTENTION_MODULES if moe else "all-linear",
                                                 task_type="CAUSAL_LM",
                                                 target_parameters=EXPERT_PARAMETERS if moe else None))
    facts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "total_params": sum(p.numel() for p in model.parameters()),
             "embedding_rows": model.get_input_embeddings().num_embeddings, "loss_fn": "transformers ForCausalLMLoss"}
    rows = read_rows(args.data)
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    targs = TrainingArguments(
        output_dir=str(Path(args.work_dir) / "hf_out"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused" if gpu else "adamw_torch", bf16=gpu, use_cpu=not gpu,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Clock()])
    facts["start_s"] = time.perf_counter() - process_start
    trainer.train()
    return {**clock.summary(args), **facts}


def worker_unsloth(args) -> dict:
    """Unsloth's FastLanguageModel + Trainer, same data and recipe (bench/unsloth_worker.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unsloth_worker import train_unsloth

    keys = json.loads(args.case_keys or "{}")
    result = train_unsloth(args.model_dir, args.data, mode=args.mode, load_in_4bit=bool(keys.get("load_in_4bit")),
                           seq=args.seq, micro_batch=args.micro_batch, warmup=args.warmup, steps=args.steps,
                           lora_r=LORA_R, lora_alpha=LORA_ALPHA, lr=LR, work_dir=args.work_dir,
                           packing=args.lengths == "real")
    result["start_s"] = result.get("start_s", time.perf_counter() - process_start)
    result["first_step_s"] = since_spawn(result.pop("first_step_wall", None))
    return result


WORKERS = {"prepare": worker_prepare, "plait": worker_plait, "hf": worker_hf, "unsloth": worker_unsloth}


# ---------------------------------------------------------------- driver


def worker_env(smoke: bool) -> dict:
    """The workers' environment: this repository's core and plugins first on the path, offline."""
    env = dict(os.environ)
    paths = [str(REPO / "core")] + [str(p) for p in sorted((REPO / "plugins").glob("*")) if p.is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"})
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # plait-kernels' Triton kernels on the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_worker(name: str, extra: list[str], opts, log_dir: Path, timeout: float, log_name: str | None = None,
               script: Path | None = None, env: dict | None = None) -> dict:
    """Run one worker process (``script --worker name``; this file by default, another
    benchmark's for its own workers); its last stdout line starting with '{' is its JSON result.

    The worker runs in a session of its own: past ``timeout`` seconds the whole group
    is killed (a compile worker it started must not keep GPU memory for the next case).
    ``env`` adds variables to ``worker_env``'s. The driver's wall clock at the start goes
    to the worker in ``PLAIT_BENCH_SPAWN_WALL`` (its time to the first step)."""
    import signal

    cmd = [sys.executable, str(script or Path(__file__).resolve()), "--worker", name, *extra]
    log_path = log_dir / f"{opts.stem}_{log_name or name}.log"
    started = time.perf_counter()
    print(f"[{log_name or name}] started", flush=True)
    environment = {**worker_env(opts.smoke), **(env or {}), SPAWN_WALL_ENV: repr(time.time())}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=environment,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            code = "timeout"
            log.write(f"\nkilled after the case timeout of {timeout:.0f}s\n")
    if code != "timeout":
        try:  # whatever it left running in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:  # none left
            pass
    tail = log_path.read_text()[-3000:]  # the worker's stderr: the error is its last line
    with log_path.open("a") as log:
        log.write("\n--- stdout ---\n" + stdout)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    wall = time.perf_counter() - started
    if code != 0 or not lines:
        print(f"[{log_name or name}] FAILED (exit {code}) after {wall:.0f}s; log {log_path}:\n{tail}", flush=True)
        last = [ln for ln in tail.splitlines() if ln.strip()]
        return {"error": last[-1] if last else f"exit {code}", "wall_s": wall, "timed_out": code == "timeout"}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    print(f"[{log_name or name}] done in {wall:.0f}s", flush=True)
    return result


def add_derived(result: dict, counts: dict, seq: int, lora: bool, ceiling: float | None) -> None:
    if "tokens_per_s" not in result:
        return
    per_token = flops_per_token(counts, seq, lora)
    if result.get("embedding_rows") not in (None, counts["vocab"]):
        result["warning"] = f"the vocabulary was resized to {result['embedding_rows']} rows"
    expected = counts["n_lora"] if lora else result.get("total_params")
    if result.get("trainable") != expected:
        result["warning"] = (result.get("warning", "") + f" trainable {result.get('trainable')} != "
                             f"{expected} the FLOP formula assumes").strip()
    result["model_tflops"] = result["tokens_per_s"] * per_token / 1e12
    result["mfu_ceiling"] = result["model_tflops"] / ceiling if ceiling else None
    result["mfu_spec"] = result["model_tflops"] / H200_BF16_DENSE_TFLOPS


def table(results: list[dict], meta: dict) -> str:
    head = ("| shape | mode | case | micro batch | seq | tokens/s | s/step | peak GiB | model TFLOPS | "
            "MFU (measured ceiling) | MFU (989 TF spec) | trainable params | final loss | vs hf | vs unsloth | "
            "first step s |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    hf = next((r for r in results if r["case"] == "hf" and "tokens_per_s" in r), None)
    unsloth = next((r for r in results if r["case"] == "unsloth" and "tokens_per_s" in r), None)
    for r in results:
        first = f"| {meta['shape']} | {meta['mode']} | {r['case']} | {meta['micro_batch']} | {meta['seq']} |"
        if "tokens_per_s" not in r:
            rows.append(first + f" failed: {r.get('error', '?')[:100]} |" + " |" * 10)
            continue
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a (CPU)"
        mfu = f"{100 * r['mfu_ceiling']:.1f}%" if r.get("mfu_ceiling") is not None else ""
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else ""
        vs_unsloth = f"{r['tokens_per_s'] / unsloth['tokens_per_s']:.2f}x" if unsloth else ""
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else ""
        first_step = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else ""
        rows.append(first + f" {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {peak} | {r['model_tflops']:.1f} | "
                            f"{mfu} | {100 * r['mfu_spec']:.1f}% | {r['trainable']:,} | {loss} | {ratio} | "
                            f"{vs_unsloth} | {first_step} |")
    return "\n".join(rows)


def main() -> int:
    global process_start
    process_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--shape", choices=["1b", "8b", "moe"], default="1b",
                        help="1b/8b: Llama shapes; moe: Qwen3-30B-A3B's layers, 16 of them (LoRA on the experts too)")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 1b 8, 8b 4, moe 4 (smoke 2)")
    parser.add_argument("--cases", default="plait,hf",
                        help="comma-separated: plait, hf, unsloth; plait[key=value,...] adds Plait config keys; "
                             "unsloth[load_in_4bit=true] is Unsloth's QLoRA")
    parser.add_argument("--lengths", choices=["fixed", "real"], default="fixed",
                        help="fixed: every row --seq tokens; real: rows of real chat-data lengths (median 253), "
                             "packed into rows of --seq (plait: sample_packing; unsloth: SFTTrainer packing); "
                             "tokens/s counts real tokens only")
    parser.add_argument("--cold-caches", action="store_true",
                        help="each case starts with empty Triton/Inductor caches (time to the first step on a "
                             "fresh machine)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; smoke 64)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed (default 5; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 + 2 steps")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON/markdown (default $OUT)")
    parser.add_argument("--case-timeout", type=float, default=540, help="seconds before a case is killed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model/data directory")
    parser.add_argument("--profile", action="store_true",
                        help=f"profile {PROFILE_STEPS} more steps of each plait case (written beside the results)")
    # worker mode (internal)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-shape", help=argparse.SUPPRESS)
    parser.add_argument("--case-keys", help=argparse.SUPPRESS)
    parser.add_argument("--profile-path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.shape = args.worker_shape
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0

    shape = ("smoke_moe" if args.shape == "moe" else "smoke") if args.smoke else args.shape
    seq = args.seq or ((256 if args.lengths == "real" else 64) if args.smoke else 2048)
    warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
    steps = args.steps or (2 if args.smoke else 20)
    micro_batch = args.micro_batch or DEFAULT_MICRO_BATCH[shape]
    try:
        cases = [parse_case(spec) for spec in split_cases(args.cases)]
    except ValueError as exc:
        parser.error(f"--cases: {exc}")
    if bad := [name for name, _ in cases if name not in WORKERS or name == "prepare"]:
        parser.error(f"--cases: {bad} unknown; accepted: plait, hf, unsloth")
    if any(keys for name, keys in cases if name == "hf"):
        parser.error("--cases: only plait and unsloth cases take [key=value,...]")
    if bad := [key for name, keys in cases if name == "unsloth" for key in keys if key != "load_in_4bit"]:
        parser.error(f"--cases: unsloth[...] takes load_in_4bit only, not {bad}")
    if args.lengths == "real" and any(name == "hf" for name, _ in cases):
        parser.error("--lengths real: the hf case has no packing; accepted cases: plait, unsloth")
    if args.smoke and any(name == "unsloth" for name, _ in cases):
        print("--smoke: the unsloth cases are left out (Unsloth needs CUDA)", flush=True)
        cases = [(name, keys) for name, keys in cases if name != "unsloth"]
    if warmup < 1:
        parser.error("--warmup must be at least 1")
    lora = args.mode == "lora"
    counts = model_counts(SHAPES[shape], lora)
    meta = {"shape": shape, "model_type": MODEL_TYPES.get(shape, "llama"), "lengths": args.lengths,
            "mode": args.mode, "micro_batch": micro_batch, "seq": seq, "warmup_steps": warmup,
            "timed_steps": steps, "dims": SHAPES[shape], "lora": {"r": LORA_R, "alpha": LORA_ALPHA} if lora else None,
            "counts": counts, "flops_per_token": flops_per_token(counts, seq, lora), "flop_formula": FLOP_FORMULA,
            "plugins": PLUGIN_MODULES}
    out = Path(args.out) if args.out else None
    stem = args.stem = f"throughput_{shape}_{args.mode}" + ("_packed" if args.lengths == "real" else "")

    work = Path(tempfile.mkdtemp(prefix=f"plait_{stem}_", dir="/tmp" if os.path.isdir("/tmp") else None))
    log_dir = out if out else work
    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / "model", work / "data.jsonl"
    common = ["--worker-shape", shape, "--mode", args.mode, "--lengths", args.lengths, "--seq", str(seq),
              "--micro-batch", str(micro_batch),
              "--warmup", str(warmup), "--steps", str(steps), "--model-dir", str(model_dir), "--data", str(data)]
    results: list[dict] = []

    def write() -> str:
        text = table(results, meta)
        if out:
            (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
            (out / f"{stem}.md").write_text(text + "\n")
        return text

    try:
        prep = run_worker("prepare", common + ["--rows", str((warmup + steps + PROFILE_STEPS) * micro_batch),
                                               "--work-dir", str(work)], args, log_dir, args.case_timeout)
        if "error" in prep:
            return 1
        meta.update({k: prep[k] for k in ("device", "ceiling_tflops", "ceiling_matmul", "versions", "prepare_s")})
        print(f"device {prep['device']}: matmul ceiling {prep['ceiling_tflops']:.0f} TFLOPS ({prep['ceiling_matmul']});"
              f" model + data prepared in {prep['prepare_s']:.0f}s", flush=True)
        for index, (name, keys) in enumerate(cases):
            label = name + (f"[{','.join(f'{k}={v}' for k, v in keys.items())}]" if keys else "")
            case_dir = work / f"case{index}_{name}"
            case_dir.mkdir()
            extra = common + ["--work-dir", str(case_dir), "--case-keys", json.dumps(keys)]
            if args.profile and name == "plait":
                extra += ["--profile-path", str(log_dir / f"{stem}_profile{index}.txt")]
            caches = {"TRITON_CACHE_DIR": str(case_dir / "triton_cache"),
                      "TORCHINDUCTOR_CACHE_DIR": str(case_dir / "inductor_cache")} if args.cold_caches else None
            result = run_worker(name, extra, args, log_dir, args.case_timeout, log_name=f"{index}_{name}", env=caches)
            result["case"] = label
            add_derived(result, counts, seq, lora, meta["ceiling_tflops"])
            results.append(result)
            write()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(write())
    print(f"\nFLOPs/token {meta['flops_per_token']:.4g}: {FLOP_FORMULA}; N_matmul {counts['n_matmul']:,}, "
          f"N_lora {counts['n_lora']:,}; ceiling {meta['ceiling_tflops']:.1f} TFLOPS ({meta['ceiling_matmul']}).")
    for r in results:
        if r.get("warning"):
            print(f"WARNING [{r['case']}]: {r['warning']}")
    if out:
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0 if all("error" not in r for r in results) else 1


process_start = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
