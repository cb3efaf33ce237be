"""Host cost of a training step, measured on the CPU: ops per step and wall ms.

On a GPU each aten op that does work is a kernel launch, and the host's time
launching them (Python, dispatch) is time the device may wait: a profile of
the 1b DPO bench showed the H100 busy 89% of Plait's step. This script runs
Plait's real training loop (``plait.train.loop.train``: plait-preference,
plait-peft's LoRA, plait-kernels ``auto``, non-reentrant gradient
checkpointing, torch's fused AdamW as on a GPU) on a small Llama whose compute is negligible on the CPU, so a
step's wall time is mostly host time, and counts per step:

* **launch ops**: aten ops that do work (leaves of the op tree, less views,
  allocations and no-op ``to``/``contiguous``), on the loop's thread;
* **all aten ops** on that thread (dispatch cost: every op, views included);
* **collate ops**: those of the loop's prefetch thread (host work only);
* **host reads**: ``aten::_local_scalar_dense`` (``.item()``, ``bool()`` of a
  tensor: a device sync each on a GPU; on the CPU also reads of host tensors,
  which are no sync there; ``.tolist()`` is not counted), less those of the
  CPU's fused AdamW;
* **wall ms** per step without the profiler (median of ``--steps``);
* **idle window**: from the end of the loop's read of a step's values (its
  one sync on a GPU; ``MetricSums.read_with``/``read``, marked for the profiler
  here) that comes after the step's update, to the next step's first forward
  op: on a GPU the device has nothing queued then. A step read during the next
  one (``defer_step_read``) has no read there, and the script counts those steps;
* **after the update**: from the end of the update (fused AdamW) to the next
  forward, the host's work between steps, read or not (which the device
  overlaps with its queue when no read waits in it).

Cases: ``dpo`` (LoRA, reference = adapter off), ``sft`` (the chosen
conversations as chat rows, the same LoRA). ``--top N`` prints the N most
frequent launch ops; ``--python N`` the N Python functions with the most self
time (cProfile over the timed steps).

    .venv/bin/python bench/preference_host_cpu.py                 # dpo and sft, 4 layers
    .venv/bin/python bench/preference_host_cpu.py --cases dpo --top 30 --python 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from plait.launches import NO_KERNEL_OPS

#: ops that launch nothing on a GPU: views, metadata, allocation (plait.launches); ``_local_scalar_dense`` is
#: not among them here, unlike in plait-kernels' census: on a GPU it is a copy to the host and a sync, host
#: time this script counts (as a launch, and again as a host read)
NO_LAUNCH = {"aten::" + name for name in NO_KERNEL_OPS}
#: a read of a tensor's value on the host (``.item()``, ``bool()``, ``int()``, ``if tensor``): one device sync each
READ_OP = "aten::_local_scalar_dense"
SYNC_OPS = {READ_OP}
#: the profiler's name for the loop's read of a step's values (``.tolist()``, which no aten op shows)
STEP_READ = "plait.step_read"


def mark_step_reads():
    """Mark the loop's reads of a step's values (:class:`MetricSums`' read_with
    and read) for the profiler; returns a function that takes the marks off."""
    import torch

    from plait.train.metric_sums import MetricSums

    originals = {name: getattr(MetricSums, name) for name in ("read_with", "read")}

    def marked(method):
        def read(self, *args, **kwargs):
            with torch.profiler.record_function(STEP_READ):
                return method(self, *args, **kwargs)
        return read

    for name, method in originals.items():
        setattr(MetricSums, name, marked(method))
    return lambda: [setattr(MetricSums, name, method) for name, method in originals.items()]


def prepare(work: Path, args) -> tuple[Path, Path, Path]:
    from plait.testing import make_tiny_model
    from plait_preference.testing import pair_rows

    model = make_tiny_model(work / "model", num_hidden_layers=args.layers, hidden_size=args.hidden,
                            intermediate_size=args.hidden * 2, max_position_embeddings=1024)
    rows = pair_rows(args.pairs * (args.warmup + args.steps + 2), seed=0)
    pairs = work / "pairs.json"
    pairs.write_text(json.dumps(rows))
    chats = work / "chats.json"
    chats.write_text(json.dumps([{"messages": [{"role": "user", "content": r["conversations"][0]["value"]},
                                               {"role": "assistant", "content": r["chosen"]["value"]}]}
                                 for r in rows]))
    return model, pairs, chats


def run_case(case: str, work: Path, model: Path, pairs: Path, chats: Path, args) -> dict:
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    from plait.config import build_config
    from plait.hookspecs import hookimpl
    from plait.plugins import build_plugin_manager
    from plait.train.loop import train

    torch.manual_seed(0)
    total = args.warmup + args.steps + args.profiled
    raw = {"base_model": str(model), "output_dir": str(work / f"out_{case}"),
           "dataset_prepared_path": str(work / f"prep_{case}"), "sequence_len": 256, "val_set_size": 0,
           "micro_batch_size": args.pairs, "gradient_accumulation_steps": 1, "max_steps": total + 1,
           "learning_rate": 1e-5, "lr_scheduler": "constant", "optimizer": "adamw_torch_fused", "max_grad_norm": 1.0,
           "gradient_checkpointing": True, "plait_kernels": "auto", "logging_steps": 1, "seed": 0,
           "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True,
           "shuffle_merged_datasets": False, "save_steps": 10_000}
    if case == "dpo":
        raw.update({"rl": "dpo", "datasets": [{"path": str(pairs), "type": "chat_template.default",
                                               "field_messages": "conversations"}]})
    else:
        raw["datasets"] = [{"path": str(chats), "type": "chat_template"}]
    raw.update(json.loads(args.keys or "{}"))
    times: list[float] = []
    state: dict = {}

    class Measure:
        @hookimpl(tryfirst=True)
        def build_optimizer(self, cfg, params):
            # fused AdamW, as on the GPU (core asks for it on CUDA only): one op per step instead of a
            # dozen per parameter, and the loop's one-sync step (loop.checks_loss_on_device)
            return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)

        @hookimpl
        def on_step_end(self, run, metrics):
            now = time.perf_counter()
            step = run.step
            if args.warmup < step <= args.warmup + args.steps:
                times.append(now - state["last"])
            if step == args.warmup:
                state["cprofile"] = cProfile.Profile()
                state["cprofile"].enable()
            if step == args.warmup + args.steps:
                state["cprofile"].disable()
                state["profiler"] = profile(activities=[ProfilerActivity.CPU], with_stack=bool(args.where or args.sources))
                state["profiler"].__enter__()
            # what the step computed (not how fast): before and after a change these must be equal
            state.setdefault("metrics", []).append({k: v for k, v in metrics.items()
                                                    if k not in ("tokens_per_s", "epoch")})
            state.setdefault("losses", []).append(metrics["loss"])
            if step == total:
                state["profiler"].__exit__(None, None, None)
                raise _Finished
            state["last"] = time.perf_counter()

    pm = build_plugin_manager(config_plugins=["plait_formats.plugin", "plait_models", "plait_peft.plugin",
                                              "plait_kernels.plugin", "plait_preference.plugin"],
                              entry_points=False, extra=[Measure()])
    cfg = build_config(pm, raw, {k: "file" for k in raw})
    unmark = mark_step_reads()
    try:
        train(cfg, pm)
    except _Finished:
        pass
    finally:
        unmark()
    result = {"case": case, "wall_ms": statistics.median(times) * 1e3, "losses": state["losses"],
              "metrics": state["metrics"]}
    result.update(count_ops(state["profiler"], args.profiled, args.top))
    if args.where or args.sources:
        result["sources"] = by_source(state["profiler"], args.profiled)
    if args.where:
        result["where"] = where(state["profiler"], args.where.split(","), args.profiled)
    if args.python:
        stats = pstats.Stats(state["cprofile"])
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.python]
        result["python_self_ms"] = [(f"{Path(f).name}:{line}:{name}", round(tt * 1e3 / args.steps, 3), cc // args.steps)
                                    for (f, line, name), (cc, nc, tt, ct, callers) in rows]
    return result


class _Finished(Exception):
    pass


def count_ops(prof, steps: int, top: int) -> dict:
    from collections import Counter

    events = [e for e in prof.events() if e.name.startswith("aten::")]
    by_thread = Counter(e.thread for e in events)
    main = by_thread.most_common(1)[0][0]
    launches: Counter = Counter()
    syncs = 0
    for e in events:
        if e.thread != main:
            continue
        # torch's fused AdamW on the CPU reads its step counts with .item(); its CUDA kernel does not
        if e.name == READ_OP and not (e.cpu_parent and e.cpu_parent.cpu_parent
                                      and e.cpu_parent.cpu_parent.name.startswith("aten::_fused_adam")):
            syncs += 1
        leaf = not any(c.name.startswith("aten::") for c in e.cpu_children)
        if leaf and e.name not in NO_LAUNCH:
            launches[e.name] += 1
    # the window the device sits idle in: from the loop's read of the step's values after its update (the
    # step's one sync) to the first op of the next step's forward (its embedding lookup); and the host's time
    # from the update to that forward, with or without a read in it
    gaps, after_update, unread, update_end, read_end = [], [], 0, None, None
    marked = [e for e in prof.events() if e.name == STEP_READ]
    for e in sorted([e for e in events if e.thread == main and (e.name == "aten::embedding"
                                                                or e.name.startswith("aten::_fused_adam"))] + marked,
                    key=lambda e: e.time_range.start):
        if e.name.startswith("aten::_fused_adam"):
            update_end, read_end = e.time_range.end, None
        elif e.name == STEP_READ and update_end is not None:
            read_end = e.time_range.end
        elif e.name == "aten::embedding" and update_end is not None:
            after_update.append(e.time_range.start - update_end)
            if read_end is not None:
                gaps.append(e.time_range.start - read_end)
            else:
                unread += 1
            update_end = read_end = None
    out = {"idle_window_ms": sum(gaps) / len(gaps) / 1e3 if gaps else None, "steps_without_read": unread,
           "after_update_ms": sum(after_update) / len(after_update) / 1e3 if after_update else None,
           "launch_ops": sum(launches.values()) / steps, "aten_ops": by_thread[main] / steps,
           "collate_ops": sum(n for t, n in by_thread.items() if t != main) / steps, "syncs": syncs / steps}
    if top:
        out["top_launch_ops"] = [(name, n / steps) for name, n in launches.most_common(top)]
    return out


def where(prof, names: list[str], steps: int) -> list:
    """For ops named ``names``: how many per step come from each chain of parents
    (ops, then the Python functions of ``with_stack``)."""
    from collections import Counter

    places: Counter = Counter()
    for e in prof.events():
        if e.name in names or (names == ["plait"] and _source(e) in ("plait core", "plait-preference")
                                and not _no_launch(e)):
            parents, parent = [], e.cpu_parent
            while parent is not None and len(parents) < 4:
                if not parent.name.startswith("torch/nn/modules/module.py"):
                    parents.append(parent.name)
                parent = parent.cpu_parent
            places[f"{e.name} <- {' < '.join(parents)}"] += 1
    return [(place, n / steps) for place, n in places.most_common(40)]


#: where an op comes from: the innermost Python frame whose file holds one of these
SOURCES = (("plait-preference", "plait_preference/"), ("plait-kernels", "plait_kernels/"), ("plait core", "core/plait/"),
           ("peft", "peft/"), ("transformers", "transformers/"), ("optimizer", "torch/optim/"),
           ("checkpoint", "torch/utils/checkpoint"))


def _no_launch(e) -> bool:
    return not e.name.startswith("aten::") or e.name in NO_LAUNCH \
        or any(c.name.startswith("aten::") for c in e.cpu_children)


def _source(e) -> str:
    source, parent = None, e.cpu_parent
    while parent is not None and source is None:
        if "Backward" in parent.name or parent.name.startswith("autograd::engine"):
            source = "backward"
        source = source or next((name for name, part in SOURCES if part in parent.name), None)
        parent = parent.cpu_parent
    return source or "other"


def by_source(prof, steps: int) -> dict:
    """Launch ops per step by where they come from: the innermost Python
    function (the profiler's ``with_stack`` events, parents of the op) in one of
    :data:`SOURCES`; ops the backward pass runs apart."""
    from collections import Counter

    counts: Counter = Counter()
    for e in prof.events():
        if not _no_launch(e):
            counts[_source(e)] += 1
    return {name: n / steps for name, n in counts.most_common()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="dpo,sft")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4, help="pairs (dpo) or rows (sft) per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (wall ms: their median)")
    parser.add_argument("--profiled", type=int, default=3, help="steps under torch.profiler (op counts: per step)")
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--python", type=int, default=0)
    parser.add_argument("--where", default="", help="comma-separated op names: where they come from (Python)")
    parser.add_argument("--sources", action="store_true", help="launch ops by where they come from")
    parser.add_argument("--keys", default=None, help="JSON of extra Plait config keys")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--metrics-out", default=None, help="write every step's metrics (JSON) here, to compare runs")
    args = parser.parse_args()
    import torch

    # one thread: the ops are tiny, and the machine's other processes make thread pools wait on each other
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="plait_host_") as tmp:
        work = Path(tmp)
        model, pairs, chats = prepare(work, args)
        results = [run_case(case, work, model, pairs, chats, args) for case in args.cases.split(",")]
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps({r["case"]: r["metrics"] for r in results}, indent=1))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(f"{r['case']}: {r['launch_ops']:.0f} launch ops/step, {r['aten_ops']:.0f} aten ops, "
              f"{r['syncs']:.0f} host reads, {r['collate_ops']:.0f} collate-thread ops, {r['wall_ms']:.1f} ms/step, "
              + (f"{r['idle_window_ms']:.2f} ms from the step's read to the next forward"
                 if r["idle_window_ms"] is not None else "no read between the update and the next forward")
              + (f" ({r['steps_without_read']} steps without one)" if r["steps_without_read"] else "")
              + f", {r['after_update_ms'] or 0:.2f} ms from the update to the next forward; "
              f"losses {[round(x, 6) for x in r['losses']]}")
        for name, n in r.get("top_launch_ops", []):
            print(f"    {n:7.1f}  {name}")
        if "sources" in r:
            print("    by source: " + ", ".join(f"{name} {n:.0f}" for name, n in r["sources"].items()))
        for place, n in r.get("where", []):
            print(f"    {n:7.1f}  {place}")
        for where, ms, calls in r.get("python_self_ms", []):
            print(f"    {ms:8.3f} ms  {calls:6d}x  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
