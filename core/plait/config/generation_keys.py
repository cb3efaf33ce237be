"""Checks of the generation-in-eval keys (``do_causal_lm_eval``,
``eval_causal_lm_metrics``, ``eval_table_size``), run when the config is
validated; the work is :mod:`plait.train.generation`."""

from __future__ import annotations

import importlib.util

from plait.errors import ConfigError, MachineFactError, did_you_mean

#: Axolotl's metric names (its SUPPORTED_METRICS) that Plait computes: all of them but comet
ACCEPTED_METRICS = ("sacrebleu", "ter", "chrf", "perplexity")
SACREBLEU_METRICS = ("sacrebleu", "ter", "chrf")


def check_metric_names(names: list[str]) -> None:
    """Every name is one Plait computes; comet is refused with its reason."""
    accepted = ", ".join(ACCEPTED_METRICS)
    for name in names:
        if name == "comet":
            raise ConfigError(f"config key 'eval_causal_lm_metrics': 'comet' scores with a neural model "
                              f"(Unbabel/wmt22-comet-da) downloaded from the Hugging Face hub during training, "
                              f"which Plait does not do; accepted: {accepted}")
        if name not in ACCEPTED_METRICS:
            raise ConfigError(f"config key 'eval_causal_lm_metrics': {name!r} is not a metric Plait computes"
                              f"{did_you_mean(name, ACCEPTED_METRICS)}; accepted: {accepted}")


#: unset eval_causal_lm_metrics: Axolotl's default list less comet
DEFAULT_METRICS = ("sacrebleu", "ter", "chrf")


def wanted(cfg) -> bool:
    """Whether evaluations generate (``do_causal_lm_eval`` or ``eval_table_size``)."""
    return bool(cfg.do_causal_lm_eval) or bool(cfg.eval_table_size)


def metric_names(cfg) -> list[str]:
    """The metrics each evaluation computes; none without ``do_causal_lm_eval``."""
    if not cfg.do_causal_lm_eval:
        return []
    return list(cfg.eval_causal_lm_metrics or DEFAULT_METRICS)


def check_generation_keys(cfg) -> None:
    """Rules spanning keys, and this machine's facts (the sacrebleu package), last."""
    if not wanted(cfg):
        if cfg.eval_max_new_tokens or cfg.eval_causal_lm_metrics:
            key = "eval_max_new_tokens" if cfg.eval_max_new_tokens else "eval_causal_lm_metrics"
            cfg.add_note(f"{key} is read by do_causal_lm_eval / eval_table_size, which are off; it changes nothing "
                         f"here")
        return
    keys = "do_causal_lm_eval" if cfg.do_causal_lm_eval else "eval_table_size"
    check_generating_at_evaluation(cfg, keys, reads="generates for rows with a prompt and trained completion tokens",
                                   from_tokens="generates from the prompt's tokens alone")
    if cfg.eval_causal_lm_metrics and not cfg.do_causal_lm_eval:
        cfg.add_note("eval_causal_lm_metrics is read by do_causal_lm_eval: true only; it changes nothing here")
    needs = [name for name in metric_names(cfg) if name in SACREBLEU_METRICS]
    if needs and importlib.util.find_spec("sacrebleu") is None:
        raise MachineFactError(f"config key 'eval_causal_lm_metrics': {', '.join(needs)} "
                               f"{'is' if len(needs) == 1 else 'are'} computed by the sacrebleu package, which is not "
                               f"installed here; pip install sacrebleu (or 'plait[eval]'), or list only perplexity")


def check_generating_at_evaluation(cfg, key: str, *, reads: str, from_tokens: str) -> None:
    """What generating at each evaluation (``key``) needs, for do_causal_lm_eval /
    eval_table_size and generate_samples alike: rows of text to continue (not
    preference pairs or scored sequences), no images, and an evaluation to run at."""
    method = getattr(cfg, "rl", None) or ("reward_model" if getattr(cfg, "reward_model", None) else None)
    if method:
        raise ConfigError(f"config key {key!r} {reads}; {method} rows are pairs or scored sequences; remove {key}")
    if getattr(cfg, "processor_type", None):
        raise ConfigError(f"config key {key!r} {from_tokens}, and processor_type trains on images too, which "
                          f"generation here does not pass; remove {key}")
    if not (cfg.val_set_size > 0 or cfg.test_datasets) or cfg.eval_strategy == "no":
        # Axolotl generates in its evaluation callback too: no evaluation, no generation
        cfg.add_note(f"{key} generates at each evaluation, and this config does not evaluate (no val_set_size or "
                     f"test_datasets, or eval_strategy: no); it changes nothing here")


#: generate_samples' settings (a value other than the schema's default, Axolotl's, is a choice)
SAMPLE_KEYS = ("num_generation_samples", "generation_max_new_tokens", "generation_temperature", "generation_top_p",
               "generation_top_k", "generation_prompt_ratio", "generation_do_sample")


def check_sample_keys(cfg) -> None:
    """``generate_samples``: what it needs, and its settings set while it is off."""
    if not cfg.generate_samples:
        fields = type(cfg).model_fields
        changed = [key for key in SAMPLE_KEYS if getattr(cfg, key) != fields[key].default]
        if changed:
            cfg.add_note(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} read by generate_samples, "
                         f"which is off; {'it changes' if len(changed) == 1 else 'they change'} nothing here")
        return
    check_generating_at_evaluation(cfg, "generate_samples", reads="continues a row's own tokens",
                                   from_tokens="continues a row's tokens alone")
