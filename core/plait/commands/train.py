"""`plait train CONFIG [key=value ...]`: fine-tune as the config says."""

from __future__ import annotations

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args, pm) -> int:
    cfg, pm = load_run_config(args, pm)
    from plait.config.ray_keys import in_ray_worker

    if cfg.use_ray and not in_ray_worker():
        from plait.train.ray_launch import train_with_ray

        train_with_ray(args, cfg, ray_worker)  # each worker runs train() below as one process of the run
        return 0
    from plait.train.batch_size_search import train_finding_batch_size

    train_finding_batch_size(cfg, pm)
    return 0


def ray_worker(worker_args: dict) -> None:
    """One Ray Train worker (``use_ray``): Plait's training entry as one process
    of the run (Ray has set the distributed environment and process group)."""
    import argparse

    from plait.train.loop import train
    from plait.train.ray_launch import become_worker

    become_worker(worker_args)
    args = argparse.Namespace(config=worker_args["config"], overrides=worker_args["overrides"],
                              allow_unsupported=worker_args["allow_unsupported"],
                              extra_plugins=worker_args["extra_plugins"])
    cfg, pm = load_run_config(args)
    train(cfg, pm)
