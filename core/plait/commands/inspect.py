"""`plait inspect`: show tokenized rows with trained and masked tokens apart
(each sequence of a preference pair on its own, named chosen / rejected).

Tokenizes through the same pipeline and cache as ``plait train``. Trained text
is green and masked text dim on a terminal; elsewhere masked text is wrapped
in ``[[...]]``.
"""

from __future__ import annotations

import sys

from plait.commands.common import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--rows", type=int, default=3, help="how many rows to show (default 3)")
    parser.add_argument("--eval", action="store_true", help="show rows of the eval set instead of the train set")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour trained and masked text (default: when stdout is a terminal)")


def run(args, pm) -> int:
    from plait.commands.common import load_run_config
    from plait.data.inspect_rows import describe_extras, format_row
    from plait.data.prepare import prepare_datasets
    from plait.errors import ConfigError
    from plait.pipeline import setup_tokenizer

    cfg, pm = load_run_config(args, pm)
    tokenizer = setup_tokenizer(cfg, pm)
    prepared = prepare_datasets(cfg, pm, tokenizer, show_progress=False)
    dataset = prepared.eval if args.eval else prepared.train
    if dataset is None:
        raise ConfigError("--eval: this config has no eval set (set val_set_size or test_datasets)")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    legend = "trained text green, masked text dim" if color else "masked text in [[...]], trained text bare"
    print(f"{len(dataset)} rows in {'eval' if args.eval else 'train'} ({legend}); data: {prepared.cache_path}")
    for index in range(min(args.rows, len(dataset))):
        row = dataset[index]
        trained = sum(1 for label in row["labels"] if label != -100)
        print(f"\n--- row {index}: {row['length']} tokens, {trained} trained")
        for name, start, end in segments(row):
            if name is not None:  # a row of several sequences (a preference pair): each on its own
                print(f"  [{name}: {end - start} tokens]")
            print(format_row(row["input_ids"][start:end], row["labels"][start:end], tokenizer, color=color))
        for line in describe_extras(row, tokenizer):
            print(line)
    return 0


def segments(row: dict) -> list[tuple]:
    """``(name, start, end)`` of each sequence of a row: one unnamed span for a
    plain row; for a row whose ``extras`` give ``seq_lens`` each segment,
    named from the extras' ``segment_names`` when the format gives them."""
    import json

    extras = json.loads(row["extras"]) if row.get("extras") else {}
    lengths = extras.get("seq_lens")
    if not lengths:
        return [(None, 0, len(row["input_ids"]))]
    names = extras.get("segment_names") or [f"segment {i + 1}" for i in range(len(lengths))]
    spans, start = [], 0
    for name, length in zip(names, lengths):
        spans.append((name, start, start + length))
        start += length
    return spans
