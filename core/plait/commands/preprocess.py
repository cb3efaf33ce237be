"""`plait preprocess`: tokenize and cache the datasets of a config.

Prints where the prepared Arrow data was written and a table of what happened
to the rows of each dataset. ``plait train`` later reuses the cache.
"""

from __future__ import annotations

from plait.commands.common import add_config_arguments

COLUMNS = ("dataset", "split", "rows in", "kept", "too long", "too short", "bad", "nothing to train", "duplicates",
           "truncated", "tokens", "trained tokens")


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def stats_table(stats) -> str:
    """A markdown table with one line per dataset and a total."""
    rows = [(s.name, s.split, s.rows_in, s.kept, s.dropped_too_long, s.dropped_too_short, s.dropped_bad,
             s.dropped_no_trained, s.dropped_duplicate, s.truncated, s.tokens, s.trained_tokens) for s in stats]
    if len(rows) > 1:
        rows.append(("total", "", *(sum(r[i] for r in rows) for i in range(2, len(COLUMNS)))))
    cells = [list(COLUMNS)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(args, pm) -> int:
    from plait.commands.common import load_run_config
    from plait.data.prepare import prepare_datasets
    from plait.pipeline import setup_tokenizer

    cfg, pm = load_run_config(args, pm)
    tokenizer = setup_tokenizer(cfg, pm)
    prepared = prepare_datasets(cfg, pm, tokenizer, show_progress=not args.no_progress)
    verb = "reused" if prepared.from_cache else "wrote"
    print(f"{verb} prepared data: {prepared.cache_path}")
    print(f"train rows: {len(prepared.train)}, eval rows: {len(prepared.eval) if prepared.eval is not None else 0}")
    print(stats_table(prepared.stats))
    for s in prepared.stats:
        for example in s.bad_examples:
            print(f"skipped bad row: {example}")
    return 0
