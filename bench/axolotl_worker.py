"""Time Axolotl's ``chat_template`` prompt strategy on rows that
``preprocess_bench.py`` generated; run under a Python that has Axolotl.

    /tmp/axo/bin/python bench/axolotl_worker.py --data chat.jsonl --tokenizer TOK_DIR \
        --template template.jinja --out result.json [--check 20]

The strategy comes from ``axolotl.prompt_strategies.chat_template.load`` with
roles_to_train [assistant], train_on_eos turn, the given jinja template and
``eot_tokens`` [<|im_end|>] (the template's turn end; Axolotl's default, the
EOS, is not in a chatml template and would leave turn ends untrained). Two
timings, one process: the strategy's ``tokenize_prompt`` over batches of 1000
rows (what ``datasets.map`` hands it; the median of ``--repeat`` passes), and Axolotl's own
``TokenizedPromptDataset`` over the JSON lines loaded with ``datasets``.
Writes JSON with the timings, versions, and input_ids/labels of the first
``--check`` rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib.metadata import version


def columns(rows: list[dict]) -> dict:
    return {key: [row[key] for row in rows] for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sequence-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--check", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="passes over all rows; the median is reported")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # Axolotl logs the template and per-row debug lines

    from axolotl.datasets import TokenizedPromptDataset
    from axolotl.prompt_strategies.chat_template import load
    from axolotl.utils.dict import DictDefault
    from datasets import disable_caching, disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    disable_caching()
    disable_progress_bars()
    with open(args.template, encoding="utf-8") as f:
        template = f.read()
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = DictDefault(sequence_len=args.sequence_len, train_on_inputs=False, eot_tokens=["<|im_end|>"])
    ds_cfg = {"type": "chat_template", "chat_template": "jinja", "chat_template_jinja": template,
              "roles_to_train": ["assistant"], "train_on_eos": "turn", "field_messages": "messages"}
    strategy = load(tokenizer, cfg, ds_cfg)
    strategy.tokenize_prompt(columns(rows[:8]))  # warm up: template compilation

    passes = []  # (wall s, CPU s) of each pass over all rows; the one with the median CPU time is reported
    for _ in range(args.repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = {"input_ids": [], "labels": []}
        for first in range(0, len(rows), args.batch):
            got = strategy.tokenize_prompt(columns(rows[first:first + args.batch]))
            out["input_ids"] += got["input_ids"]
            out["labels"] += got["labels"]
        passes.append((time.perf_counter() - start, time.process_time() - start_cpu))
    strategy_s, strategy_cpu_s = sorted(passes, key=lambda p: p[1])[len(passes) // 2]

    start = time.perf_counter()
    dataset = load_dataset("json", data_files=args.data, split="train")
    tokenized = TokenizedPromptDataset(strategy, dataset, process_count=1, keep_in_memory=True)
    pipeline_s = time.perf_counter() - start
    assert len(tokenized) == len(rows)

    trained = sum(label != -100 for labels in out["labels"] for label in labels)
    result = {"rows": len(rows), "strategy_s": strategy_s, "strategy_cpu_s": strategy_cpu_s,
              "strategy_cpu_passes": [cpu for _, cpu in passes], "pipeline_s": pipeline_s, "trained_tokens": trained,
              "versions": {name: version(name) for name in ("axolotl", "transformers", "tokenizers", "datasets")},
              "check": {"input_ids": out["input_ids"][:args.check], "labels": out["labels"][:args.check]}}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
