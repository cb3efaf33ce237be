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
    # the attention module the kernel plugin swaps: rotary inside, and o_proj plus q/k/v (phi3: fused qkv_proj)
    attention = classes[family.attention_class]
    assert hasattr(attention, "o_proj") and (hasattr(attention, "q_proj") or hasattr(attention, "qkv_proj"))
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


#: families with a sliding window shorter than the packed rows: SDPA/eager
#: pack through transformers' own masks (position_ids only; Plait's
#: block-diagonal mask would widen the window), and must still be exact
SHORT_WINDOW = {
    "mistral": dict(sliding_window=8),
    "gemma2": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
}
PACKED_WIDTH = 24
#: rows of each bin; the padding tail up to PACKED_WIDTH is its own segment
BINS = [[10, 7], [5, 9, 6]]


#: transformers has no SDPA path for these (gemma2: attention soft-capping)
NO_SDPA = {"gemma2"}
PACKING_CASES = [pytest.param(t, o, attn, id=f"{t}{'-short-window' if o else ''}-{attn}")
                 for t, o in [(t, {}) for t in MODEL_TYPES] + list(SHORT_WINDOW.items())
                 for attn in ("sdpa", "eager") if not (attn == "sdpa" and t in NO_SDPA)]


@pytest.mark.parametrize("model_type,overrides,attn", PACKING_CASES)
def test_packed_rows_do_not_attend_across_boundaries(model_type, overrides, attn):
    """Plait's own packed path: bins laid out by core's ``plait.data.packing.collate_packed``
    (per-row position_ids and an explicit block-diagonal mask for the
    backend), fed as the loop feeds them (``use_cache=False``, while the model
    config keeps ``use_cache: true``). Every row's logits equal the row run
    alone within atol=1e-5 (fp32; observed <= ~3e-7). The batch goes through
    Plait's forward (``forward_logits``), which hands a short-window model
    only the position_ids once the check the loop runs after ``load_model``
    has marked it."""
    from types import SimpleNamespace

    import torch

    from plait.data.packing import check_loaded_model, collate_packed
    from plait.model.forward import forward_logits, masks_from_positions_marked

    model = build_model(model_type, **overrides)
    model.set_attn_implementation(attn)
    model.config.use_cache = True
    model.eval()
    cfg = SimpleNamespace(sample_packing=True, eval_sample_packing=None, sequence_len=PACKED_WIDTH,
                          attn_implementation=attn)
    check_loaded_model(cfg, model)
    assert masks_from_positions_marked(model) == bool(overrides)

    generator = torch.Generator().manual_seed(0)
    rows = [[torch.randint(3, 300, (n,), generator=generator).tolist() for n in lens] for lens in BINS]
    batch = collate_packed([{"input_ids": sum(bin_, []), "labels": sum(bin_, []), "seq_lens": lens}
                            for bin_, lens in zip(rows, BINS)], 0, attn, pad_to=PACKED_WIDTH, dtype=model.dtype)
    batch.pop("labels")
    with torch.no_grad():
        packed = forward_logits(model, batch).logits  # (it passes use_cache=False itself)
        for b, bin_ in enumerate(rows):
            start = 0
            for row in bin_:
                alone = model(input_ids=torch.tensor([row]), use_cache=False).logits[0]
                got = packed[b, start:start + len(row)]
                assert torch.allclose(got, alone, atol=1e-5), (b, start, float((got - alone).abs().max()))
                start += len(row)
