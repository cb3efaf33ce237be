"""Where a DPO step's memory goes, measured on the CPU (no GPU needed).

One training step (forward, loss, backward) of three cases on the same tiny
Llama with LoRA and non-reentrant gradient checkpointing, float32, the same
tokens: pairs of a ``--prompt``-token prompt and two ``--response``-token
responses (``--pairs`` per micro-batch):

* **sft**: Plait's SFT loss (core's chunked cross-entropy over the response
  tokens) on the same rows, one forward;
* **plait-dpo**: plait-preference's objective (policy forward of chosen and
  rejected, reference forward with the adapter off, log-probs from hidden
  states);
* **trl-dpo**: ``trl.DPOTrainer.compute_loss`` on the same pairs (reference
  with the adapter off too).

Peak = the largest amount of CPU memory that tensors allocated during the
step held at once (torch.profiler's allocator events: every allocation and
free of the CPU allocator, summed in time order), above what was live before
the step. Weights, LoRA parameters and the batch are allocated before, so
the peak is activations, logits and gradients.

    .venv/bin/python bench/preference_memory_cpu.py            # vocab 32000, hidden 256, pair 1024 tokens
"""

from __future__ import annotations

import argparse
import json
import sys

from plait_preference.testing import step_peak_bytes


def tiny_lora_model(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    return model


def pairs(args):
    import random

    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, args.vocab) for _ in range(n)]  # noqa: E731
    return [(ids(args.prompt), ids(args.response), ids(args.response)) for _ in range(args.pairs)]


class _Tokenizer:
    """What core's collator reads from a tokenizer."""
    pad_token_id = 0
    eos_token_id = 1


def plait_batch(args, cfg, pm):
    from plait_preference.rows import CHOSEN, REJECTED, segments_row

    rows = []
    for prompt, chosen, rejected in pairs(args):
        row = segments_row(prompt, [chosen, rejected], [CHOSEN, REJECTED])
        rows.append({**row, "seq_lens": row["extras"]["seq_lens"], "extras": [row["extras"]]})
    return pm.hook.collate(cfg=cfg, rows=rows, tokenizer=_Tokenizer())


def case_plait(args, method: str):
    from types import SimpleNamespace

    import torch

    from plait.testing import build_run_config

    cfg, pm = build_run_config({"base_model": "unused", "rl": "dpo", "adapter": "lora",
                                   "lora_target_linear": True})
    model = tiny_lora_model(args)
    batch = plait_batch(args, cfg, pm)
    run = SimpleNamespace(model=model, device=torch.device("cpu"), pm=pm, cfg=cfg)
    if method == "dpo":
        from plait_preference.objective import PreferenceObjective

        objective = PreferenceObjective(cfg, model)

        def step():
            loss, _ = objective.loss(run, batch, training=True)
            loss.backward()
    else:
        from plait.model.forward import forward_hidden
        from plait.model.head import chunked_linear_cross_entropy
        from plait_preference.logps import SEGMENT_KEYS

        inputs = {k: v for k, v in batch.items() if k not in ("labels", *SEGMENT_KEYS)}

        def step():
            hidden, head, _ = forward_hidden(model, inputs)
            labels = batch["labels"][:, 1:]
            loss, _ = chunked_linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight,
                                                   labels.reshape(-1))
            loss.backward()
    step()  # warm: lazily built state (LoRA grads' storage, autograd caches) is not the step's
    model.zero_grad(set_to_none=False)
    return step_peak_bytes(step)


def case_trl(args):
    import tempfile

    import trl
    from datasets import Dataset

    model = tiny_lora_model(args)
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs(args)]
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, bf16=False, use_cpu=True,
                               report_to=[], max_length=None, beta=0.1, gradient_checkpointing=True,
                               gradient_checkpointing_kwargs={"use_reentrant": False})
        # the dataset only satisfies the constructor: the batch is collated from the token ids directly
        trainer = trl.DPOTrainer(model=model, args=config, processing_class=_trl_tokenizer(args),
                                 train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        inputs = trainer._prepare_inputs(trainer.data_collator(rows))
        model = trainer.model
        model.train()

        def step():
            loss = trainer.compute_loss(model, inputs)
            loss.backward()

        step()
        model.zero_grad(set_to_none=False)
        return step_peak_bytes(step)


def _trl_tokenizer(args):
    import tempfile

    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    # TRL reads only the pad id from it: the pairs are token ids already
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tempfile.mkdtemp(), vocab_size=512))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--cases", default="sft,plait-dpo,trl-dpo")
    args = parser.parse_args()
    cases = {"sft": lambda: case_plait(args, "sft"), "plait-dpo": lambda: case_plait(args, "dpo"),
             "trl-dpo": lambda: case_trl(args)}
    results = {}
    for name in args.cases.split(","):
        results[name] = cases[name]() / 2**20
        print(f"{name:10s} peak {results[name]:8.1f} MiB", flush=True)
    print(json.dumps({"args": vars(args), "peak_mib": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
