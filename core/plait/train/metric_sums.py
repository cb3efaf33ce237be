"""An objective's metrics summed over a step's micro-batches (or an evaluation).

The objective (:func:`plait.hookspecs.build_objective`) returns each metric of
a micro-batch as ``(sum, n)``: ``rewards/chosen`` summed over ``n`` chosen
responses. Sums stay on the device until the step's end, then one all-reduce
over the ranks gives ``sum / n`` per metric.
"""

from __future__ import annotations


class MetricSums:
    """``{name: (sum, n)}`` accumulated over micro-batches."""

    def __init__(self, run):
        self.run = run
        self.sums: dict = {}

    def add(self, metrics: dict) -> None:
        for name, (total, n) in metrics.items():
            old_total, old_n = self.sums.get(name, (0.0, 0))
            self.sums[name] = (old_total + _detached(total), old_n + n)

    def means(self, prefix: str = "") -> dict:
        """``{prefix + name: sum / n}`` over all ranks (a ratio: ranks holding
        the same items, tensor-parallel ones, leave it unchanged)."""
        from plait.train.distributed import all_reduce_sum

        if not self.sums:
            return {}
        names = list(self.sums)
        values = all_reduce_sum([float(v) for name in names for v in self.sums[name]], self.run.device)
        return {prefix + name: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else 0.0
                for i, name in enumerate(names)}


def _detached(value):
    return value.detach().double() if hasattr(value, "detach") else float(value)
