"""Every family against a real tiny model of its architecture.

A family is a list of names; these tests fail when a name drifts from what
transformers builds (a renamed module, a fused projection, a new router).
"""

from __future__ import annotations

import pytest
from plait_models.testing import MODEL_TYPES, build_model, fixed_batch, train_steps

from plait.families import find_family

#: linear modules that must never be LoRA targets: routers and the head
ROUTER_SUFFIXES = (".gate", ".shared_expert_gate")


def _targets(model, names):
    """Module names peft would adapt for ``target_modules=names`` (suffix match)."""
    return {n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in names)}


def _decoder_layers(model):
    return model.model.layers


@pytest.fixture(params=MODEL_TYPES)
def case(request, pm):
    family = find_family(pm, request.param)
    assert family is not None, f"no family claims {request.param}"
    return request.param, family, build_model(request.param)


def test_decoder_layer_class_matches_model(case):
    _, family, model = case
    assert {type(layer).__name__ for layer in _decoder_layers(model)} == {family.decoder_layer_class}


def test_lora_targets_cover_every_linear_but_routers_and_head(case):
    import torch.nn as nn

    _, family, model = case
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targeted = _targets(model, family.lora_target_linear)
    for name in family.lora_target_linear:  # each name is real and a Linear
        hits = _targets(model, [name])
        assert hits, f"{name} matches no module"
        assert hits <= linears, f"{name} matches non-Linear modules {hits - linears}"
    assert "lm_head" not in targeted
    assert not {n for n in targeted if n.endswith(ROUTER_SUFFIXES)}
    # nothing trainable is forgotten: every other Linear is a router or the head
    left = linears - targeted
    assert all(n == "lm_head" or n.endswith(ROUTER_SUFFIXES) for n in left), sorted(left)


def test_tp_plan_names_real_linears(case):
    import torch.nn as nn

    _, family, model = case
    layers = list(_decoder_layers(model))
    for suffix, style in family.tp_plan.items():
        assert style in ("colwise", "rowwise", "sequence")
        found = [layer.get_submodule(suffix) for layer in layers if _has(layer, suffix)]
        assert found and all(isinstance(m, nn.Linear) for m in found), suffix
    # column-parallel outputs feed row-parallel inputs: both halves of each pair present
    styles = set(family.tp_plan.values())
    assert not family.tp_plan or styles == {"colwise", "rowwise"}


def _has(module, suffix):
    try:
        module.get_submodule(suffix)
        return True
    except AttributeError:
        return False


def test_kernel_classes_exist_and_norm_offset_is_right(case):
    import torch

    model_type, family, model = case
    classes = {type(m).__name__: m for m in model.modules()}
    assert family.norm_class in classes
    if family.mlp_class is not None:
        assert family.mlp_class in classes
    activation = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}[
        getattr(model.config, "hidden_act", None) or model.config.hidden_activation]
    assert family.mlp_activation in (activation, activation + "_fused")
    if family.mlp_activation == "swiglu_fused":
        assert hasattr(classes[family.mlp_class], "gate_up_proj")
    elif family.mlp_class is not None:
        mlp = classes[family.mlp_class]
        assert all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
    # with a zero weight the norm returns x_normalised * offset: checks the Gemma (1 + w) convention
    norm = classes[family.norm_class]
    x = torch.randn(3, norm.weight.shape[0])
    with torch.no_grad():
        norm.weight.zero_()
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * family.norm_offset
        assert torch.allclose(norm(x), expected, atol=1e-4)


def test_full_training_step_reduces_loss_and_reaches_experts(case):
    import torch

    from plait_models.moe import expert_parameters_of

    _, family, model = case
    batch = fixed_batch()
    losses = train_steps(model, list(model.parameters()), batch, steps=5, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05, losses
    experts = expert_parameters_of(model, family)
    assert bool(experts) == family.is_moe
    # one more backward: every expert tensor gets a gradient (none frozen or skipped)
    model(input_ids=batch, labels=batch).loss.backward()
    for name, param in experts.items():
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name


def test_lora_training_step_reduces_loss(case):
    from peft import LoraConfig, get_peft_model

    _, family, model = case
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(family.lora_target_linear)))
    trainable = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    losses = train_steps(lora, [p for _, p in trainable], fixed_batch(), steps=5, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_chat_template_renders_end_of_turn(model_type, pm, tokenizer):
    from plait_models import apply_family_tokenizer_fixes

    family = find_family(pm, model_type)
    fixes = apply_family_tokenizer_fixes(family, tokenizer)
    assert tokenizer.chat_template == family.default_chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "and 4?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and "add 2 and 3" in text and "and 4?" in text
    for token in family.end_of_turn_tokens:
        assert token in text
        # one id per marker, and generation stops on it
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(text, add_special_tokens=False)["input_ids"].count(token_id) >= 1
        assert token_id in fixes.stop_token_ids
    assert fixes.end_of_turn_tokens == list(family.end_of_turn_tokens)


def test_every_model_type_has_exactly_one_family(pm):
    from plait.families import all_families

    import plait_models

    ours = plait_models.model_families()
    claimed = [t for f in ours for t in f.model_types]
    assert len(claimed) == len(set(claimed))
    assert set(MODEL_TYPES) <= set(claimed) and "gemma3" in claimed
    assert {f.name for f in ours} <= {f.name for f in all_families(pm)}


def test_packed_rows_do_not_attend_across_boundaries(case):
    """Two rows packed into one sequence (position_ids restarting, no 2D mask,
    no KV cache) give the same logits as each row alone: transformers builds a
    block-diagonal mask from the position_ids for every family here."""
    import torch

    _, _, model = case
    model.eval()
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, 300, (1, 10), generator=generator)
    second = torch.randint(3, 300, (1, 7), generator=generator)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        positions = torch.cat([torch.arange(10), torch.arange(7)])[None]
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
    assert torch.allclose(packed, alone, atol=1e-5), float((packed - alone).abs().max())
