#!/bin/bash
# Wheels a GPU machine without network needs for the benchmarks, downloaded here
# (python 3.12, x86-64 Linux) into two ignored folders that a device call carries:
#
#   .whl/          what Plait needs beyond torch/transformers/peft/triton:
#                  omegaconf, pydantic, datasets, bitsandbytes (its CUDA 13.0 library only)
#   .whl_unsloth/  the Unsloth baseline: unsloth (repacked without the studio/ web app
#                  it never imports), unsloth_zoo, trl, and datasets < 5 which it requires
#
# Install there with (one datasets only: drop .whl's datasets 5 when Unsloth runs):
#   pip install --no-index --no-deps --target /tmp/site $(ls .whl/*.whl | grep -v datasets-5) .whl_unsloth/*.whl
#   export PYTHONPATH=/tmp/site:core:plugins/plait-bnb:plugins/plait-peft:plugins/plait-kernels:plugins/plait-models:plugins/plait-formats
set -euo pipefail
cd "$(dirname "$0")/.."
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$@"
}
mkdir -p .whl .whl_unsloth
download .whl omegaconf==2.4.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2
download .whl_unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5

# keep the wheels small enough to carry (64 MiB a call in all): rewrite a wheel without
# the files whose path matches a pattern, and without their RECORD lines, so pip accepts it
slim() {
    python3 - "$1" "$2" <<'PY'
import re, shutil, sys, zipfile
wheel, drop = sys.argv[1], re.compile(sys.argv[2])
slimmed = wheel + ".slim"
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = "".join(line + "\n" for line in lines if not drop.search(line.split(",")[0])).encode()
        dst.writestr(item, data)
shutil.move(slimmed, wheel)
PY
}
slim .whl_unsloth/unsloth-2026.10.9-py3-none-any.whl '^studio/'
slim "$(ls .whl/bitsandbytes-0.50.2-*.whl)" '^bitsandbytes/libbitsandbytes_(?!cuda130\.so$)'
du -sh .whl .whl_unsloth
