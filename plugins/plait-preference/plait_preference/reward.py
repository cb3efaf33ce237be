"""Bradley-Terry reward models (``reward_model: true``).

The model is transformers' ``AutoModelForSequenceClassification`` with one
label: the causal LM's backbone and a scalar head (``score``), so the saved
result loads in plain transformers. A pair is one row of two sequences, as
for DPO; the reward of a sequence is the head on the hidden state of its last
token, and the loss is ``-log sigma(r_chosen - r_rejected)`` per pair (TRL's
``RewardTrainer``), plus ``center_rewards_coefficient * (r_c + r_r)^2`` when set.
"""

from __future__ import annotations


def load_reward_model(cfg, tokenizer):
    """The sequence-classification model (1 label) on ``base_model``; its pad id set so
    transformers' own pooling works when the saved model is used outside Plait.

    With ``load_in_4bit``/``load_in_8bit`` (QLoRA) the backbone's linear layers are
    quantized by plait-bnb's config and frozen by its k-bit preparation, as its own
    loader does for a causal LM; the new ``score`` head stays a plain linear layer
    (transformers keeps a model's last layer out of quantization), which the adapter
    plugin trains in full."""
    from transformers import AutoModelForSequenceClassification

    from plait.model.loading import check_model_sources, fit_to_tokenizer, pretrained_kwargs

    check_model_sources(cfg, ("base_model",))
    kwargs = pretrained_kwargs(cfg)
    quantized = bool(cfg.load_in_4bit or cfg.load_in_8bit)
    if quantized:
        kwargs.update(_quantized_kwargs(cfg, kwargs))
    model = AutoModelForSequenceClassification.from_pretrained(cfg.base_model, num_labels=1, **kwargs)
    fit_to_tokenizer(cfg, model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if quantized:
        from plait_bnb.quantize import prepare_for_kbit_training

        model = prepare_for_kbit_training(model, cfg.gradient_checkpointing)
    # gradient_checkpointing is switched on by core's model pipeline (plait.pipeline.setup_model)
    return model


def _quantized_kwargs(cfg, kwargs: dict) -> dict:
    """plait-bnb's ``quantization_config`` and device placement (the config's
    ``device_map`` wins, as in plait-bnb's loader)."""
    from plait.errors import ConfigError

    try:
        from plait_bnb.quantize import device_map, quantization_config
    except ImportError:
        raise ConfigError("reward_model: true with load_in_4bit/load_in_8bit needs the plait-bnb plugin "
                          "(pip install plait-bnb)") from None
    return {"quantization_config": quantization_config(cfg), "device_map": kwargs.get("device_map") or device_map()}


def sequence_rewards(model, batch: dict):
    """The scalar reward of every segment of a collated micro-batch: the head on
    its last token's hidden state (``[S]``, float32)."""
    import torch

    from plait.model.forward import unwrap

    from plait_preference.logps import SEGMENT_KEYS

    classifier = unwrap(model)
    decoder = getattr(classifier, classifier.base_model_prefix)
    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(keep_hidden)
    try:
        # the outer call, so wrappers (peft, DDP) do their part; its own pooled logits are not used
        model(**{k: v for k, v in batch.items() if k not in ("labels", *SEGMENT_KEYS)}, use_cache=False)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    segments = batch["segment_index"]
    n = batch["segment_roles"].shape[0]
    # the last position of each segment: the largest flat index holding it
    flat = segments.reshape(-1)
    positions = torch.arange(flat.numel(), device=flat.device)
    last = torch.full((n,), -1, dtype=torch.long, device=flat.device).scatter_reduce(
        0, flat.clamp(min=0), torch.where(flat >= 0, positions, -1), reduce="amax")
    head = classifier.score
    return head(hidden.reshape(-1, hidden.shape[-1])[last]).squeeze(-1).float()


class RewardObjective:
    """Pairs, each scored by the Bradley-Terry loss on the two sequences' rewards."""

    unit = "pairs"
    perplexity = False

    def __init__(self, cfg):
        self.center = getattr(cfg, "center_rewards_coefficient", None)

    def count(self, batch) -> int:
        from plait_preference.rows import CHOSEN

        return int((batch["segment_roles"] == CHOSEN).sum())

    def loss(self, run, batch, *, training: bool = False):
        import torch
        import torch.nn.functional as F

        from plait_preference.collate import to_device
        from plait_preference.objective import Roles
        from plait_preference.rows import CHOSEN, REJECTED

        # which segment is which, from the host batch: index tensors, no boolean mask on the device
        roles = Roles(batch["segment_roles"], run.device)
        n = roles.count(CHOSEN)
        batch = to_device(batch, run.device)
        rewards = sequence_rewards(run.model, batch)
        chosen, rejected = rewards.index_select(0, roles.of(CHOSEN)), rewards.index_select(0, roles.of(REJECTED))
        per_pair = -F.logsigmoid(chosen - rejected)
        if self.center:
            per_pair = per_pair + self.center * (chosen + rejected) ** 2
        chosen, rejected = chosen.detach(), rejected.detach()
        return per_pair.sum(), {
            "rewards/chosen": (chosen.sum(), n), "rewards/rejected": (rejected.sum(), n),
            "rewards/margins": ((chosen - rejected).sum(), n),
            "rewards/accuracies": ((chosen > rejected).to(torch.float32).sum(), n)}
