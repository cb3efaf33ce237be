"""Axolotl's ``generate_samples``: at each evaluation, a few completions to read.

``num_generation_samples`` rows are drawn from the eval rows (the training rows
when there are none), each cut after ``generation_prompt_ratio`` of its
tokens (rows under 5 tokens are passed over, as in Axolotl), and the model
continues the cut for up to ``generation_max_new_tokens`` tokens, sampling with
``generation_temperature`` / ``top_p`` / ``top_k`` (``generation_do_sample:
false``, or temperature 0, decodes greedily). Each sample goes to the console
and to ``output_dir/generation_samples.jsonl`` (step, row, prompt, generated,
and the row's own continuation to compare with).

Rows and sampling draw from generators seeded with the run's seed and the
step, and the global random state is put back afterwards, so turning this on
changes nothing the run trains (a resumed run generates the same samples).
Rank 0 generates alone, on the unwrapped model; a sharded model is refused
(:func:`plait.train.generation.check_unsharded`).
"""

from __future__ import annotations

import random

from plait.train.generation import generation_model, partial_decode, stop_token_ids

#: where the samples go, a JSON line each
SAMPLES_FILE = "generation_samples.jsonl"
#: rows shorter than this are not cut into a prompt (Axolotl's limit)
MIN_ROW_TOKENS = 5


def pick_rows(dataset, count: int, seed: int, step: int) -> list[int]:
    """``count`` row indices of rows of at least MIN_ROW_TOKENS tokens, drawn with (seed, step)."""
    rng = random.Random(seed * 1_000_003 + step)
    order = list(range(len(dataset)))
    rng.shuffle(order)
    picked = []
    for index in order:
        if len(picked) == count:
            break
        if len(dataset[index]["input_ids"]) >= MIN_ROW_TOKENS:
            picked.append(index)
    return picked


def generation_settings(cfg, tokenizer, model) -> dict:
    """``generate`` arguments from Axolotl's generation_* keys (the model's stop tokens kept)."""
    own = getattr(model, "generation_config", None)
    stops = stop_token_ids(cfg, tokenizer, own)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(max_new_tokens=cfg.generation_max_new_tokens, pad_token_id=pad_id, eos_token_id=stops or None,
                    do_sample=bool(cfg.generation_do_sample and cfg.generation_temperature > 0))
    if settings["do_sample"]:
        settings.update(temperature=cfg.generation_temperature, top_p=cfg.generation_top_p,
                        top_k=cfg.generation_top_k)
    else:  # greedy: the model's own sampling defaults cleared, so generate does not warn of unused ones
        settings.update(temperature=None, top_p=None, top_k=None)
    return settings


def generate_samples(run) -> list[dict]:
    """The samples of this evaluation (rank 0; an empty list elsewhere)."""
    import torch

    from plait.train.loop import autocast

    cfg = run.cfg
    if not run.is_main:
        return []
    dataset = run.eval_data if run.eval_data is not None and len(run.eval_data) else run.train_data
    rows = pick_rows(dataset, cfg.num_generation_samples, cfg.seed, run.step)
    model = generation_model(run.model)
    settings = generation_settings(cfg, run.tokenizer, model)
    decode = partial_decode(run.tokenizer)
    devices = [run.device] if run.device.type == "cuda" else []
    samples = []
    was_training = model.training
    model.eval()
    try:
        # the run's own random streams are put back after: dropout and shuffling go on as without samples
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(cfg.seed * 1_000_003 + run.step)
            for row in rows:
                ids = list(dataset[row]["input_ids"])
                cut = max(1, int(len(ids) * cfg.generation_prompt_ratio))
                prompt = torch.tensor([ids[:cut]], device=run.device)
                with autocast(run):
                    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
                samples.append({"step": run.step, "row": row, "prompt": decode(ids[:cut]),
                                "generated": decode(out[0, cut:].tolist()), "continuation": decode(ids[cut:])})
    finally:
        model.train(was_training)
    return samples


def format_sample(sample: dict, number: int) -> str:
    """A console block for one sample."""
    return (f"sample {number} (step {sample['step']}, row {sample['row']})\n[prompt]\n{sample['prompt']}\n"
            f"[generated]\n{sample['generated']}")
