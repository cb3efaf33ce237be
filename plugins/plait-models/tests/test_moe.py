"""The router aux loss and LoRA on fused experts, against transformers and peft."""

from __future__ import annotations

import types

import pytest

from plait_models.moe import (aux_loss_coef, backbone_kwargs, describe_experts, load_balancing_loss,
                              lora_expert_targets, moe_aux_loss)
from plait_models.testing import build_model, fixed_batch

MOE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _cfg(**keys):
    return types.SimpleNamespace(**{"router_aux_loss_coef": None, "lora_target_experts": False, **keys})


@pytest.mark.parametrize("model_type", MOE_TYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_aux_loss_equals_transformers(model_type, padded, pm):
    """Backbone + moe_aux_loss gives the aux loss transformers' own forward adds."""
    import torch

    from plait.families import find_family

    family = find_family(pm, model_type)
    model = build_model(model_type)
    batch = fixed_batch()
    mask = torch.ones_like(batch)
    if padded:
        mask[1, 15:] = 0
    reference = model(input_ids=batch, attention_mask=mask, labels=batch, output_router_logits=True)
    cfg = _cfg()
    outputs = model.model(input_ids=batch, attention_mask=mask, **backbone_kwargs(family, cfg, model.config))
    ours = moe_aux_loss(outputs, cfg, model.config, mask)
    expected = model.config.router_aux_loss_coef * reference.aux_loss
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-7), (float(ours), float(expected))


def test_aux_loss_is_top_k_when_routing_is_uniform_and_grows_when_collapsed():
    import torch

    uniform = [torch.zeros(32, 4)]  # equal logits: topk picks ties, probs uniform
    assert torch.isclose(load_balancing_loss(uniform, top_k=2), torch.tensor(2.0))
    collapsed = [torch.tensor([[9.0, 8.0, 0.0, 0.0]]).repeat(32, 1)]
    assert load_balancing_loss(collapsed, top_k=2) > 3.5


