"""Mixture-of-experts helpers: the router load-balancing loss and LoRA on experts.

**Aux loss.** Plait's loop calls the model's backbone for hidden states and
computes the loss itself, so the router loss transformers adds inside
``*ForCausalLM.forward`` never happens. The loop does it in three lines::

    kwargs = backbone_kwargs(family, cfg, model.config)   # {"output_router_logits": True} or {}
    outputs = backbone(input_ids=..., attention_mask=..., **kwargs)
    loss = ce_sum / n_tokens                               # the micro-batch's mean CE
    aux = moe_aux_loss(outputs, cfg, model.config, attention_mask)
    if aux is not None:
        loss = loss + aux                                  # coefficient already applied
    (loss / gradient_accumulation_steps).backward()

which is exactly transformers' ``loss + router_aux_loss_coef * aux_loss``.
With sample packing pass ``attention_mask=None``: every packed token is real.

**Experts.** In transformers 5 the experts of Mixtral and Qwen MoE are two
fused 3D parameters per layer (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``), not ``nn.Linear`` modules. A full fine-tune trains
them like any parameter. Module-based LoRA cannot reach them; peft's
``target_parameters`` can, which :func:`lora_expert_targets` supplies when
``lora_target_experts: true``.
"""

from __future__ import annotations


def aux_loss_coef(cfg, model_config) -> float:
    """``router_aux_loss_coef`` from the config, else the model config's value, else 0."""
    value = getattr(cfg, "router_aux_loss_coef", None)
    if value is None:
        value = getattr(model_config, "router_aux_loss_coef", 0.0)
    return float(value or 0.0)


def backbone_kwargs(family, cfg, model_config) -> dict:
    """Extra keyword arguments for the backbone's forward: ask for router
    logits only when an aux loss will be added (they cost memory)."""
    if family is None or not family.is_moe or aux_loss_coef(cfg, model_config) == 0.0:
        return {}
    return {"output_router_logits": True}


def load_balancing_loss(router_logits, top_k: int, attention_mask=None):
    """Switch-Transformer load-balancing loss over all MoE layers.

    ``router_logits`` is a sequence of ``[tokens, experts]`` tensors, one per
    sparse layer (tokens = batch * sequence, flattened). With ``f_e`` the share
    of top-k assignments that go to expert ``e`` and ``P_e`` its mean router
    probability, both pooled over layers and real tokens::

        loss = n_experts * sum_e f_e * P_e

    It is ``top_k`` when routing is perfectly uniform and grows as routing
    collapses onto few experts. ``attention_mask`` (``[batch, seq]``) leaves
    padding out.
    """
    import torch

    logits = torch.cat([layer.float() for layer in router_logits], dim=0)  # [layers * tokens, experts]
    n_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [rows, top_k]
    assigned = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # 1 where an expert was picked
    if attention_mask is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        weights = attention_mask.reshape(-1).to(logits.device, torch.float32).repeat(len(router_logits))
    total = weights.sum()
    fraction_routed = (assigned * weights[:, None]).sum(0) / total
    mean_prob = (probs * weights[:, None]).sum(0) / total
    return n_experts * torch.sum(fraction_routed * mean_prob)


def moe_aux_loss(model_outputs, cfg, model_config, attention_mask=None):
    """The weighted router loss to add to the micro-batch's mean loss, or
    ``None`` when the outputs carry no router logits (dense model, or the
    backbone was not asked for them) or the coefficient is 0."""
    router_logits = getattr(model_outputs, "router_logits", None)
    coef = aux_loss_coef(cfg, model_config)
    if not router_logits or coef == 0.0:
        return None
    top_k = getattr(model_config, "num_experts_per_tok", None)
    if top_k is None:
        raise ValueError(f"model config of type {model_config.model_type!r} has no num_experts_per_tok")
    return coef * load_balancing_loss(router_logits, top_k, attention_mask)


def lora_expert_targets(family, cfg) -> list[str]:
    """Parameter suffixes for peft ``LoraConfig(target_parameters=...)``:
    the family's fused expert weights when ``lora_target_experts`` is on."""
    if family is None or not getattr(cfg, "lora_target_experts", False):
        return []
    return list(family.expert_parameters)


def expert_parameters_of(model, family) -> dict[str, object]:
    """``{name: parameter}`` of every fused expert weight in ``model``, found by
    the family's suffixes (peft may rename the holder to ``base_layer``)."""
    if family is None or not family.expert_parameters:
        return {}
    found = {}
    for name, param in model.named_parameters():
        # peft may rename the holder to base_layer; plait-bnb's 4-bit experts are parametrized
        plain = name.replace(".base_layer", "").replace(".parametrizations.", ".").removesuffix(".original")
        if any(plain.endswith("." + suffix) for suffix in family.expert_parameters):
            found[name] = param
    return found


def describe_experts(model, family) -> list[str]:
    """Log lines saying what training does to the experts, so they are never
    frozen or skipped without the user being told."""
    experts = expert_parameters_of(model, family)
    if not experts:
        return []
    trainable = [name for name, param in experts.items() if param.requires_grad]
    adapted = [name for name, _ in model.named_parameters() if "lora_" in name and ".experts." in name]
    head = f"{family.name} experts: {len(experts)} fused 3D parameters"
    if trainable:
        return [f"{head}, {len(trainable)} trainable (full fine-tune of the experts)"]
    if adapted:
        return [f"{head}, frozen; LoRA adapts them through {len(adapted)} adapter tensors"]
    return [f"{head}, frozen with no adapters: set lora_target_experts: true to train them"]


def check_expert_adapters(cfg, model, family) -> None:
    """Fail before the first step when ``lora_target_experts: true`` was asked
    for but the adapter plugin attached no expert adapters: training would
    otherwise run to the end with the experts silently frozen."""
    from plait.errors import TrainingError

    if not getattr(cfg, "lora_target_experts", False) or not expert_parameters_of(model, family):
        return
    if not any("lora_" in name and ".experts." in name for name, _ in model.named_parameters()):
        raise TrainingError(
            f"lora_target_experts: true, but the adapter attached no LoRA to the {family.name} experts "
            f"({', '.join(family.expert_parameters)}); the adapter plugin must pass "
            "LoraConfig(target_parameters=plait_models.lora_expert_targets(family, cfg)). "
            "Set lora_target_experts: false to train attention only."
        )
