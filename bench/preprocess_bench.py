"""Time ``prepare_datasets`` on generated alpaca and multi-turn chat rows.

    .venv/bin/python bench/preprocess_bench.py [--alpaca 4000] [--chat 2000] [--processes 1 2]

Everything is generated here (the kit's tiny byte-level BPE tokenizer, rows
from a fixed seed), so the numbers measure the pipeline: loading the JSON
lines, the ``tokenize`` hook, filtering and counting, and writing the Arrow
cache. Each timing is a cold run (a fresh cache directory); the last column is
a second run that reuses the cache. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the a sort add sum words numbers list reverse answer question letters first last small large "
         "one two three four five six seven eight nine ten").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def alpaca_rows(n: int, rng: random.Random) -> list[dict]:
    return [{"instruction": sentence(rng, 5, 20), "input": sentence(rng, 0, 15) if rng.random() < 0.5 else "",
             "output": sentence(rng, 10, 60)} for _ in range(n)]


def chat_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng, 4, 10)}]
        for _ in range(rng.randint(2, 4)):  # 2-4 user/assistant exchanges
            messages.append({"role": "user", "content": sentence(rng, 5, 25)})
            messages.append({"role": "assistant", "content": sentence(rng, 10, 50)})
        rows.append({"messages": messages})
    return rows


def time_prepare(root: Path, tok_dir: Path, data: Path, kind: str, processes: int) -> tuple[float, float, int, int]:
    """Seconds for a cold and a cached run, rows in and trained tokens."""
    from plait.data.prepare import prepare_datasets
    from plait.testing import build_run_config

    cache = root / f"cache-{kind}-{processes}"
    cfg, pm = build_run_config({"base_model": str(tok_dir), "output_dir": str(root / "out"), "sequence_len": 1024,
                                "dataset_prepared_path": str(cache), "dataset_processes": processes,
                                "datasets": [{"path": str(data), "type": kind}]})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    start = time.perf_counter()
    prepared = prepare_datasets(cfg, pm, tokenizer, show_progress=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = prepare_datasets(cfg, pm, tokenizer, show_progress=False)
    warm = time.perf_counter() - start
    assert again.from_cache and not prepared.from_cache
    stats = prepared.stats[0]
    return cold, warm, stats.rows_in, stats.trained_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpaca", type=int, default=4000, help="alpaca rows to generate")
    parser.add_argument("--chat", type=int, default=2000, help="chat rows to generate")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="dataset_processes values")
    args = parser.parse_args()

    from plait.testing import make_tiny_tokenizer, write_jsonl

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir = make_tiny_tokenizer(root / "tok", vocab_size=1024)
        files = {"alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(args.alpaca, rng)),
                 "chat_template": write_jsonl(root / "chat.jsonl", chat_rows(args.chat, rng))}
        # warm up: imports and template compilation are not part of the timings
        for kind, data in files.items():
            small = write_jsonl(root / f"warm-{kind}.jsonl", (alpaca_rows if kind == "alpaca" else chat_rows)(8, rng))
            time_prepare(root, tok_dir, small, kind, 1)
        print("| format | rows | dataset_processes | cold s | rows/s | trained tokens/s | cached load s |")
        print("|---|---|---|---|---|---|---|")
        for kind, data in files.items():
            for processes in args.processes:
                cold, warm, rows, trained = time_prepare(root, tok_dir, data, kind, processes)
                print(f"| {kind} | {rows} | {processes} | {cold:.2f} | {rows / cold:,.0f} | {trained / cold:,.0f} "
                      f"| {warm:.2f} |")


if __name__ == "__main__":
    main()
