"""``experts_implementation`` and ``use_kernels``: transformers' own kernel
choices, passed to ``from_pretrained`` and checked at config time.

Tolerance: grouped_mm and batched_mm compute the same float32 sums in
another order, so their logits agree to 1e-5."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config, write_jsonl

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 31, 64]])


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("moe") / "model", family="qwen3_moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)


def load(model_dir, **keys):
    cfg, pm = build_run_config({"base_model": str(model_dir), "bf16": False, **keys})
    return pm.hook.load_model(cfg=cfg, tokenizer=None)


def test_experts_implementation_lands_on_the_model_and_trains(tiny_moe):
    default = load(tiny_moe)
    with torch.no_grad():
        want = default(input_ids=IDS).logits
    model = load(tiny_moe, experts_implementation="batched_mm")
    assert default.config._experts_implementation == "grouped_mm"  # transformers' default
    assert model.config._experts_implementation == "batched_mm"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    # one optimizer step through the chosen experts function
    experts = model.model.layers[0].mlp.experts
    before = experts.gate_up_proj.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, experts.gate_up_proj)


def test_an_unknown_experts_implementation_names_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"'experts_implementation': 'scattermoe' is not accepted \(scattermoe is "
                                          r"Axolotl's own kernel.*accepted: eager, batched_mm, .*grouped_mm"):
        build_run_config({"base_model": "m", "experts_implementation": "scattermoe"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a fact of machines without CUDA")
def test_a_gpu_only_experts_kernel_is_a_note_for_validate_and_refused_by_train(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}])
    path = write_config(tmp_path / "c.yml", base_model="m", datasets=[{"path": str(data), "type": "alpaca"}],
                        output_dir=str(tmp_path / "out"), experts_implementation="sonicmoe")
    result = run_cli(["config", "validate", str(path)])
    assert result.exit_code == 0 and "note: config key 'experts_implementation': 'sonicmoe' runs only" in result.stdout
    with pytest.raises(ConfigError, match=r"'experts_implementation': 'sonicmoe' runs only on an NVIDIA GPU"):
        build_run_config({"base_model": "m", "experts_implementation": "sonicmoe"})


def test_use_kernels_is_passed_to_transformers(tiny_moe):
    pytest.importorskip("kernels")
    assert load(tiny_moe, use_kernels=True).use_kernels is True
    assert load(tiny_moe, use_kernels=False).use_kernels is False


def test_use_kernels_without_the_kernels_package_is_a_machine_fact(monkeypatch):
    import transformers.utils.import_utils as import_utils

    # stands for a machine without the package: transformers' own availability check says no
    monkeypatch.setattr(import_utils, "is_kernels_available", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"'use_kernels': true loads hub kernels through the kernels package"):
        build_run_config({"base_model": "m", "use_kernels": True})
    build_run_config({"base_model": "m", "use_kernels": False})  # turning them off needs nothing


# ---------------------------------------------- Axolotl's KernelsPlugin and its experts flags

KERNELS_PLUGIN = "axolotl.integrations.kernels.KernelsPlugin"


def test_use_scattermoe_runs_grouped_mm_with_the_eager_experts_result(tiny_moe):
    cfg, _ = build_run_config({"base_model": str(tiny_moe), "bf16": False, "use_scattermoe": True,
                               "experts_implementation": "scattermoe"})
    assert cfg.experts_implementation == "grouped_mm"
    assert any(note.startswith("use_scattermoe: true -> experts_implementation: grouped_mm") for note in cfg.notes)
    model = cfg.plugin_manager.hook.load_model(cfg=cfg, tokenizer=None)
    assert model.config._experts_implementation == "grouped_mm"
    reference = load(tiny_moe, experts_implementation="eager")  # one matmul per expert, in a Python loop
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)


def test_use_sonicmoe_asks_for_transformers_sonicmoe():
    if torch.cuda.is_available():
        pytest.skip("the note below is a fact of machines without CUDA")
    with pytest.raises(ConfigError, match=r"'use_sonicmoe' \(experts_implementation 'sonicmoe'\) runs only on an "
                                          r"NVIDIA GPU"):
        build_run_config({"base_model": "m", "use_sonicmoe": True})


def test_both_experts_flags_are_refused():
    with pytest.raises(ConfigError, match="'use_scattermoe' and 'use_sonicmoe' are both true"):
        build_run_config({"base_model": "m", "use_scattermoe": True, "use_sonicmoe": True})


@pytest.mark.parametrize("keys,want", [
    ({}, "eager"),  # the plugin pins eager when no flag picks a kernel
    ({"experts_implementation": "batched_mm"}, "batched_mm"),
    ({"experts_implementation": "scattermoe"}, "eager"),  # scattermoe without its flag
    ({"experts_implementation": "deepgemm"}, "eager"),  # not a name the plugin keeps
    ({"use_scattermoe": True, "experts_implementation": "batched_mm"}, "grouped_mm"),  # the flag wins
])
def test_the_kernels_plugin_sets_what_axolotl_sets(tmp_path, keys, want):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}])
    path = write_config(tmp_path / "c.yml", base_model="m", plugins=[KERNELS_PLUGIN], output_dir=str(tmp_path),
                        datasets=[{"path": str(data), "type": "alpaca"}], **keys)
    result = run_cli(["config", "explain", str(path)])
    assert result.exit_code == 0, result.stderr
    assert re.search(rf"^experts_implementation +\"{want}\"", result.stdout, re.M), result.stdout
    assert re.search(r"^use_kernels +true +Axolotl.s kernels integration", result.stdout, re.M)


@pytest.mark.slow  # ~9 s: a two-step run
def test_a_kernels_plugin_run_trains_through_grouped_mm(tiny_moe, tmp_path):
    pytest.importorskip("kernels")  # the plugin turns use_kernels on, as in Axolotl
    rows = [{"instruction": f"add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(8)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    path = write_config(tmp_path / "c.yml", base_model=str(tiny_moe), plugins=[KERNELS_PLUGIN], use_scattermoe=True,
                        experts_implementation="scattermoe", bf16=False, datasets=[{"path": str(data),
                                                                                    "type": "alpaca"}],
                        micro_batch_size=2, max_steps=2, learning_rate=1e-3, output_dir=str(tmp_path / "out"),
                        # LoRA on the experts too: plait-kernels' routed LoRA experts path (on CPU only when asked)
                        adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
                        lora_target_experts=True, lora_experts_kernel=True)
    result = run_cli(["train", str(path)])
    assert result.exit_code == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    # what runs, said at the start: the mapping, then what the loaded model dispatches to
    assert "use_scattermoe: true -> experts_implementation: grouped_mm" in log
    assert "experts: 2 MoE blocks run their experts with transformers' grouped_mm function" in log
    assert re.search(r"Qwen3MoeExperts x2.*plait torch lora_experts", log), log[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
