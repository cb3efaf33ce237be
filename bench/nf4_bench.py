"""NF4 dequantization: plait-kernels' one-launch kernel against bitsandbytes' ``dequantize_4bit``.

    PYTHONPATH=core:plugins/plait-kernels python3 bench/nf4_bench.py [--out nf4.md]

Every Llama-3.2-1B and Llama-3-8B base weight shape, bf16 output, blocksize 64,
with double quantization (what ``bnb_4bit_use_double_quant: true`` stores).
QLoRA dequantizes each base about three times a step, so at the 8B shape this
kernel moves some 44 GB a step: its bandwidth is the QLoRA-over-LoRA cost on
the device. Reports the median time (``triton.testing.do_bench``) and the
effective bandwidth: the packed bytes and scales read plus the bf16 bytes written.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
import triton
from triton.testing import do_bench

#: (label, [out, in]) of every distinct base weight shape
SHAPES = [
    ("1B q/o", (2048, 2048)), ("1B k/v", (512, 2048)), ("1B gate/up", (8192, 2048)), ("1B down", (2048, 8192)),
    ("8B q/o", (4096, 4096)), ("8B k/v", (1024, 4096)), ("8B gate/up", (14336, 4096)), ("8B down", (4096, 14336)),
]


def main(argv=None) -> None:
    import bitsandbytes
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from plait_kernels.ops.nf4 import dequantize_nf4_

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- GPU: {torch.cuda.get_device_name()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}",
        "- command: `PYTHONPATH=core:plugins/plait-kernels python3 bench/nf4_bench.py`",
        "",
        "| weight | shape | bitsandbytes ms | plait ms | speed-up | bitsandbytes GB/s | plait GB/s | same bits |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, shape in SHAPES:
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        same = torch.equal(dequantize_nf4_(out, packed, state), dequantize_4bit(packed, state))
        bnb_ms = do_bench(lambda: dequantize_4bit(packed, state), warmup=25, rep=200)
        plait_ms = do_bench(lambda: dequantize_nf4_(out, packed, state), warmup=25, rep=200)
        moved = packed.numel() * packed.element_size() + state.absmax.numel() + out.numel() * 2
        lines.append(f"| {label} | {shape[0]}x{shape[1]} | {bnb_ms:.4f} | {plait_ms:.4f} | {bnb_ms / plait_ms:.2f}x "
                     f"| {moved / bnb_ms / 1e6:.0f} | {moved / plait_ms / 1e6:.0f} | {same} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
