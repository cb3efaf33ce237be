"""The llmcompressor: block: which recipes run, which are refused (naming the
key), and the mask keeper on a real torch optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from plait.errors import ConfigError
from plait.testing import make_tiny_model, run_cli, write_config
from plait_sparse.masks import SparsityKeeper, targeted_parameters
from plait_sparse.recipe import ConstantPruning, parse_recipe

EXAMPLE = Path("/work/shared/axolotl-examples/configs/examples/llama-3/sparse-finetuning.yaml")


def recipe(**modifier):
    return {"finetuning_stage": {"finetuning_modifiers": {"ConstantPruningModifier": modifier}}}


def test_axolotl_example_recipe_parses():
    if not EXAMPLE.exists():
        pytest.skip("the shared Axolotl examples are not here")
    block = yaml.safe_load(EXAMPLE.read_text())["llmcompressor"]
    (modifier,) = parse_recipe(block["recipe"])
    assert modifier.start == 0 and modifier.end is None and len(modifier.targets) == 7
    assert modifier.matches("model.layers.3.self_attn.q_proj.weight", "Linear") == "re:.*q_proj.weight"
    assert modifier.matches("model.layers.3.self_attn.q_proj.bias", "Linear") is None
    assert modifier.matches("model.embed_tokens.weight", "Embedding") is None


def test_targets_by_name_class_and_top_level_group():
    (modifier,) = parse_recipe({"sparse_modifiers": {"ConstantPruningModifier": {
        "targets": ["model.layers.0.mlp.up_proj.weight", "LlamaRMSNorm"], "start": 2, "end": 5}}})
    assert modifier.matches("model.layers.0.mlp.up_proj.weight", "Linear")
    assert not modifier.matches("model.layers.1.mlp.up_proj.weight", "Linear")
    assert modifier.matches("model.norm.weight", "LlamaRMSNorm") == "LlamaRMSNorm"
    assert [modifier.active(step) for step in range(7)] == [False, False, True, True, True, False, False]


@pytest.mark.parametrize("bad, key, says", [
    ({"finetuning_stage": {"finetuning_modifiers": {"GPTQModifier": {"targets": "Linear"}}}},
     "llmcompressor.recipe.finetuning_stage.finetuning_modifiers.GPTQModifier", "only llm-compressor's"),
    (recipe(targets=["re:.*q_proj.weight"], start=0, mask_structure="2:4"),
     "ConstantPruningModifier.mask_structure", "accepted: targets, start, end"),
    (recipe(targets=["re:.*q_proj[.weight"]), "ConstantPruningModifier.targets", "not a valid regex"),
    (recipe(targets=[]), "ConstantPruningModifier.targets", "give a list"),
    (recipe(targets=["re:.*q_proj.weight"], start=-1), "ConstantPruningModifier.start", "-1"),
    (recipe(targets=["re:.*q_proj.weight"], start=3, end=2), "ConstantPruningModifier.end", "after start (3)"),
    ({"stage": {"modifiers_list": {}}}, "llmcompressor.recipe.stage.modifiers_list", "ending in '_modifiers'"),
    ("recipe.yaml", "llmcompressor.recipe", "give the recipe inline"),
])
def test_bad_recipes_name_the_key(bad, key, says):
    with pytest.raises(ConfigError) as error:
        parse_recipe(bad)
    assert key in str(error.value) and says in str(error.value)


def test_validate_refuses_a_bad_recipe_and_lora(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model")
    common = dict(base_model=str(model_dir), datasets=[{"path": "x.jsonl", "type": "alpaca"}],
                  output_dir=str(tmp_path / "out"))
    bad = write_config(tmp_path / "bad.yml", **common, llmcompressor={"recipe": {
        "stage": {"stage_modifiers": {"SparseGPTModifier": {"sparsity": 0.5}}}}})
    result = run_cli(["config", "validate", str(bad)])
    assert result.exit_code == 2
    assert "llmcompressor.recipe.stage.stage_modifiers.SparseGPTModifier" in result.stderr

    lora = write_config(tmp_path / "lora.yml", **common, adapter="lora", lora_target_linear=True,
                        llmcompressor={"recipe": recipe(targets=["re:.*q_proj.weight"])})
    result = run_cli(["config", "validate", str(lora)])
    assert result.exit_code == 2 and "with adapter: lora the base weights are frozen" in result.stderr


def test_a_target_selecting_nothing_is_named(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "model"))
    (modifier,) = parse_recipe(recipe(targets=["re:.*q_proj.weight", "re:.*qkv_proj.weight"]))
    with pytest.raises(ConfigError, match=r"'re:\.\*qkv_proj\.weight' selects no parameter of LlamaForCausalLM"):
        targeted_parameters(model, modifier)


def test_keeper_masks_what_the_gradient_alone_would_not():
    """Adam carrying momentum from steps before ``start`` keeps moving a
    weight whose gradient is zeroed; the mask after each step holds it at zero,
    and past ``end`` the entry trains again."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    step = {"now": 0}

    def train_step():
        optimizer.zero_grad()
        layer(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
        step["now"] += 1

    keeper = SparsityKeeper({"weight": layer.weight}, ConstantPruning(("weight",), start=2, end=5),
                            lambda: step["now"])
    keeper.attach(optimizer)
    for _ in range(2):
        train_step()  # before start: nothing is masked, Adam builds momentum everywhere
    with torch.no_grad():
        layer.weight[:, :4] = 0.0  # pruned now, at the start step
    before = layer.weight.detach().clone()
    for _ in range(3):  # steps 2, 3, 4
        train_step()
        assert torch.equal(layer.weight[:, :4], torch.zeros(8, 4))
    assert not torch.equal(layer.weight[:, 4:], before[:, 4:])
    train_step()  # step 5: past end, the zeros train again
    assert (layer.weight[:, :4] != 0).all()
    keeper.detach()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
