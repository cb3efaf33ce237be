"""Process reward models (``process_reward_model: true``), as in Axolotl and TRL's ``PRMTrainer``.

The model is transformers' ``AutoModelForTokenClassification`` with
``num_labels`` classes (Axolotl's default 2: a step is wrong or right): the
causal LM's backbone and a linear head (``score``) on every position, so the
saved result loads in plain transformers. The rows come from the
``stepwise_supervised`` type (:mod:`plait_preference.stepwise`): each step's
label sits on its last token, every other token is -100.

The loss is the cross-entropy of the head's logits over the labelled tokens,
summed per micro-batch and averaged by the loop over every labelled token of
the step (the unit ``labelled_steps``), the mean transformers' token
classification loss takes. ``accuracy`` is the share of labelled steps whose
most likely class is the label (TRL's ``compute_accuracy``). As TRL's
``disable_dropout`` default does, the model's dropout modules (the head's
``classifier_dropout``) are switched off.

With LoRA the head starts untrained and must train in full: plait-peft
gives the model peft's ``TOKEN_CLS`` task type, which trains and saves
``score`` beside the adapter (``modules_to_save``), as in Axolotl; a run
whose head would stay frozen is refused (:func:`check_head_trains`).
"""

from __future__ import annotations

from plait.errors import ConfigError

#: the head of transformers' causal-LM token classifiers (GenericForTokenClassification)
HEAD = "score"
DEFAULT_NUM_LABELS = 2
MODEL_TYPE = "AutoModelForTokenClassification"


def num_labels(cfg) -> int:
    return cfg.num_labels if cfg.num_labels is not None else DEFAULT_NUM_LABELS


def validate(cfg) -> None:
    """Bad combinations with ``process_reward_model``, named before any model or data work."""
    from plait_preference.stepwise import NAME

    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key, None) or ()):
            if cfg.process_reward_model and entry.type != NAME:
                raise ConfigError(f"config key '{list_key}.{index}.type': {entry.type!r} with process_reward_model: "
                                  f"true; accepted: {NAME} (prompt, completions, labels per step)")
            if not cfg.process_reward_model and entry.type == NAME:
                raise ConfigError(f"config key '{list_key}.{index}.type': {NAME} rows train a process reward model; "
                                  f"set process_reward_model: true, or use another type")
    if not cfg.process_reward_model:
        return
    if cfg.rl is not None:
        raise ConfigError(f"process_reward_model: true and rl: {cfg.rl} are two different trainings; keep one")
    if cfg.reward_model:
        raise ConfigError("process_reward_model: true and reward_model: true are two different trainings (a label "
                          "per step, or a scalar per response in pairs); keep one")
    from plait_preference.config import PreferenceKeys

    # the preference methods' keys (rl_beta, dpo_*, precompute_ref_log_probs, ...) would change nothing here
    given = [key for key in PreferenceKeys.model_fields if key not in ("process_reward_model", "num_labels")
             and getattr(cfg, key, None) is not None and cfg.source_of(key) != "default"]
    if given:
        raise ConfigError(f"{', '.join(given)} set with process_reward_model: true, which does not use them; "
                          f"remove them")
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise ConfigError(f"config key 'num_labels': {cfg.num_labels} is not accepted with process_reward_model: "
                          f"true; accepted: 2 or more classes per step (default 2; 1 is reward_model's scalar)")
    model_type = getattr(cfg, "model_type", None)
    if model_type and model_type != MODEL_TYPE:
        raise ConfigError(f"config key 'model_type': {model_type!r} is not accepted with process_reward_model: true; "
                          f"accepted: {MODEL_TYPE} (or leave it unset)")
    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(cfg, key, None):
            raise ConfigError(f"config key {key!r}: a process reward model on a quantized base is not supported; "
                              f"remove {key} (LoRA on the full-precision base works)")
    if (getattr(cfg, "context_parallel_size", None) or 1) > 1:
        raise ConfigError(f"process_reward_model: true with context_parallel_size: {cfg.context_parallel_size} is "
                          f"not supported; use fsdp or tensor_parallel_size")


def load_process_reward_model(cfg, tokenizer):
    """The token-classification model (``num_labels`` classes) on ``base_model``,
    dropout off, its pad id set for use outside Plait."""
    import torch
    from transformers import AutoModelForTokenClassification

    from plait.model.loading import check_model_sources, fit_to_tokenizer, pretrained_kwargs

    check_model_sources(cfg, ("base_model",))
    model = AutoModelForTokenClassification.from_pretrained(cfg.base_model, num_labels=num_labels(cfg),
                                                            **pretrained_kwargs(cfg))
    fit_to_tokenizer(cfg, model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    # gradient checkpointing is switched on by core's model pipeline (setup_model), right after this
    return model


def check_head_trains(model) -> None:
    """The head starts random: a run that freezes it (an adapter without it in
    ``lora_modules_to_save``) would learn nothing useful; refuse it."""
    head_params = [p for name, p in model.named_parameters() if HEAD in name.split(".")]
    if head_params and not any(p.requires_grad for p in head_params):
        raise ConfigError(f"process_reward_model: true: the classification head '{HEAD}' is frozen; add "
                          f"lora_modules_to_save: [{HEAD}]")


class ProcessRewardObjective:
    """Cross-entropy of the head over the labelled tokens (see the module docstring)."""

    unit = "labelled_steps"
    perplexity = False

    def __init__(self, model):
        check_head_trains(model)

    def count(self, batch) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, run, batch, *, training: bool = False):
        import torch
        import torch.nn.functional as F

        from plait.data.batching import move_to_device as move
        from plait_preference.collate import to_device

        # the labelled positions, found in the host batch: an index, not a boolean mask on the device
        # (the device would have to count it before the host goes on)
        labelled = (batch["labels"] != -100).reshape(-1).nonzero()[:, 0]
        n = int(labelled.numel())
        labelled = move(labelled, run.device)
        batch = to_device(batch, run.device)
        # the outer model, so wrappers (peft, DDP) do their part; no labels: the loss is ours, summed
        outputs = run.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).index_select(0, labelled).float()
        targets = batch["labels"].reshape(-1).index_select(0, labelled)
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).to(torch.float32).sum()
        if training:
            for term in run.pm.hook.extra_loss(cfg=run.cfg, model=run.model, outputs=outputs, batch=batch):
                if term is not None:  # meant for the micro-batch mean: weigh by its units
                    loss_sum = loss_sum + term.to(loss_sum.dtype) * n
        return loss_sum, {"accuracy": (correct, n)}
