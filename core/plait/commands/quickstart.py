"""`plait quickstart [CONFIG]`: the embedded default, end to end on a CPU.

1. generate a tiny Llama-style model, its tokenizer and a synthetic task
   (reverse three letters) under the paths the config names;
2. score exact-match accuracy on held-out words before training;
3. train with the config, through the same code as ``plait train``;
4. score again and print a few answers.
"""

from __future__ import annotations

from pathlib import Path

from plait.commands.common import load_run_config

DEFAULT_CONFIG = "examples/quickstart.yml"


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"the config (default {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (max_steps=50)")
    parser.add_argument("--allow-unsupported", action="store_true", help=argparse_suppress())
    parser.add_argument("--regenerate", action="store_true", help="rebuild the model, tokenizer and data")


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def run(args, pm) -> int:
    import json
    import time

    from plait import quickstart

    started = time.time()
    if "=" in args.config and not Path(args.config).is_file():  # `plait quickstart max_steps=5`
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    if args.config == DEFAULT_CONFIG and not Path(args.config).is_file():
        # outside a clone: the copy that ships in the package (its paths are relative to here)
        from plait.commands.examples import available

        args.config = str(available()["quickstart"])
    cfg, pm = load_run_config(args, pm, check_sources=False)  # step 1 creates base_model
    root = Path(cfg.base_model).parent
    heldout_path = root / "data" / "heldout.jsonl"
    if args.regenerate or not (Path(cfg.base_model) / "config.json").is_file() or not heldout_path.is_file():
        print(f"[1/4] generating a tiny model, tokenizer and the reverse-three-letters task in {root}")
        quickstart.generate_assets(root, pm)
    else:
        print(f"[1/4] using the model and data in {root}")
    heldout = [json.loads(line) for line in heldout_path.read_text().splitlines() if line.strip()]

    from plait.train.trained import load_trained

    base, tokenizer, _ = load_trained(cfg, pm, path=cfg.base_model)
    before = quickstart.accuracy(base, tokenizer, heldout, pm)
    print(f"[2/4] exact-match accuracy before training: {before:.1%} on {len(heldout)} held-out words")
    del base

    print("[3/4] training (plait train " + " ".join([args.config, *args.overrides]) + ")")
    from plait.train.loop import train

    run_ = train(cfg, pm)
    model, tokenizer, _ = load_trained(cfg, pm)
    after = quickstart.accuracy(model, tokenizer, heldout, pm)
    print(f"[4/4] exact-match accuracy after training: {after:.1%} (before: {before:.1%})")
    for row, answer in zip(heldout[:3], quickstart.answers(model, tokenizer, heldout[:3], pm)):
        print(f"      {row['instruction']!r:18} -> {answer!r:9} (expected {row['output']!r})")
    first, last = run_.metrics_log.read()[0]["loss"], run_.last_metrics.get("loss")
    print(f"loss {first:.3f} -> {last:.3f} in {run_.step} steps; model in {cfg.output_dir}; "
          f"{time.time() - started:.0f}s in all")
    (Path(cfg.output_dir) / "quickstart.json").write_text(json.dumps(
        {"accuracy_before": before, "accuracy_after": after, "first_loss": first, "final_loss": last,
         "steps": run_.step, "seconds": time.time() - started}, indent=2))
    return 0
