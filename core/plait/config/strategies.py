"""Axolotl's (transformers') ``save_strategy`` and ``eval_strategy`` on Plait's interval keys.

Plait times checkpoints and evaluations with ``save_steps`` /
``saves_per_epoch`` and ``eval_steps`` / ``evals_per_epoch``. A strategy is
another way to say the same:

================  =====================================================
``no``            none (the interval keys must be unset); for evaluation
                  not even the final one
``steps``         every ``save_steps`` / ``eval_steps``; unset, transformers'
                  defaults: 500 steps for saves, ``logging_steps`` for evals
``epoch``         ``saves_per_epoch: 1`` / ``evals_per_epoch: 1``
``best``          (saves only) a checkpoint after each evaluation whose
                  ``metric_for_best_model`` beats every earlier one
================  =====================================================

A strategy and an interval key that ask for different things are refused,
naming both (as Axolotl does). :func:`apply_strategies` runs on the raw
values before the config's fields are checked, and is idempotent (pydantic may
run it again on assignment).
"""

from __future__ import annotations

from plait.errors import ConfigError

#: transformers' default ``save_steps`` when ``save_strategy: steps`` gives none
DEFAULT_SAVE_STEPS = 500


def apply_strategies(data: dict) -> dict:
    """``data`` with the strategies translated into interval keys."""
    data = dict(data)
    old, new = data.get("evaluation_strategy"), data.get("eval_strategy")
    if old is not None and new is not None and old != new:
        raise ConfigError(f"config keys 'eval_strategy' ({new!r}) and 'evaluation_strategy' ({old!r}, its older "
                          f"name) disagree; give one of them")
    if old is not None and new is None:
        data["eval_strategy"] = new = old
    _save(data, data.get("save_strategy"))
    _eval(data, new)
    return data


def _given(data: dict, key: str) -> bool:
    """Whether ``key`` asks for something (blank and 0 ask for nothing)."""
    return data.get(key) not in (None, 0, False)


def _save(data: dict, strategy) -> None:
    steps, per_epoch = _given(data, "save_steps"), _given(data, "saves_per_epoch")
    if strategy == "no" and (steps or per_epoch):
        key = "save_steps" if steps else "saves_per_epoch"
        raise ConfigError(f"config key 'save_strategy': 'no' writes no checkpoint, and '{key}': {data[key]!r} asks "
                          f"for them; remove one of the two")
    if strategy == "steps" and not (steps or per_epoch):
        data["save_steps"] = DEFAULT_SAVE_STEPS
    if strategy in ("epoch", "best") and steps:
        raise ConfigError(f"config key 'save_strategy': {strategy!r} does not save every 'save_steps' "
                          f"({data['save_steps']!r}); set save_strategy: steps or remove save_steps")
    if strategy == "epoch":
        if per_epoch and data["saves_per_epoch"] != 1:
            raise ConfigError(f"config key 'save_strategy': 'epoch' saves once per epoch, and 'saves_per_epoch' is "
                              f"{data['saves_per_epoch']!r}; set save_strategy: steps or remove saves_per_epoch")
        data["saves_per_epoch"] = 1
    if strategy == "best":
        if per_epoch:
            raise ConfigError(f"config key 'save_strategy': 'best' saves after evaluations that improve the metric, "
                              f"and 'saves_per_epoch' is {data['saves_per_epoch']!r}; remove one of the two")
        if data.get("metric_for_best_model") is None:
            raise ConfigError("config key 'save_strategy': 'best' needs metric_for_best_model (as in Axolotl); "
                              "accepted: eval_loss")


def _eval(data: dict, strategy) -> None:
    steps, per_epoch = _given(data, "eval_steps"), _given(data, "evals_per_epoch")
    if strategy == "no" and (steps or per_epoch):
        key = "eval_steps" if steps else "evals_per_epoch"
        raise ConfigError(f"config key 'eval_strategy': 'no' never evaluates, and '{key}': {data[key]!r} asks for "
                          f"evaluations; remove one of the two")
    if strategy == "steps" and not (steps or per_epoch):
        # transformers: eval_steps defaults to logging_steps
        data["eval_steps"] = data.get("logging_steps") or 1
    if strategy == "epoch":
        if steps:
            raise ConfigError(f"config key 'eval_strategy': 'epoch' does not evaluate every 'eval_steps' "
                              f"({data['eval_steps']!r}); set eval_strategy: steps or remove eval_steps")
        if per_epoch and data["evals_per_epoch"] != 1:
            raise ConfigError(f"config key 'eval_strategy': 'epoch' evaluates once per epoch, and 'evals_per_epoch' "
                              f"is {data['evals_per_epoch']!r}; set eval_strategy: steps or remove evals_per_epoch")
        data["evals_per_epoch"] = 1
