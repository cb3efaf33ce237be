"""``plait merge-sharded CHECKPOINT_DIR OUTPUT_DIR [--base-model PATH]``."""

from __future__ import annotations


def add_merge_sharded(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge-sharded",
        help="turn a sharded (DCP) checkpoint into a Hugging Face model or peft adapter",
        description="Consolidate a checkpoint written by plait-parallel's save_sharded (any world size) into "
                    "safetensors: full weights for a full fine-tune, an adapter for LoRA.",
    )
    parser.add_argument("checkpoint_dir", help="directory written by save_sharded")
    parser.add_argument("output_dir", help="where to write the Hugging Face model or adapter")
    parser.add_argument("--base-model", default=None,
                        help="base model directory or id (default: the one recorded in the checkpoint)")
    parser.set_defaults(func=run_merge_sharded)


def run_merge_sharded(args, pm) -> int:
    from plait_parallel.checkpoint import consolidate

    out = consolidate(args.checkpoint_dir, args.output_dir, base_model=args.base_model)
    print(f"wrote {out}")
    return 0
