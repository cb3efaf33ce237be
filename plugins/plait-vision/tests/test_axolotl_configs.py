"""Axolotl's own multimodal example configs, run on tiny models with tiny overrides.

Skipped when ``/work/shared/axolotl-examples/configs`` is absent. Besides
``base_model``, the data and ``max_steps``, flash attention becomes SDPA (no
flash-attn on a CPU). Keys the installed core does not know yet and that only
concern logging or the attention kernel (``wandb_*``, ``attn_implementation``),
and blank keys (unset in Axolotl), are left out; any other unknown key fails
the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from plait.testing import plugin_manager, run_cli, write_jsonl

from plait_vision.testing import color_rows

EXAMPLES = Path("/work/shared/axolotl-examples/configs/examples")
#: keys dropped when the installed config schema lacks them (they change no training result)
NO_EFFECT_HERE = {"wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model",
                  "attn_implementation"}


def runnable_copy(name: str, folder: Path) -> Path:
    from plait.config.build import config_class

    keys = yaml.safe_load((EXAMPLES / name).read_text())
    assert keys["processor_type"] == "AutoProcessor" and keys["sample_packing"] is False
    known = config_class(plugin_manager()).model_fields
    for key in [k for k, v in keys.items() if v is None]:
        del keys[key]  # blank in Axolotl means unset
    if str(keys.get("attn_implementation", "")).startswith("flash_attention"):
        keys["attn_implementation"] = "sdpa"  # a tiny override: flash-attn needs CUDA and its package
    unknown = [k for k in keys if k not in known]
    assert set(unknown) <= NO_EFFECT_HERE, f"{name}: keys Plait does not accept: {unknown}"
    for key in unknown:
        del keys[key]
    path = folder / Path(name).name
    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="Axolotl example configs are not on this machine")
@pytest.mark.parametrize("name, model_fixture", [("qwen2-vl/lora-7b.yaml", "qwen2_vl_dir"),
                                                 ("llava/lora-7b.yaml", "llava_dir")])
def test_axolotl_multimodal_config_trains(name, model_fixture, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 4))
    config = runnable_copy(name, tmp_path)
    out = tmp_path / "out"
    result = run_cli(["train", str(config), f"base_model={model_dir}", f"datasets.0.path={data}",
                      "datasets.0.split=train", "max_steps=2", "gradient_accumulation_steps=1",
                      f"output_dir={out}", f"dataset_prepared_path={tmp_path / 'prepared'}"])
    assert result.exit_code == 0, result.stderr[-2000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    # the config's regex reaches the language model's projections only
    assert adapter["target_modules"].startswith("model.language_model.layers")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
