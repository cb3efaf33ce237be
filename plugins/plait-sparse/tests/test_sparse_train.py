"""Sparse fine-tuning end to end: a tiny Llama pruned 2:4 in its projections
trains with Axolotl's llmcompressor: block; the pruned entries come out of
training exactly zero, everything else trains, and the loss falls."""

from __future__ import annotations

import json

import pytest
import torch

from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AXOLOTL_RECIPE = {"finetuning_stage": {"finetuning_modifiers": {"ConstantPruningModifier": {
    "targets": [f"re:.*{name}.weight" for name in PROJECTIONS], "start": 0}}}}


def prune_two_of_four(model_dir) -> dict:
    """Zero the two smallest of every four weights of each projection and of
    the LM head (which the recipe does not target), save in place; the zero
    patterns by parameter name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    zeros = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and (any(p in name for p in PROJECTIONS) or name == "lm_head.weight"):
                groups = param.view(-1, 4)
                smallest = groups.abs().argsort(dim=1)[:, :2]
                groups.scatter_(1, smallest, 0.0)
                zeros[name] = param == 0
    model.save_pretrained(model_dir, safe_serialization=True)
    return zeros


def assert_zeros_kept(out, model_dir, zeros) -> None:
    """The targeted parameters' pruned entries are exactly zero in the saved
    model; their other entries, the embeddings and the untargeted head's
    zeros trained."""
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, was_zero in zeros.items():
        weight = trained[name]
        if name == "lm_head.weight":
            # not targeted: its zeros train like any weight
            assert (weight[was_zero] != 0).float().mean() > 0.9, name
            continue
        assert torch.equal(weight[was_zero], torch.zeros_like(weight[was_zero])), name
        # the kept entries trained
        assert (weight[~was_zero] != base[name][~was_zero]).float().mean() > 0.9, name
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_pruned_weights_stay_zero_and_the_rest_trains(tmp_path):
    pytest.importorskip("plait_formats")
    model_dir = make_tiny_model(tmp_path / "model")
    zeros = prune_two_of_four(model_dir)
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "add 2 and 3", "input": "", "output": "5"}] * 16)
    out = tmp_path / "out"
    # weight decay and momentum both move a zero weight without a mask; Axolotl's plugin line and block as written
    config = write_config(
        tmp_path / "config.yml", base_model=str(model_dir), datasets=[{"path": str(data), "type": "alpaca"}],
        plugins=["axolotl.integrations.llm_compressor.LLMCompressorPlugin"],
        llmcompressor={"recipe": AXOLOTL_RECIPE, "save_compressed": True},
        sequence_len=128, micro_batch_size=4, max_steps=6, learning_rate=3e-3, weight_decay=0.1,
        lr_scheduler="constant", optimizer="adamw_torch", output_dir=str(out))
    result = run_cli(["train", str(config)])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "llmcompressor: 14 parameters keep their zero entries from step 0 to the end (50.0%" in result.stderr
    assert_zeros_kept(out, model_dir, zeros)
    run_losses = losses(out)
    assert len(run_losses) == 6 and run_losses[-1] < run_losses[0] - 0.5, run_losses
    # save_compressed: plain safetensors (compressed-tensors' form of a sparse, unquantized model)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