def test_aux_loss_trains_the_router(pm):
    from plait.families import find_family

    family = find_family(pm, "mixtral")
    model = build_model("mixtral")
    cfg = _cfg(router_aux_loss_coef=0.5)
    outputs = model.model(input_ids=fixed_batch(), **backbone_kwargs(family, cfg, model.config))
    moe_aux_loss(outputs, cfg, model.config).backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_coefficient_precedence_and_off_switch(pm):
    from plait.families import find_family

    model_config = types.SimpleNamespace(router_aux_loss_coef=0.001, num_experts_per_tok=2, model_type="mixtral")
    assert aux_loss_coef(_cfg(), model_config) == 0.001
    assert aux_loss_coef(_cfg(router_aux_loss_coef=0.02), model_config) == 0.02
    mixtral, llama = find_family(pm, "mixtral"), find_family(pm, "llama")
    assert backbone_kwargs(mixtral, _cfg(), model_config) == {"output_router_logits": True}
    assert backbone_kwargs(mixtral, _cfg(router_aux_loss_coef=0.0), model_config) == {}
    assert backbone_kwargs(llama, _cfg(), model_config) == {}
    assert moe_aux_loss(types.SimpleNamespace(router_logits=None), _cfg(), model_config) is None


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_lora_on_experts_trains_them_and_the_log_says_so(model_type, pm):
    """lora_target_experts: peft target_parameters wraps the fused 3D weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from plait.families import find_family

    family = find_family(pm, model_type)
    frozen = get_peft_model(build_model(model_type), LoraConfig(r=4, target_modules=list(family.lora_target_linear)))
    assert "frozen with no adapters" in describe_experts(frozen, family)[0]

    targets = lora_expert_targets(family, _cfg(lora_target_experts=True))
    assert targets == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert lora_expert_targets(family, _cfg()) == []
    model = get_peft_model(build_model(model_type), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(family.lora_target_linear), target_parameters=targets))
    assert "LoRA adapts them" in describe_experts(model, family)[0]
    expert_lora = [p for n, p in model.named_parameters() if "lora_B" in n and ".experts." in n]
    assert expert_lora
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch, losses = fixed_batch(), []
    for _ in range(5):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.abs().sum() > 0 for p in expert_lora)  # B starts at zero: it moved


def test_full_fine_tune_reports_trainable_experts(pm):
    from plait.families import find_family

    family = find_family(pm, "qwen3_moe")
    line = describe_experts(build_model("qwen3_moe"), family)[0]
    assert "4 trainable" in line  # two sparse layers: gate_up_proj and down_proj each


def test_experts_requested_but_not_adapted_stops_the_run(pm):
    from peft import LoraConfig, get_peft_model

    from plait.errors import TrainingError
    from plait.families import find_family

    from plait_models.moe import check_expert_adapters

    family = find_family(pm, "mixtral")
    attention_only = get_peft_model(build_model("mixtral"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TrainingError, match="lora_target_experts: true, but the adapter attached no LoRA"):
        check_expert_adapters(_cfg(lora_target_experts=True), attention_only, family)
    check_expert_adapters(_cfg(), attention_only, family)  # not asked for: fine (and logged elsewhere)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_aux_loss_of_packed_rows_equals_the_rows_padded(model_type, pm):
    """Rows packed into one full bin (Plait's collate, block-diagonal mask) give
    the router loss of the same rows in a padded batch with padding masked out:
    the token set is the same and isolation keeps every router input the same."""
    import torch

    from plait.data.packing import collate_packed
    from plait.families import find_family

    family = find_family(pm, model_type)
    model = build_model(model_type)
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 4, 7]
    rows = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in lengths]
    flat = sum(rows, [])
    packed = collate_packed([{"input_ids": flat, "labels": flat, "seq_lens": lengths}], 2, "sdpa",
                            dtype=torch.float32)
    cfg = _cfg(sample_packing=True)
    kwargs = backbone_kwargs(family, cfg, model.config)
    outputs = model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                          attention_mask=packed["attention_mask"], use_cache=False, **kwargs)
    packed_loss = moe_aux_loss(outputs, cfg, model.config, None)

    width = max(lengths)
    ids = torch.full((len(rows), width), 2)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    padded = model.model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    padded_loss = moe_aux_loss(padded, cfg, model.config, mask)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-7), (float(packed_loss), float(padded_loss))


def test_router_loss_is_requested_with_sample_packing(pm):
    from plait.families import find_family
    from plait_models import request_router_logits

    model = build_model("mixtral")
    note = request_router_logits(_cfg(sample_packing=True), model, find_family(pm, "mixtral"))
    assert note.startswith("mixtral: router load-balancing loss added") and model.config.output_router_logits


def test_plait_train_packed_moe_adds_the_router_loss(tmp_path):
    """``plait train`` on a tiny Mixtral with sample_packing: the log says the
    router loss is added and the run finishes with a falling loss."""
    import json

    from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl
    from plait_models.testing import EXTRA_CONFIG

    model_dir = make_tiny_model(tmp_path / "base", family="mixtral", **EXTRA_CONFIG["mixtral"])
    rows = [{"text": " ".join(["alpha beta gamma delta"] * (1 + i % 4))} for i in range(24)]
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    cfg = write_config(tmp_path / "cfg.yml", base_model=str(model_dir), sequence_len=64, sample_packing=True,
                       datasets=[{"path": str(data), "type": "completion"}], micro_batch_size=1, max_steps=8,
                       learning_rate=3e-3, warmup_steps=0, router_aux_loss_coef=0.02, logging_steps=1,
                       output_dir=str(tmp_path / "out"))
    result = run_cli(["train", str(cfg)])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "mixtral: router load-balancing loss added, coefficient 0.02" in result.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "eval" not in line]
    assert losses[-1] < losses[0]


def test_loop_forward_hands_the_packed_mask_to_the_decoder():
    """The loop's forward (plait.model.forward.forward_hidden) on an MoE model
    returning router logits: the decoder still gets the 4-D packed mask (not
    None, which would leave isolation to transformers' position_ids heuristics),
    and each packed row's hidden states equal the row run alone."""
    import torch

    from plait.data.packing import collate_packed
    from plait.model.forward import forward_hidden

    model = build_model("mixtral")
    model.config.output_router_logits = True
    rows = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 9)]
    packed = collate_packed([{"input_ids": sum(rows, []), "labels": sum(rows, []), "seq_lens": [6, 9]}], 2, "sdpa",
                            dtype=torch.float32)
    seen = []  # the mask the first attention layer is given
    attention = model.model.layers[0].self_attn
    probe = attention.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                                with_kwargs=True)
    try:
        inputs = {k: v for k, v in packed.items() if k != "labels"}
        # positions that do not restart: only the mask can keep the rows apart
        # (rotary attention depends on relative positions, so rows still match)
        inputs["position_ids"] = torch.arange(15)[None]
        hidden, _, outputs = forward_hidden(model, inputs)
    finally:
        probe.remove()
    assert seen[-1] is not None and torch.equal(seen[-1].bool(), packed["attention_mask"])
    assert outputs.router_logits is not None
    start = 0
    for row in rows:
        alone, _, _ = forward_hidden(model, {"input_ids": torch.tensor([row])})
        torch.testing.assert_close(hidden[0, start:start + len(row)], alone[0], atol=1e-5, rtol=1e-5)
        start += len(row)
