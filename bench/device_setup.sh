# Source at the start of a device call, from the repository root:
#
#     source bench/device_setup.sh && python3 bench/throughput.py --shape 1b --cases plait,unsloth
#
# The device machine has no network: the wheels bench/fetch_device_wheels.sh put in .whl/ and
# .whl_unsloth/ (ignored folders; name both in the call's carry) are installed into /tmp/site_w, with
# one datasets (Unsloth's < 5), and this checkout's packages are made importable with their entry
# points (bench/device_env.py). Prints the GPU and the versions every RESULTS.md entry names.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_w \
    $(ls .whl/*.whl | grep -v datasets-5) .whl_unsloth/*.whl >/dev/null 2>&1 || echo "device_setup: wheel install failed"
export PYTHONPATH=/tmp/site_w${PYTHONPATH:+:$PYTHONPATH}
eval "$(python3 bench/device_env.py /tmp/site_dev)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
