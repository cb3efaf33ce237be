"""The embedded default: a task, a tokenizer, a model and a score, all made here.

The task is *reverse three letters*: instruction ``Reverse: c a t``, output
``t a c`` (no separate input, which keeps the alpaca prompt short). Letters
are separated by spaces so the tokenizer (trained here on text of that shape)
gives one token per letter;
a 2-layer model learns to copy them backwards in 300 steps (seconds on a
two-core CPU), and exact-match accuracy on held-out words goes from 0% to 100%.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

INSTRUCTION = "Reverse:"

#: the model shape: big enough to learn the task quickly, small enough for 2 CPU cores
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def make_example(rng: random.Random, n_letters: int = 3) -> dict:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(n_letters)]
    return {"instruction": f"{INSTRUCTION} {' '.join(letters)}", "output": " ".join(reversed(letters))}


def make_split(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out rows (no held-out word appears in training)."""
    rng = random.Random(seed)
    seen, train, heldout = set(), [], []
    while len(heldout) < n_heldout:
        row = make_example(rng)
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            heldout.append(row)
    while len(train) < n_train:
        row = make_example(rng)
        if row["instruction"] not in seen:
            train.append(row)
    return train, heldout


def tokenizer_texts(pm, rows: list[dict]) -> list[str]:
    """Text to train the tokenizer on: the alpaca prompt and task rows, so the
    prompt compresses to few tokens and every letter is one token."""
    from plait.testing import sample_text

    texts = sample_text(200)
    prompt = prompt_for(pm, "")
    for row in rows[:2000]:
        texts.append(prompt_for(pm, row["instruction"]) + row["output"])
    texts.extend([prompt] * 50)
    return texts


#: the dataset ``type:`` of the task (examples/quickstart.yml)
FORMAT = "alpaca"


def prompt_for(pm, instruction: str) -> str:
    """The prompt the ``alpaca`` format builds (asked of the format registry:
    plait-formats registers it), so the model is scored on exactly what it was
    trained on."""
    from plait.errors import ConfigError
    from plait.registries import find_format

    fmt = find_format(pm, FORMAT)
    if fmt.prompt is None:
        raise ConfigError(f"the quickstart needs the {FORMAT!r} dataset format to build prompts; the registered "
                          f"one has no prompt function\naccepted: plait-formats' {FORMAT!r}")
    return fmt.prompt(FORMAT, {"instruction": instruction})


def generate_assets(root: str | Path, pm, *, n_train: int = 4000, n_heldout: int = 200, seed: int = 0) -> dict:
    """Write ``root/data/{train,heldout}.jsonl`` and ``root/model`` (tokenizer inside)."""
    from plait.testing import make_tiny_model, make_tiny_tokenizer, write_jsonl

    root = Path(root)
    train, heldout = make_split(n_train, n_heldout, seed)
    write_jsonl(root / "data" / "train.jsonl", train)
    write_jsonl(root / "data" / "heldout.jsonl", heldout)
    tokenizer_dir = make_tiny_tokenizer(root / "model", vocab_size=400, texts=tokenizer_texts(pm, train))
    make_tiny_model(root / "model", tokenizer_dir, seed=seed, **MODEL_SHAPE)
    return {"train": root / "data" / "train.jsonl", "heldout": root / "data" / "heldout.jsonl",
            "model": root / "model"}


def answers(model, tokenizer, rows: list[dict], pm, *, batch_size: int = 50, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to ``rows``' prompts."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [prompt_for(pm, r["instruction"]) for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = generated[:, enc["input_ids"].shape[1]:]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(model, tokenizer, rows: list[dict], pm) -> float:
    """Share of ``rows`` answered exactly."""
    got = answers(model, tokenizer, rows, pm)
    return sum(a == r["output"] for a, r in zip(got, rows)) / max(len(rows), 1)
