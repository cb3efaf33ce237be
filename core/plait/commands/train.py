"""`plait train CONFIG [key=value ...]`: fine-tune as the config says."""

from __future__ import annotations

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args, pm) -> int:
    cfg, pm = load_run_config(args, pm)
    from plait.train.ray_launch import in_ray_worker, train_with_ray

    if cfg.use_ray and not in_ray_worker():
        train_with_ray(args, cfg)  # each worker runs train() below as one process of the run
        return 0
    from plait.train.loop import train

    train(cfg, pm)
    return 0
