"""``plait quantize``'s arguments; no heavy imports, so ``plait --help`` stays fast
(the work is in :mod:`plait_qat.ptq`)."""

from __future__ import annotations


def add_quantize(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize the trained model with torchao (the config's quantization: or qat: block)",
        description="Post-training quantization with torchao, as axolotl quantize: loads output_dir (or --model), "
                    "quantizes the linear layers and saves to output_dir/quantized (or --out).")
    parser.add_argument("config", help="path to the YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    parser.add_argument("--model", metavar="DIR", help="the model to quantize (default: output_dir)")
    parser.add_argument("--out", metavar="DIR", help="where to save (default: output_dir/quantized)")
    parser.set_defaults(func=_run)


def _run(args, pm) -> int:
    from plait_qat.ptq import run_quantize

    return run_quantize(args, pm)
