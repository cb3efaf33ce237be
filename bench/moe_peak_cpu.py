"""The MoE bench step's peak device memory on the CPU: ``bench/train_peak_cpu.py --shape moe``.

Kept under this name for the commands recorded in bench/RESULTS.md; every
option is ``train_peak_cpu.py``'s (``--keys``, ``--calibrate``, ``--top``, ...).

    .venv/bin/python bench/moe_peak_cpu.py --calibrate
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_peak_cpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_shape="moe"))
