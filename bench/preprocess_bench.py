"""Time ``prepare_datasets`` on generated alpaca and multi-turn chat rows.

    .venv/bin/python bench/preprocess_bench.py [--alpaca 4000] [--chat 2000] [--processes 1 2]
        [--axolotl-python /tmp/axo/bin/python]

Everything is generated here (the kit's tiny byte-level BPE tokenizer, rows
from a fixed seed), so the numbers measure the pipeline: loading the JSON
lines, the ``tokenize`` hook, filtering and counting, and writing the Arrow
cache. Each timing is a cold run (a fresh cache directory); the last column is
a second run that reuses the cache. Prints a markdown table.

``--axolotl-python`` names the interpreter of another environment that has
Axolotl installed. The same generated chat rows, the same tokenizer directory
and Plait's chat template string then go to ``bench/axolotl_worker.py`` under
that interpreter, which times Axolotl's ``chat_template`` prompt strategy
(one process); Plait's ``tokenize`` hook is timed over the same rows in the
same batches of 1000, and the input_ids and labels of every row (or the
first ``--check N``) are compared token by token. A second table prints both.
``--repeat N`` times N passes of each side over all rows and reports each
side's median pass (one short pass is at the mercy of other work on a shared
machine).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
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


def run_config(root: Path, tok_dir: Path, data: Path, kind: str, processes: int):
    """``(cfg, pm, tokenizer)`` of a run that prepares ``data`` as ``kind``."""
    from plait.testing import build_run_config

    cache = root / f"cache-{kind}-{processes}"
    cfg, pm = build_run_config({"base_model": str(tok_dir), "output_dir": str(root / "out"), "sequence_len": 1024,
                                "dataset_prepared_path": str(cache), "dataset_processes": processes,
                                "datasets": [{"path": str(data), "type": kind}]})
    return cfg, pm, pm.hook.load_tokenizer(cfg=cfg)


def time_prepare(root: Path, tok_dir: Path, data: Path, kind: str, processes: int) -> tuple[float, float, int, int]:
    """Seconds for a cold and a cached run, rows in and trained tokens."""
    from plait.data.prepare import prepare_datasets

    cfg, pm, tokenizer = run_config(root, tok_dir, data, kind, processes)
    start = time.perf_counter()
    prepared = prepare_datasets(cfg, pm, tokenizer, show_progress=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = prepare_datasets(cfg, pm, tokenizer, show_progress=False)
    warm = time.perf_counter() - start
    assert again.from_cache and not prepared.from_cache
    stats = prepared.stats[0]
    return cold, warm, stats.rows_in, stats.trained_tokens


def columns(rows: list[dict]) -> dict:
    return {key: [row[key] for row in rows] for key in rows[0]}


def first_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"position {at} of {len(a)} / {len(b)}: {a[at:at + 6]} vs {b[at:at + 6]}"


def median_pass(passes: list[tuple[float, float]]) -> tuple[float, float]:
    """The ``(wall s, CPU s)`` of the pass with the median CPU time."""
    return sorted(passes, key=lambda p: p[1])[len(passes) // 2]


def compare_axolotl(root: Path, tok_dir: Path, data: Path, python: str, check: int, cold: float | None,
                    repeat: int = 1) -> None:
    """Time Plait's ``tokenize`` hook and, in ``python``, Axolotl's chat_template
    strategy on the same rows; print both and whether their tokens agree."""
    cfg, pm, tokenizer = run_config(root, tok_dir, data, "chat_template", 1)
    template = root / "chat_template.jinja"
    template.write_text(tokenizer.chat_template)  # the template Plait renders with (the tokenizer's)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    hook = pm.hook.tokenize
    hook(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer, batch=columns(rows[:8]))  # warm up
    passes = []  # (wall s, CPU s) of each pass over all rows; the median pass is reported
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        plait = {"input_ids": [], "labels": []}
        for first in range(0, len(rows), 1000):
            got = hook(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer,
                       batch=columns(rows[first:first + 1000]))
            plait["input_ids"] += got["input_ids"]
            plait["labels"] += got["labels"]
        passes.append((time.perf_counter() - start, time.process_time() - start_cpu))
    plait_s, plait_cpu_s = median_pass(passes)
    plait_trained = sum(label != -100 for labels in plait["labels"] for label in labels)

    out = root / "axolotl.json"
    worker = Path(__file__).with_name("axolotl_worker.py")
    command = [python, str(worker), "--data", str(data), "--tokenizer", str(tok_dir), "--template", str(template),
               "--out", str(out), "--check", str(check or len(rows)), "--repeat", str(repeat)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"axolotl worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    axo = json.loads(out.read_text())

    n = len(axo["check"]["labels"])
    same_ids = sum(a == b for a, b in zip(axo["check"]["input_ids"], plait["input_ids"]))
    same_labels = sum(a == b for a, b in zip(axo["check"]["labels"], plait["labels"]))
    print()
    print("| implementation | rows | what is timed (1 process) | s | rows/s | trained tokens/s |")
    print("|---|---|---|---|---|---|")
    print(f"| plait | {len(rows)} | `tokenize` hook, batches of 1000 | {plait_s:.2f} | {len(rows) / plait_s:,.0f} "
          f"| {plait_trained / plait_s:,.0f} |")
    if cold is not None:
        print(f"| plait | {len(rows)} | `prepare_datasets` cold (table above) | {cold:.2f} | {len(rows) / cold:,.0f} "
              f"| {plait_trained / cold:,.0f} |")
    print(f"| axolotl | {axo['rows']} | `tokenize_prompt`, batches of 1000 | {axo['strategy_s']:.2f} "
          f"| {axo['rows'] / axo['strategy_s']:,.0f} | {axo['trained_tokens'] / axo['strategy_s']:,.0f} |")
    print(f"| axolotl | {axo['rows']} | `load_dataset` json + `TokenizedPromptDataset` | {axo['pipeline_s']:.2f} "
          f"| {axo['rows'] / axo['pipeline_s']:,.0f} | {axo['trained_tokens'] / axo['pipeline_s']:,.0f} |")
    print()
    if repeat > 1:
        print(f"each side's median pass of {repeat} over all rows (CPU s per pass: plait "
              f"{', '.join(f'{cpu:.2f}' for _, cpu in passes)}; axolotl "
              f"{', '.join(f'{cpu:.2f}' for cpu in axo.get('strategy_cpu_passes', []))})")
    print(f"plait / axolotl rows/s (tokenization): {axo['strategy_s'] / plait_s:.2f}x")
    # CPU seconds of each process (all its threads): the fair measure on a machine other work shares
    print(f"plait / axolotl rows per CPU second (tokenization): {axo['strategy_cpu_s'] / plait_cpu_s:.2f}x "
          f"(plait {len(rows) / plait_cpu_s:,.0f}, axolotl {axo['rows'] / axo['strategy_cpu_s']:,.0f})")
    print(f"trained tokens over all rows: plait {plait_trained:,}, axolotl {axo['trained_tokens']:,}")
    print(f"{'all' if n == len(rows) else 'first'} {n} rows: input_ids equal in {same_ids}/{n}, "
          f"labels equal in {same_labels}/{n}")
    for index, (a, b) in enumerate(zip(axo["check"]["labels"], plait["labels"])):
        if a != b:
            print(f"  row {index} labels differ at axolotl vs plait {first_difference(a, b)}")
    print("axolotl environment: " + ", ".join(f"{k} {v}" for k, v in axo["versions"].items()))
    from importlib.metadata import version
    print("plait environment: " + ", ".join(f"{k} {version(k)}" for k in ("transformers", "tokenizers", "datasets")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpaca", type=int, default=4000, help="alpaca rows to generate")
    parser.add_argument("--chat", type=int, default=2000, help="chat rows to generate")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="dataset_processes values")
    parser.add_argument("--axolotl-python", help="python of an environment with axolotl: also time its chat_template")
    parser.add_argument("--check", type=int, default=0, help="rows whose tokens are compared with axolotl's (0: all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes of each side's tokenization over all rows; the median pass is reported")
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
        chat_cold = None
        for kind, data in files.items():
            for processes in args.processes:
                cold, warm, rows, trained = time_prepare(root, tok_dir, data, kind, processes)
                print(f"| {kind} | {rows} | {processes} | {cold:.2f} | {rows / cold:,.0f} | {trained / cold:,.0f} "
                      f"| {warm:.2f} |", flush=True)
                if kind == "chat_template" and processes == 1:
                    chat_cold = cold
        if args.axolotl_python:
            compare_axolotl(root, tok_dir, files["chat_template"], args.axolotl_python, args.check, chat_cold,
                            args.repeat)


if __name__ == "__main__":
    main()
