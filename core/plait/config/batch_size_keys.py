"""Where ``auto_find_batch_size`` can run (the retry itself: :mod:`plait.train.batch_size_search`)."""

from __future__ import annotations


def check_auto_find_batch_size(cfg) -> None:
    """Refuse the key where one process's retry cannot work."""
    if not getattr(cfg, "auto_find_batch_size", None):
        return
    import os

    from plait.errors import ConfigError, MachineFactError
    from plait.model.load_options import parallel_keys_set

    parallel = parallel_keys_set(cfg)
    if parallel:
        raise ConfigError(f"config key 'auto_find_batch_size' retries one process with a smaller micro-batch, and "
                          f"{', '.join(parallel)} shard the run over processes; remove auto_find_batch_size and set "
                          f"micro_batch_size")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MachineFactError("config key 'auto_find_batch_size' retries one process with a smaller micro-batch, "
                               "and this launch runs several (WORLD_SIZE); one rank's retry would leave the others "
                               "waiting. Set micro_batch_size instead")
