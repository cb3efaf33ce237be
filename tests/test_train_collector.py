"""The loop keeps setup objects out of the garbage collector's full passes."""

from __future__ import annotations

import gc
import random
from types import SimpleNamespace

from plait.hookspecs import hookimpl
from plait.testing import build_run_config, make_tiny_model


class FrozenDuringSteps:
    def __init__(self):
        self.frozen_at_steps = []

    @hookimpl
    def on_step_end(self, run, metrics):
        self.frozen_at_steps.append(gc.get_freeze_count())


def test_setup_objects_are_frozen_during_steps_and_released_after(tmp_path):
    from datasets import Dataset

    from plait.train.loop import train

    rng = random.Random(0)
    rows = [{"input_ids": list(range(s, s + n)), "labels": list(range(s, s + n)), "length": n}
            for n, s in ((rng.randint(8, 16), rng.randint(10, 40)) for _ in range(16))]
    model = make_tiny_model(tmp_path / "model")
    probe = FrozenDuringSteps()
    cfg, pm = build_run_config({"base_model": str(model), "output_dir": str(tmp_path / "out"), "micro_batch_size": 2,
                                "max_steps": 3}, plugins=[probe])
    before = gc.get_freeze_count()
    train(cfg, pm, data=SimpleNamespace(train=Dataset.from_list(rows), eval=None))
    # the model, the libraries and the data (far more than a step makes) sit in the permanent generation
    assert len(probe.frozen_at_steps) == 3 and min(probe.frozen_at_steps) > 10_000
    assert gc.get_freeze_count() == before  # given back to the collector when the loop ends
