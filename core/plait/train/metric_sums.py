"""An objective's metrics summed over a step's micro-batches (or an evaluation).

The objective (:func:`plait.hookspecs.build_objective`) returns each metric of
a micro-batch as ``(sum, n)``: ``rewards/chosen`` summed over ``n`` chosen
responses. Sums stay on the device until the step's end, then one all-reduce
over the ranks gives ``sum / n`` per metric.

On a GPU every small op is a kernel launch and every read a host sync, so a
micro-batch's tensor sums go into one float64 vector (one stack, one add per
later micro-batch with the same metrics) and the step reads them all at once,
with its loss where the loop reads that (:meth:`MetricSums.read_with`; or
:meth:`MetricSums.read_later`, then :meth:`MetricSums.read` during the next
step). Each metric is still summed in float64, micro-batch after micro-batch,
in order.
"""

from __future__ import annotations


class MetricSums:
    """``{name: (sum, n)}`` accumulated over micro-batches."""

    def __init__(self, run):
        self.run = run
        self.sums: dict = {}  # name -> (sum, n), for what the vector below does not hold
        self._names: tuple = ()  # the vector's metrics, in order
        self._vector = None  # float64 [len(_names)] on the device
        self._counts: list = []
        self._read: list | None = None  # every sum as a float, once read_with has read them

    def add(self, metrics: dict) -> None:
        names = tuple(metrics)
        totals = [total for total, _ in metrics.values()]
        if names and (self._vector is None and not self.sums or names == self._names) and _stackable(totals):
            import torch

            stacked = torch.stack([total.detach() for total in totals]).double()
            self._vector = stacked if self._vector is None else self._vector + stacked
            self._counts = [old + n for old, (_, n) in zip(self._counts or [0] * len(names), metrics.values())]
            self._names = names
            return
        self._unstack()
        for name, (total, n) in metrics.items():
            old_total, old_n = self.sums.get(name, (0.0, 0))
            self.sums[name] = (old_total + _detached(total), old_n + n)

    def _unstack(self) -> None:
        """Move the vector's sums into :attr:`sums` (micro-batches whose metrics differ)."""
        if self._vector is not None:
            for i, name in enumerate(self._names):
                self.sums[name] = (self._vector[i], self._counts[i])
        self._names, self._vector, self._counts = (), None, []

    def _tensors(self) -> list:
        """Every tensor sum, in the order :meth:`means` reads them (the vector first)."""
        return ([self._vector] if self._vector is not None else []) + \
            [total.reshape(1) for total, _ in self.sums.values() if hasattr(total, "reshape")]

    def read_with(self, values: list) -> list[float]:
        """``values`` (0-dim float64 tensors on the device) as floats, read in
        one transfer together with every sum, which :meth:`means` then uses."""
        return self._keep(self._gathered(values).tolist(), len(values))

    def read_later(self, values: list) -> PendingRead:
        """:meth:`read_with`'s values and sums, gathered now and read by
        :meth:`read` later without waiting for work queued after this call
        (the training loop's read one step late, ``defer_step_read``)."""
        return PendingRead(self._gathered(values), len(values))

    def read(self, pending: PendingRead) -> list[float]:
        """The floats of :meth:`read_later`; :meth:`means` then uses the sums."""
        return self._keep(pending.values(), pending.count)

    def _gathered(self, values: list):
        """``values`` and every sum in one float64 tensor on the first value's device."""
        import torch

        head = torch.stack(values)
        return torch.cat([head, *(t.to(head.device) for t in self._tensors())])

    def _keep(self, flat: list, count: int) -> list[float]:
        self._read = flat[count:]
        return flat[:count]

    def means(self, prefix: str = "") -> dict:
        """``{prefix + name: sum / n}`` over all ranks (a ratio: ranks holding
        the same items, tensor-parallel ones, leave it unchanged)."""
        import torch

        from plait.train.distributed import all_reduce_sum

        pairs = list(zip(self._names, self._counts)) + [(name, n) for name, (_, n) in self.sums.items()]
        if not pairs:
            return {}
        read = self._read
        if read is None:
            tensors = self._tensors()
            # one device for one read (under a device_map the sums may sit on several)
            read = torch.cat([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else []
        read = iter(read)
        totals = [next(read) for _ in self._names] + [
            next(read) if hasattr(total, "reshape") else float(total) for total, _ in self.sums.values()]
        values = all_reduce_sum([v for total, (_, n) in zip(totals, pairs) for v in (total, float(n))], self.run.device)
        return {prefix + name: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else 0.0
                for i, (name, _) in enumerate(pairs)}


class PendingRead:
    """A float64 vector on its way to the host: on a CUDA device it is copied
    into pinned host memory behind the work queued so far, and an event marks
    the copy's end, so reading it waits for that work only, not for what the
    host queued since (a plain ``.tolist()`` would wait for the whole stream).
    Elsewhere the vector is read as is (the CPU has computed it already)."""

    def __init__(self, flat, count: int):
        import torch

        self.count = count
        self._ready = None
        if flat.device.type == "cuda":
            self._flat = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._flat.copy_(flat, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(flat.device))
        else:
            self._flat = flat

    def values(self) -> list[float]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._flat.tolist()


def _stackable(totals: list) -> bool:
    """Whether ``totals`` are 0-dim tensors on one device (one stack holds them)."""
    return all(hasattr(t, "detach") and t.dim() == 0 for t in totals) and len({t.device for t in totals}) == 1


def _detached(value):
    return value.detach().double() if hasattr(value, "detach") else float(value)
