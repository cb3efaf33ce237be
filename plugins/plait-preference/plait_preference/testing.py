"""Generated preference rows for tests and benchmarks (no dataset hub), and a CPU
memory meter for a training step."""

from __future__ import annotations

import random

WORDS = "the cat sat on a mat and ran far away with big red hat under old green tree".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the ShareGPT layout of LLaMA-Factory's dpo_en_demo.json."""
    rng = random.Random(seed)
    return [{"conversations": [{"from": "human", "value": sentence(rng, rng.randint(3, 8))}],
             "chosen": {"from": "gpt", "value": sentence(rng, rng.randint(2, 6))},
             "rejected": {"from": "gpt", "value": sentence(rng, rng.randint(2, 6))}} for _ in range(n)]


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the layout of kto_en_demo.json: messages ending with the completion, and a label."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": sentence(rng, rng.randint(3, 8))},
                          {"role": "assistant", "content": sentence(rng, rng.randint(2, 6))}],
             "label": i % 3 != 0} for i in range(n)]


def step_peak_bytes(step) -> int:
    """Peak bytes of CPU tensors allocated while ``step()`` runs, above what was
    live before: torch.profiler's allocator events (every allocation and free of
    the CPU allocator, with its size) summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
