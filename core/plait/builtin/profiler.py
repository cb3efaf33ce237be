"""Axolotl's ``profiler_steps``: a torch profiler trace of a few optimizer steps.

Steps ``profiler_steps_start + 1`` to ``profiler_steps_start + profiler_steps``
(Axolotl counts from 0: ``profiler_steps_start: 0, profiler_steps: 5`` is the
first five steps) run under ``torch.profiler`` (CPU and, on a GPU, CUDA
activity, shapes, memory); the Chrome trace is written to
``output_dir/profiler_trace.json`` (open it in Perfetto or chrome://tracing).
On a GPU the CUDA allocator's history over the same steps goes to
``output_dir/snapshot.pickle`` (https://pytorch.org/memory_viz), as in
Axolotl. The main rank profiles; the window is kept by a forward pre-hook and
an optimizer step post-hook, so it is exact whichever way the loop reads its
steps (an evaluation that runs just before the first profiled step is in it).
"""

from __future__ import annotations

from pathlib import Path

from plait.hookspecs import hookimpl

TRACE_FILE = "profiler_trace.json"
SNAPSHOT_FILE = "snapshot.pickle"


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class StepProfiler:
    """Starts before step ``first`` and stops after step ``last`` (1-based optimizer steps)."""

    def __init__(self, output_dir: Path, first: int, last: int, step_of, cuda: bool):
        self.output_dir, self.first, self.last, self.step_of, self.cuda = output_dir, first, last, step_of, cuda
        self.profiler = None
        self.done = False

    def start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                               with_stack=True)
        self.profiler.__enter__()

    def stop(self) -> None:
        import torch

        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.output_dir / TRACE_FILE))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.output_dir / SNAPSHOT_FILE))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler, self.done = None, True

    def before_forward(self, module, args) -> None:
        if self.profiler is None and not self.done and self.step_of() + 1 >= self.first:
            self.start()

    def after_step(self, optimizer, args, kwargs) -> None:
        if self.profiler is not None and self.step_of() + 1 >= self.last:  # the loop counts the step after this
            self.stop()

    def remove(self) -> None:
        """The run ended (or stopped) inside the window: the trace so far is written."""
        for handle in self.handles:
            handle.remove()
        self.stop()


@hookimpl
def install_step_hooks(cfg, model, optimizer, step_of):
    if not cfg.profiler_steps or not _is_main():
        return None
    first = cfg.profiler_steps_start + 1
    cuda = any(p.is_cuda for p in model.parameters())
    profiler = StepProfiler(Path(cfg.output_dir), first, first + cfg.profiler_steps - 1, step_of, cuda)
    # from the first forward of step `first` (a resumed run counts from its checkpoint's step) to the end of the
    # optimizer step of step `last`
    profiler.handles = [model.register_forward_pre_hook(profiler.before_forward),
                        optimizer.register_step_post_hook(profiler.after_step)]
    return [profiler]


@hookimpl
def validate_config(cfg):
    if cfg.profiler_steps_start and not cfg.profiler_steps:
        cfg.add_note("profiler_steps_start is read with profiler_steps, which is unset; it changes nothing here")
