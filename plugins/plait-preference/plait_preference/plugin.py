"""The hookimpls of plait-preference. Each answers only when the config asks
for preference tuning (``rl:``), so an SFT run never meets this plugin."""

from __future__ import annotations

from plait.hookspecs import hookimpl


def _active(cfg) -> bool:
    return getattr(cfg, "rl", None) is not None or bool(getattr(cfg, "reward_model", None))


@hookimpl
def config_schema():
    from plait_preference.config import PreferenceKeys

    return PreferenceKeys


@hookimpl
def validate_config(cfg):
    from plait_preference import process_reward
    from plait_preference.config import validate

    process_reward.validate(cfg)
    validate(cfg)
    from plait.errors import ConfigError
    from plait_preference.formats import TYPES

    if not _active(cfg):
        for list_key in ("datasets", "test_datasets"):
            for index, entry in enumerate(getattr(cfg, list_key, None) or ()):
                if entry.type in TYPES:
                    raise ConfigError(f"config key '{list_key}.{index}.type': {entry.type!r} is a preference "
                                      f"dataset type (chosen/rejected pairs); set rl: dpo (or ipo, orpo, kto, "
                                      f"simpo) or reward_model: true, or use type: chat_template for SFT")
        return

    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key, None) or ()):
            if entry.type == "bradley_terry.chat_template" and not cfg.reward_model:
                raise ConfigError(f"config key '{list_key}.{index}.type': bradley_terry.chat_template is the reward "
                                  f"model layout; set reward_model: true, or use chat_template.default for rl:")
            if entry.type not in TYPES:
                what = f"rl: {cfg.rl}" if cfg.rl else "reward_model: true"
                raise ConfigError(f"config key '{list_key}.{index}.type': {entry.type!r} is not a preference dataset "
                                  f"type ({what}); accepted: {', '.join(TYPES)}")


@hookimpl
def dataset_formats():
    from plait_preference.formats import registered_formats
    from plait_preference.stepwise import stepwise_format

    return registered_formats() + [stepwise_format()]


@hookimpl(specname="collate", tryfirst=True)
def collate_sequences_as_rows(cfg, rows, tokenizer):
    # one row per sequence unless packing or plait_varlen needs pair rows as bins (core's collate then)
    if not _active(cfg):
        return None
    from plait_preference.collate import collate_as_rows, rows_per_sequence

    if not rows_per_sequence(cfg):
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate_as_rows(cfg, rows, pad_id)


@hookimpl(wrapper=True)
def collate(cfg, rows, tokenizer):
    # around whichever collate answers (core's lays pair rows out as isolated segments):
    # add which positions belong to which sequence, unless the layout above already did,
    # and what the objective scores
    batch = yield
    if not _active(cfg) or batch is None:
        return batch
    from plait_preference.collate import add_scoring_plan, add_segments

    if "segment_index" not in batch:
        batch = add_segments(batch, rows)
    return add_scoring_plan(cfg, batch)


@hookimpl(tryfirst=True)
def load_model(cfg, tokenizer):
    # before plait-bnb's, which answers every load_in_4bit/8bit run with a causal LM
    if getattr(cfg, "process_reward_model", None):  # validate_config refused a quantized base
        from plait_preference.process_reward import load_process_reward_model

        return load_process_reward_model(cfg, tokenizer)
    # a reward model is the backbone with a scalar head, quantized through plait-bnb's config when asked
    if not getattr(cfg, "reward_model", None):
        return None
    from plait_preference.reward import load_reward_model

    return load_reward_model(cfg, tokenizer)


@hookimpl(wrapper=True)
def wrap_parallel(cfg, model, mesh):
    # full fine-tuning with a frozen reference: copy the model's structure (on meta, no memory) before it
    # is sharded, since FSDP2 cannot copy a sharded one; the reference is sharded like it at on_train_start
    from plait_preference.objective import needs_frozen_copy

    # (not for the meta copy itself, which on_train_start sends through this hook to be sharded)
    wanted = _active(cfg) and needs_frozen_copy(cfg) and not next(model.parameters()).is_meta
    skeleton = None
    if wanted:
        from plait_preference.sharded_reference import meta_copy

        skeleton = meta_copy(model)
    wrapped = yield
    if skeleton is not None and wrapped is not None:
        from plait_preference.sharded_reference import remember

        remember(skeleton, wrapped)
    return wrapped


@hookimpl
def build_objective(cfg, model, loss_fn):
    if getattr(cfg, "process_reward_model", None):
        from plait_preference.process_reward import ProcessRewardObjective

        return ProcessRewardObjective(model)
    if not _active(cfg):
        return None
    if cfg.reward_model:
        from plait_preference.reward import RewardObjective

        return RewardObjective(cfg)
    from plait_preference.objective import PreferenceObjective

    return PreferenceObjective(cfg, model)


@hookimpl
def on_train_start(run):
    from plait_preference.sharded_reference import PendingReference

    # a frozen reference under FSDP2: shard the copy on the run's mesh now (run.pm asks wrap_parallel)
    if isinstance(getattr(run.objective, "reference", None), PendingReference):
        run.objective.reference = run.objective.reference.build(run)
    # precompute_ref_log_probs: score the rows with the starting model before the first step
    if getattr(run.objective, "reference", None) == "precomputed":
        from plait_preference.precompute import attach

        attach(run)
