"""The peak memory of a DPO training step and what is live at it, on fake tensors.

:class:`LiveBytes` is a dispatch mode that sees every tensor an op returns,
counts each storage once from its first appearance to its release (a weak
reference to the storage object, which torch keeps as long as the storage
lives), and records why it was made: the phase of the step, the module whose
forward ran, the innermost Plait source line and the op.

:func:`fake_dpo_peak` runs one DPO step of a Llama (Plait's model set-up,
plait-preference's objective, backward, clipping, AdamW) on fake tensors, so a
GPU shape runs on a CPU in seconds, and returns the peak and its composition.
``bench/preference_peak_cpu.py`` prints it; a test checks cuts with it;
``bench/train_peak_cpu.py`` uses the same tracker for the SFT step of any bench shape
(the MoE step, an 8B LoRA at long context).
"""

from __future__ import annotations

import contextlib
import re
import sys
import weakref
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plait.launches import triton_runs_replaced

#: frames of these packages name where a tensor was made (the innermost one, with its caller when a helper: see label)
_OWN_CODE = re.compile(r"/(plait|plait_[a-z_]+)/([a-z_/]+)\.py$")


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages over time; see the module docstring.

    ``known(tensor, label)`` counts a storage made before the mode was entered
    (weights, optimizer state) under ``label``. ``phase`` is set by the caller;
    ``host`` storages (``mark_host``) are not counted (offloaded tensors).
    """

    def __init__(self):
        super().__init__()
        self.phase = "start"
        self.modules: list[str] = []
        self.events: list[tuple[int, int]] = []  # (storage id, +bytes / -bytes) in time order
        self.labels: dict[int, str] = {}
        self.sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._next = 0
        self._host: set[int] = set()
        self.host_bytes = self.host_peak = 0  # offloaded bytes live now and at most (host memory, not counted)

    # ------------------------------------------------------------ counting

    def _count(self, tensor, label: str) -> None:
        # one entry per storage (views share theirs); torch keeps a storage's Python object as long as the
        # storage lives, so an id set on it marks it, and a weak reference to it tells when it is released
        storage = tensor.untyped_storage()
        if getattr(storage, "_live_bytes_id", None) in self._refs:
            return
        sid = storage._live_bytes_id = self._next
        self._next += 1
        nbytes = storage.nbytes()
        self._refs[sid] = weakref.ref(storage, lambda _, sid=sid: self._free(sid))
        self.labels[sid], self.sizes[sid] = label, nbytes
        self.events.append((sid, nbytes))

    def _free(self, sid: int) -> None:
        self._refs.pop(sid, None)
        if sid in self._host:
            self._host.discard(sid)
            self.host_bytes -= self.sizes[sid]
            return
        self.events.append((sid, -self.sizes[sid]))

    def known(self, tensor, label: str) -> None:
        self._count(tensor, label)

    def mark_host(self, tensor) -> None:
        """``tensor``'s storage is host memory from now on (it stops counting)."""
        sid = getattr(tensor.untyped_storage(), "_live_bytes_id", None)
        if sid is not None and sid not in self._host:
            self._host.add(sid)
            self.events.append((sid, -self.sizes[sid]))
            self.host_bytes += self.sizes[sid]
            self.host_peak = max(self.host_peak, self.host_bytes)

    def label(self, op: str) -> str:
        # the innermost frame of Plait's code, and when that is a helper (not a
        # module's or autograd function's forward/backward) also the one that called it:
        # "plait_kernels/lora_linear.py:scaled_mm < plait_kernels/lora_mlp.py:backward"
        places = []
        frame = sys._getframe(2)
        while frame is not None and len(places) < 2:
            found = _OWN_CODE.search(frame.f_code.co_filename)
            if found and not frame.f_code.co_filename.endswith("peak_memory.py"):
                places.append(f"{found.group(1)}/{found.group(2)}.py:{frame.f_code.co_name}")
                if frame.f_code.co_name in ("forward", "backward"):
                    break
            frame = frame.f_back
        where = " < ".join(places)
        module = self.modules[-1] if self.modules else ""
        return f"{self.phase} | {module} | {where} | {op}"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        label = None
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                label = label or self.label(func.__name__)
                self._count(tensor, label)
        return out

    # ------------------------------------------------------------ results

    def peak(self) -> tuple[int, int]:
        """``(peak bytes, index of the event that reached it)``."""
        live = peak = 0
        at = -1
        for i, (_, delta) in enumerate(self.events):
            live += delta
            if live > peak:
                peak, at = live, i
        return peak, at

    def phase_peaks(self) -> dict[str, int]:
        """The highest live bytes reached while each phase made an allocation."""
        live, peaks = 0, {}
        for sid, delta in self.events:
            live += delta
            if delta > 0:
                phase = self.labels[sid].split(" | ")[0]
                peaks[phase] = max(peaks.get(phase, 0), live)
        return peaks

    def live_at(self, index: int) -> dict[int, int]:
        """Storage id -> bytes of the storages live right after event ``index``."""
        live: dict[int, int] = {}
        for sid, delta in self.events[:index + 1]:
            if delta > 0:
                live[sid] = delta
            else:
                live.pop(sid, None)
        return live


