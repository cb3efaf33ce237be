"""``accelerator_config:``, the Hugging Face Trainer's accelerate settings Axolotl passes on.

Most of them decide how batches reach the processes and when gradients are
synchronised, not what trains; those are accepted and named as changing
nothing. The ones that would change the trained batches are accepted only at
the value that matches Plait.
"""

from __future__ import annotations

#: entries that change nothing in Plait, whatever their value
NO_EFFECT = {
    "dispatch_batches": "Plait's processes each read their own rows",
    "non_blocking": "Plait's host-to-device copies are its own",
    "use_seedable_sampler": "Plait's row order always comes from seed",
    "use_configured_state": "Plait sets up its own process group",
}
#: gradient_accumulation_kwargs entries that change when gradients are synchronised, not their values
NO_EFFECT_ACCUMULATION = ("sync_each_batch", "sync_with_dataloader")
#: entries accepted at one value only: Plait's behaviour
ONLY = {"split_batches": False, "even_batches": True}


def check_accelerator_config(cfg) -> None:
    """Refuse what Plait cannot honour; note the rest as changing nothing."""
    settings = getattr(cfg, "accelerator_config", None)
    if not settings:
        return
    from plait.errors import ConfigError

    problems, unused = [], []
    for key, value in settings.items():
        if key in NO_EFFECT:
            unused.append(key)
        elif key in ONLY:
            if value != ONLY[key]:
                problems.append(f"{key}: {value!r} (Plait's micro_batch_size is per process and every process "
                                f"trains full micro-batches; accepted: {ONLY[key]!r})")
            else:
                unused.append(key)
        elif key == "gradient_accumulation_kwargs" and isinstance(value, dict):
            for inner, setting in value.items():
                if inner in NO_EFFECT_ACCUMULATION:
                    unused.append(f"gradient_accumulation_kwargs.{inner}")
                elif inner == "num_steps" and setting == cfg.gradient_accumulation_steps:
                    unused.append("gradient_accumulation_kwargs.num_steps")
                elif inner == "adjust_scheduler" and setting is True:
                    unused.append("gradient_accumulation_kwargs.adjust_scheduler")
                else:
                    problems.append(f"gradient_accumulation_kwargs.{inner}: {setting!r} (Plait accumulates "
                                    f"gradient_accumulation_steps micro-batches and steps the schedule per optimizer "
                                    f"step)")
        else:
            problems.append(f"{key}: {value!r} (not a setting Plait reads)")
    if problems:
        raise ConfigError("config key 'accelerator_config' has entries Plait cannot honour: " + "; ".join(problems)
                          + f"; accepted: {', '.join([*NO_EFFECT, *ONLY, 'gradient_accumulation_kwargs'])}")
    cfg.add_note(f"accelerator_config: {', '.join(unused)} change nothing in Plait (how batches reach the processes "
                 f"and when gradients are synchronised, not what trains)")