@contextlib.contextmanager
def module_names(model, tracker: LiveBytes):
    """``tracker.modules`` follows the module forwards running (the recompute of a
    checkpointed layer runs its forward again)."""
    names = {id(m): name for name, m in model.named_modules()}

    def enter(module, args):
        tracker.modules.append(names.get(id(module), type(module).__name__))

    def leave(module, args, output):
        if tracker.modules:
            tracker.modules.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def env_set(name: str, value: str):
    import os

    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def triton_launches_skipped():
    """Triton kernels launched as no-ops, interpreted or compiled: on fake
    tensors there is nothing to compute, and a kernel only writes into tensors
    torch has allocated."""
    return triton_runs_replaced(lambda run, kernel, *args, **kwargs: None, compiled=True)


@contextlib.contextmanager
def fake_modules_movable():
    """``module.to(...)`` of fake parameters by ``.data`` assignment: torch swaps
    fake parameters instead, which fails on a fake tensor (its mode holds a
    weak reference to each). Everything here is on the CPU; dtypes change."""
    to = torch.nn.Module.to

    def moved(self, *args, **kwargs):
        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None:
                        continue
                    new = tensor.data.to(*args, **kwargs)
                    if new is not tensor.data:
                        tensor.data = new
        return self

    torch.nn.Module.to = moved
    try:
        yield
    finally:
        torch.nn.Module.to = to


def _llama(dims: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dims, max_position_embeddings=4096, use_cache=False, attn_implementation="sdpa",
                         dtype="bfloat16")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16, as the bench loads it (.to() cannot swap fake weights)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def _pairs_batch(cfg, pm, *, pairs: int, prompt: int, response: int, vocab: int):
    import random

    from plait_preference.rows import CHOSEN, REJECTED, segments_row

    class Tokenizer:  # what core's collator reads of a tokenizer
        pad_token_id = 0
        eos_token_id = 1

    rng = random.Random(0)
    ids = lambda n: [rng.randrange(4, vocab) for _ in range(n)]  # noqa: E731
    rows = []
    for _ in range(pairs):
        row = segments_row(ids(prompt), [ids(response), ids(response)], [CHOSEN, REJECTED])
        rows.append({**row, "seq_lens": row["extras"]["seq_lens"], "extras": [row["extras"]]})
    return pm.hook.collate(cfg=cfg, rows=rows, tokenizer=Tokenizer())


def fake_dpo_peak(dims: dict, setup_model, *, pairs: int, prompt: int, response: int, lora_r: int = 16,
                  lora_alpha: int = 32, keys: dict | None = None, offload: bool = False, steps: int = 2) -> dict:
    """One DPO step's peak (the last of ``steps``: AdamW's state exists then)
    of a Llama of ``dims`` on fake tensors; see the module docstring.

    ``setup_model``: core's ``plait.pipeline.setup_model``, which the caller
    passes (a bench script or a test: a plugin does not import core's pipeline),
    so the model is set up for training as a run sets it up; its
    ``load_model`` is answered here with the fake Llama.

    As on the bench's GPU: the base in bf16, LoRA parameters in float32,
    autocast to bf16 (the CPU's autocast here, CUDA's there: the matmuls run
    in bf16 in both), plait-kernels' Triton paths. Not modelled: CUDA's fused
    AdamW (here the per-parameter one; neither makes a large temporary) and
    the caching allocator's rounding. ``offload``: ``gradient_checkpointing:
    offload``, its copies counted as :func:`offload_counted` says.

    Returns ``peak_bytes``, ``peak_at`` (the label of the allocation that
    reached it), ``groups`` (``[(name, bytes)]``, largest first, summing to the
    peak), ``largest`` (``[(bytes, label)]`` of the live storages), ``phase_peaks``
    (the highest live bytes while each phase allocated) and ``tokens``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from plait.hookspecs import hookimpl
    from plait.model.batch import drop_right_padding_mask
    from plait.testing import build_run_config
    from plait_preference.objective import PreferenceObjective

    raw = {"base_model": "unused", "rl": "dpo", "rl_beta": 0.1, "adapter": "lora", "lora_r": lora_r,
           "lora_alpha": lora_alpha, "lora_dropout": 0.0, "lora_target_linear": True, "bf16": True,
           "gradient_checkpointing": True, "plait_kernels": "triton", "sequence_len": 2 * (prompt + response),
           "micro_batch_size": pairs, "learning_rate": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0,
           **(keys or {})}
    if offload:
        raw["gradient_checkpointing"] = "offload"
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    class FakeModel:
        @hookimpl(tryfirst=True)
        def load_model(self, cfg, tokenizer):
            from plait.model import forward

            model = _llama(dims)  # fake: setup_model runs under the fake mode
            # the head probe compares values, which fake tensors lack: a small real Llama's answer is this one's
            small = {**dims, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
            small.pop("head_dim", None)
            with unset_fake_temporarily():
                forward._PLANS[model] = forward.probe_head(_llama(small))
            return model

    cfg, pm = build_run_config(raw, plugins=[FakeModel()])
    host_batch = _pairs_batch(cfg, pm, pairs=pairs, prompt=prompt, response=response, vocab=dims["vocab_size"])
    tracker = LiveBytes()
    # Plait picks its Triton paths on the CPU as on CUDA when told the kernels are interpreted
    # (plait_kernels.selection); no kernel runs either way (triton_launches_skipped)
    with env_set("TRITON_INTERPRET", "1"), triton_launches_skipped(), fake_modules_movable(), fake:
        model = setup_model(cfg, pm, None, for_training=True, device=torch.device("cpu"))
        model.train()
        objective = PreferenceObjective(cfg, model)
        with unset_fake_temporarily():
            # what the objective reads on the host, read here from the real batch (a fake one has no values)
            units = objective.count(host_batch)
            if objective.drops_padding_mask:
                host_batch = drop_right_padding_mask(host_batch)
        objective.drops_padding_mask = False
        objective.count = lambda batch: units
        reference_logps = objective.reference_logps

        def reference_phase(*args, **kwargs):
            tracker.phase = "reference forward"
            try:
                return reference_logps(*args, **kwargs)
            finally:
                tracker.phase = "loss"

        objective.reference_logps = reference_phase
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.0, foreach=False)
        run = SimpleNamespace(model=model, device=torch.device("cpu"), pm=pm, cfg=cfg, dp_group=None)

        def step():
            counted_step(tracker, lambda: objective.loss(run, host_batch, training=True)[0] / units, trained,
                         optimizer)

        result = peak_of_step(tracker, model, optimizer, trained, step, steps, offload)
    return {**result, "tokens": int(host_batch["input_ids"].numel())}


def peak_of_step(tracker: LiveBytes, model, optimizer, trained: list, step, steps: int, offload: bool) -> dict:
    """Run ``step()`` ``steps - 1`` times uncounted (the optimizer's state
    then exists), count what exists (:func:`count_model_and_optimizer`), run it
    once more counted (recompute phases told apart, module names kept, the
    offloader's host copies modelled with ``offload``), and return the peak,
    what is live at it grouped and by tensor, each phase's high and the most
    bytes parked on the host."""
    from plait.model.recompute import is_recomputing

    for _ in range(steps - 1):
        step()
    count_model_and_optimizer(tracker, model, optimizer)
    relabels = grad_labels(trained, tracker)
    offloaded = offload_counted(tracker) if offload else contextlib.nullcontext()
    with tracker, module_names(model, tracker), offloaded, PhaseOfRecompute(tracker, is_recomputing):
        step()
    for handle in relabels:
        handle.remove()
    peak, at = tracker.peak()
    live = tracker.live_at(at)
    groups: dict[str, int] = {}
    for sid, nbytes in live.items():
        name = group_of(tracker.labels[sid])
        groups[name] = groups.get(name, 0) + nbytes
    largest = sorted(((nbytes, tracker.labels[sid]) for sid, nbytes in live.items()), reverse=True)
    return {"peak_bytes": peak, "peak_at": tracker.labels[tracker.events[at][0]],
            "groups": sorted(groups.items(), key=lambda item: -item[1]), "largest": largest,
            "phase_peaks": tracker.phase_peaks(), "host_peak_bytes": tracker.host_peak}


def counted_step(tracker: LiveBytes, loss_fn, trained: list, optimizer) -> None:
    """One training step in the tracker's phases: ``loss_fn()``, the forward
    under bf16 autocast, gives the loss to backpropagate; then the backward,
    clipping and the optimizer's update."""
    tracker.phase = "policy forward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn()
    tracker.phase = "backward"
    loss.backward()
    del loss
    tracker.phase = "optimizer"
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_model_and_optimizer(tracker: LiveBytes, model, optimizer) -> None:
    """Count the storages a step finds made: the model's parameters (LoRA or
    frozen) and buffers, the buffers of plait-kernels' folded experts (the
    frozen expert weights are views of them: ``lora_experts_fold``) and the
    optimizer's state."""
    for module in model.modules():
        for tensor in module.parameters(recurse=False):
            tracker.known(tensor, "LoRA parameters" if tensor.requires_grad else "weights (frozen)")
        for tensor in module.buffers(recurse=False):
            tracker.known(tensor, "buffers (rotary tables)")
        folded = getattr(module, "_plait_folded_lora", None)
        if folded is not None:
            for tensor in (folded.gate_up, folded.down, folded.down_a):
                tracker.known(tensor, "weights (frozen)")
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tracker.known(value, "AdamW state")


def grad_labels(trained, tracker: LiveBytes):
    """Gradients made in the step count as ``LoRA gradients``: a hook on each
    parameter relabels its ``.grad`` once accumulated."""
    def relabel(param):
        sid = getattr(param.grad.untyped_storage(), "_live_bytes_id", None)
        if sid is not None:
            tracker.labels[sid] = "LoRA gradients"
    return [p.register_post_accumulate_grad_hook(relabel) for p in trained]


class PhaseOfRecompute:
    """Inside the backward, ``tracker.phase`` tells a checkpoint's recompute pass
    from the backward proper (read from core's :func:`is_recomputing` at each op)."""

    def __init__(self, tracker, is_recomputing):
        self.tracker, self.is_recomputing = tracker, is_recomputing
        self.label = tracker.label

    def __enter__(self):
        tracker, is_recomputing, label = self.tracker, self.is_recomputing, self.label

        def phased(op):
            if tracker.phase.startswith("backward"):
                tracker.phase = "backward (recompute)" if is_recomputing() else "backward"
            return label(op)

        tracker.label = phased

    def __exit__(self, *exc):
        self.tracker.label = self.label


class _Parked:
    """A tensor the offloader moved to the host (``host``, not counted) and its
    device copy once fetched; ``previous``: a weak reference to the one parked
    before it, which the backward needs next (core's ``_Offloaded``)."""

    __slots__ = ("host", "device_copy", "previous", "__weakref__")

    def __init__(self, host, previous):
        self.host, self.device_copy, self.previous = host, None, previous


@contextlib.contextmanager
def offload_counted(tracker: LiveBytes):
    """``gradient_checkpointing: offload`` as the device sees it: what core's
    offloader copies to the host (a checkpointed layer's saved input, kept
    outputs) stops counting once saved, and comes back as a new device tensor
    when fetched, the layer before's with it (the prefetch). The copies' streams
    and events are left out; the tensors made and released are core's."""
    from plait.model import recompute

    def to_host(self, tensor, previous=None):
        host = tensor.detach().clone()
        tracker.mark_host(host)
        return _Parked(host, previous)

    def fetch_(self, handle):
        if isinstance(handle, _Parked) and handle.device_copy is None:
            handle.device_copy = handle.host.clone()

    def fetch(self, handle):
        if not isinstance(handle, _Parked):
            return handle
        fetch_(self, handle)
        return handle.device_copy

    def pack(self, tensor):
        self.note_input(tensor)
        handle = to_host(self, tensor, previous=self._last)
        self._last = weakref.ref(handle)
        return handle

    def unpack(self, handle):
        if not isinstance(handle, _Parked):
            return handle
        previous = handle.previous() if handle.previous is not None else None
        if previous is not None:
            fetch_(self, previous)
        return fetch(self, handle)

    patched = {"pack": pack, "unpack": unpack, "park": lambda self, tensor: to_host(self, tensor),
               "fetch": fetch, "prefetch": fetch_}
    before = {name: getattr(recompute.ActivationOffloader, name) for name in patched}
    for name, function in patched.items():
        setattr(recompute.ActivationOffloader, name, function)
    try:
        yield
    finally:
        for name, function in before.items():
            setattr(recompute.ActivationOffloader, name, function)


def group_of(label: str) -> str:
    """The composition group of a live storage's label (see :func:`fake_dpo_peak`)."""
    if " | " not in label:
        return label
    phase, module, where, op = label.split(" | ")
    layer = re.search(r"layers\.(\d+)", module)
    if phase == "reference forward":
        return f"reference forward: {where or op}"
    if phase == "policy forward":
        if layer and module.endswith(f"layers.{layer.group(1)}"):
            return "checkpointed layer inputs (each layer's output, saved by the next layer's checkpoint)"
        if layer:
            return "policy forward, inside a layer (kept outputs, ...)"
        if "logps.py" in where:
            return "log-prob head (forward): " + where.split(":")[-1]
        return f"policy forward, {module or 'outside modules'} ({where or op})"
    if phase == "backward (recompute)":
        return "recompute of a checkpointed layer (what its backward saved)"
    if phase == "backward":
        if "logps.py" in where:
            return "log-prob head (backward)"
        return f"backward: {where or op}"
    return f"{phase}: {where or op}"
