"""Activation recomputation (gradient checkpointing), optionally offloaded.

``gradient_checkpointing: true`` recomputes each decoder layer in the backward
pass, so a layer keeps only its input alive between forward and backward.
Those inputs still add up: ``layers x tokens x hidden`` values in the compute
dtype (1 GiB for a 1B Llama at 16k tokens a step, 2 GiB for an 8B at 8k).
``gradient_checkpointing: offload`` (Axolotl's name; ``unsloth`` is its alias)
moves them to pinned host memory while the rest of the forward runs and
brings each back just before its layer is recomputed.

What makes it cheap rather than merely possible:

* the device-to-host copy runs on a side stream, so the forward does not wait
  for it; the host-to-device copy of the next layer's input is started as the
  current one is unpacked, so the backward finds it already there;
* the pinned buffers are pooled and reused step after step (pinning memory
  costs far more than copying into it).

Only the tensors that ``torch.utils.checkpoint`` keeps for the recompute pass
through the hooks below: the layer's positional inputs (the hidden states).
Everything saved *inside* the layer is discarded and recomputed by the
checkpoint as usual, and keyword inputs (rotary tables, masks) live in the
layer's closure and stay on the device.

Every non-reentrant mode also marks the recompute pass (:func:`is_recomputing`):
there the layer's output is thrown away, so a module whose output nothing in
the layer saves (a Llama MLP feeding the residual add) may skip computing it.

The offloaded mode can also park a module's *outputs* (:func:`keep_for_recompute`)
and hand them back in the recompute pass (:func:`take_kept`), so that pass
skips the module's matmuls. It pays where an output is cheap to move and costly
to rebuild: an attention projection's output is ``tokens x out`` values, rebuilt
with ``2 x tokens x in x out`` FLOPs, and the host link moves it while the
device computes. The values are the first forward's, so gradients are unchanged.
Kept outputs are the first thing host memory runs out of at long sequences (at
the 8B shape a layer's q/k/v/o outputs are 2.5x its input), so they are kept
only while the host has room for them beside every layer's input
(:attr:`ActivationOffloader.host_budget_bytes`); past that, a layer's
recompute pass redoes its matmuls as plain checkpointing does.

Pinned buffers are pinned at their exact size: torch's pinned allocator rounds
every request up to a power of two, so a 2.1 GiB layer input would hold 4 GiB.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from contextlib import contextmanager
from collections import defaultdict, deque
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("plait.recompute")

#: config values that ask for the host-offloaded variant
OFFLOAD_MODES = ("offload", "unsloth")


def enable_gradient_checkpointing(model, mode, checkpoint_kwargs: dict | None = None):
    """Turn on per-layer recomputation for a transformers model.

    ``mode`` is the config's ``gradient_checkpointing`` value (``True``,
    ``"offload"`` or ``"unsloth"``). Returns the :class:`ActivationOffloader` in
    use, or ``None`` for plain checkpointing.

    Runs reach it only through :func:`apply_gradient_checkpointing`.
    """
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    # transformers 5 renamed the method (the old name warns); keep working with both
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    offloader = ActivationOffloader() if mode in OFFLOAD_MODES else None
    if offloader is not None:
        offloader.layers = wrap_layers(model, offloader.wrap)
        if not offloader.layers:
            raise ValueError(f"gradient_checkpointing: offload found no checkpointed layer in {type(model).__name__}")
    if not kwargs["use_reentrant"]:
        # a reentrant checkpoint backpropagates through the recomputed output, so
        # only the non-reentrant one may tell modules that it is unused
        wrap_layers(model, functools.partial(mark_recompute, keeper=offloader))
    return offloader


def apply_gradient_checkpointing(cfg, pm, model):
    """Switch gradient checkpointing on as the run asks: the one place a run does.

    The mode is the ``gradient_checkpointing_mode`` hook's answer (firstresult:
    a plugin such as plait-parallel may answer for its keys; core's default is
    ``cfg.gradient_checkpointing``), applied with ``cfg.gradient_checkpointing_kwargs``.
    Called once per training run by :func:`plait.pipeline.setup_model`, right
    after ``load_model``: before the model moves, gets adapters, kernels or a
    parallel wrapper. Loaders and wrappers never switch it on themselves
    (``tests/test_recompute.py`` checks), so no second call resets what this one
    set up. Returns what :func:`enable_gradient_checkpointing` returns, or
    ``None`` when the run does not checkpoint.
    """
    mode = pm.hook.gradient_checkpointing_mode(cfg=cfg)
    if not mode:
        return None
    kwargs = dict(cfg.gradient_checkpointing_kwargs)
    if getattr(cfg, "selective_checkpointing", None):
        from plait.model.selective_checkpoint import selective_context_fn

        kwargs["context_fn"] = selective_context_fn(model, cfg.selective_checkpointing)
    return enable_gradient_checkpointing(model, mode, kwargs)


class _PassState(threading.local):
    """Where this thread is in a checkpointed layer call; the autograd engine
    runs the recompute pass on its own thread, hence one state per thread.
    Read through :func:`is_recomputing` and :func:`keeps_for_recompute`."""

    #: inside a non-reentrant checkpoint's recompute pass
    active: bool = False
    #: the offloaded layer call being run (forward or recompute), if any
    layer_call: Optional[_LayerCall] = None


_recompute_state = _PassState()


def is_recomputing() -> bool:
    """Whether this thread is inside a non-reentrant checkpoint's recompute pass.

    There only the tensors the layer's forward saves for backward are used; the
    layer's output is discarded (torch stops the pass as soon as the last saved
    tensor is rebuilt). A module may then return an uninitialised output instead
    of computing it, provided nothing later in the layer saves that output or
    anything derived from it.
    """
    return _recompute_state.active


@contextmanager
def _layer_pass(recomputing: bool, layer_call):
    before = _recompute_state.active, _recompute_state.layer_call
    _recompute_state.active, _recompute_state.layer_call = recomputing, layer_call
    try:
        yield
    finally:
        _recompute_state.active, _recompute_state.layer_call = before


def keeps_for_recompute() -> bool:
    """Whether outputs given to :func:`keep_for_recompute` now come back in this
    layer's recompute pass: inside the forward of an offloaded checkpointed layer
    that will be backpropagated (grad mode on)."""
    return not _recompute_state.active and _recompute_state.layer_call is not None


def keep_for_recompute(tensors) -> None:
    """Park ``tensors`` (one group) in host memory until this layer's recompute
    pass, where :func:`take_kept` returns them in the order they were kept.

    Call it only where :func:`keeps_for_recompute` is true, and in the
    recompute pass call :func:`take_kept` at the same place: groups are matched
    by order. The tensors are copied while the forward goes on, so they must
    not be modified in place afterwards.

    The layer's first group decides for all of its groups whether they are
    kept (:meth:`ActivationOffloader.may_keep`): a layer keeps everything or
    nothing, so the order matching holds, and one that keeps nothing simply
    recomputes (:func:`take_kept` returns ``None`` there).
    """
    layer_call = _recompute_state.layer_call
    if layer_call.keeping is None:
        layer_call.keeping = layer_call.keeper.may_keep(tensors)
    if layer_call.keeping:
        layer_call.add([layer_call.keeper.park(t) for t in tensors], _nbytes(tensors))


def take_kept() -> list | None:
    """In a recompute pass, the next group :func:`keep_for_recompute` parked in
    this layer's forward, back on its device; ``None`` when nothing is left."""
    layer_call = _recompute_state.layer_call if _recompute_state.active else None
    if layer_call is None or not layer_call.kept:
        return None
    return [layer_call.keeper.fetch(handle) for handle in layer_call.pop()]


def _nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


class _LayerCall:
    """The groups of outputs one checkpointed layer call keeps for its recompute
    pass, counted in its keeper's :attr:`~ActivationOffloader.kept_bytes` while
    they are held."""

    __slots__ = ("keeper", "kept", "sizes", "keeping", "previous", "__weakref__")

    def __init__(self, keeper, previous):
        self.keeper = keeper    # the ActivationOffloader that parks and fetches them
        self.kept: deque = deque()
        self.sizes: deque = deque()  # bytes of each group in ``kept``
        self.keeping = None     # decided at the first group (may_keep)
        self.previous = previous  # weakref to the layer call made before this one

    def add(self, group: list, nbytes: int) -> None:
        self.kept.append(group)
        self.sizes.append(nbytes)
        self.keeper.kept_bytes += nbytes

    def pop(self) -> list:
        self.keeper.kept_bytes -= self.sizes.popleft()
        return self.kept.popleft()

    def __del__(self):
        # a forward whose backward never ran (or ran only part of the layers) drops its groups here
        self.keeper.kept_bytes -= sum(self.sizes)

    def prefetch(self) -> None:
        for group in self.kept:
            for handle in group:
                self.keeper.prefetch(handle)


def mark_recompute(checkpoint_func, keeper=None):
    """A checkpointing function whose every call after the first (the forward)
    of the layer function runs under :func:`is_recomputing`.

    With a ``keeper`` (the :class:`ActivationOffloader`) the forward may also
    keep outputs for the recompute pass (:func:`keep_for_recompute`). The
    autograd engine recomputes on its own thread, hence thread-local state.
    """

    @functools.wraps(checkpoint_func)
    def marked(function, *args, **kwargs):
        calls = 0
        layer_call = keeper.new_layer_call() if keeper is not None else None

        def counted(*inner_args, **inner_kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                # a forward without grad mode has no recompute pass to keep anything for
                # (checked here: inside an autograd.Function's forward grad mode is off)
                with _layer_pass(False, layer_call if torch.is_grad_enabled() else None):
                    return function(*inner_args, **inner_kwargs)
            if layer_call is not None:
                # the backward runs layers in reverse: start the next one's copies too
                layer_call.prefetch()
                previous = layer_call.previous() if layer_call.previous is not None else None
                if previous is not None:
                    previous.prefetch()
            with _layer_pass(True, layer_call):
                return function(*inner_args, **inner_kwargs)

        return checkpoint_func(counted, *args, **kwargs)

    return marked


def wrap_layers(model, wrap) -> int:
    """Replace every checkpointed layer's checkpointing function ``f`` by ``wrap(f)``.

    transformers gives each checkpointed layer a ``_gradient_checkpointing_func``;
    replacing it on those modules is the library's own switch, not a patch of its
    code. Returns the number of layers wrapped.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        # the model itself carries the flag too, but only the layers call the function
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing and func is not None:
            module._gradient_checkpointing_func = wrap(func)
            wrapped += 1
    return wrapped


class _Offloaded:
    """One saved tensor living in a pinned host buffer, with its way back."""

    __slots__ = ("host", "copied", "device_copy", "arrived", "previous", "pool", "__weakref__")

    def __init__(self, host, copied, previous, pool):
        self.host = host            # pinned buffer holding the values
        self.copied = copied        # event: device -> host copy finished
        self.device_copy = None     # the tensor back on the device, once fetched
        self.arrived = None         # event: host -> device copy finished
        self.previous = previous    # weakref to the tensor packed before this one
        self.pool = pool

    def __del__(self):
        # the graph let go of this tensor: its buffer serves a later step, once
        # the host -> device copy (if any) has read it
        self.pool.give_back(self.host, self.arrived)


class _PinnedPool:
    """Pinned host buffers by (shape, dtype), reused across steps.

    Each buffer is ordinary host memory registered with CUDA at exactly its
    size (:func:`pinned_exact`); the pool unregisters them when it goes."""

    def __init__(self):
        self.free: dict[tuple, list] = defaultdict(list)
        self.allocated_bytes = 0
        self.registered: list[int] = []  # data pointers to unregister

    def take(self, like: torch.Tensor):
        key = (tuple(like.shape), like.dtype)
        if self.free[key]:
            return self.free[key].pop()
        self.allocated_bytes += like.numel() * like.element_size()
        host, registered = pinned_exact(like.shape, like.dtype)
        if registered:
            self.registered.append(host.data_ptr())
        return host, None

    def give_back(self, host, last_read):
        self.free[(tuple(host.shape), host.dtype)].append((host, last_read))

    def __del__(self):
        # every buffer is back in ``free`` by now (a parked tensor holds the pool);
        # their last copies must be done before the memory stops being pinned
        try:
            for buffers in self.free.values():
                for _, last_read in buffers:
                    if last_read is not None:
                        last_read.synchronize()
            for pointer in self.registered:
                torch.cuda.cudart().cudaHostUnregister(pointer)
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already; the OS unpins then
            pass


def pinned_exact(shape, dtype) -> tuple[torch.Tensor, bool]:
    """A pinned host tensor holding exactly ``shape`` x ``dtype``, and whether
    it was registered here (else it comes from torch's pinned allocator).

    torch's pinned allocator rounds each request up to the next power of two,
    which at long sequences doubles what offloading costs the host (a layer
    input of 2.1 GiB takes 4); ``cudaHostRegister`` on ordinary memory pins
    only what is asked for. Small buffers gain nothing from it and keep
    torch's cached path."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes >= EXACT_PIN_MIN_BYTES:
        host = torch.empty(shape, dtype=dtype)
        if int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)) == 0:
            return host, True
    return torch.empty(shape, dtype=dtype, pin_memory=True), False


#: buffers at least this large are pinned at their exact size (:func:`pinned_exact`)
EXACT_PIN_MIN_BYTES = 16 * 2**20


def host_budget_from_environment() -> int | None:
    """The host bytes this process may park: 80% of the memory the host has
    available when offloading starts, shared among the node's ranks
    (``LOCAL_WORLD_SIZE``, as torchrun sets it). ``None`` where the host does
    not say (no ``/proc/meminfo``), which sets no budget."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return int(0.8 * available) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class ActivationOffloader:
    """Saved-tensor hooks that park checkpointed layer inputs in host memory, and
    the parking of outputs kept for the recompute pass (:func:`keep_for_recompute`)."""

    def __init__(self, host_budget_bytes: int | None = None):
        # the device is the first CUDA tensor's: the model is moved there after it
        # is loaded, which is when checkpointing gets enabled
        self.device = None
        self.to_host = self.to_device = None
        self.pool = _PinnedPool()
        self._last = None  # weakref to the most recently packed tensor
        self._last_call = None  # weakref to the most recent layer call's kept outputs
        self._said_host = self._said_budget = False
        #: checkpointed layers routed through this offloader (set by enable_gradient_checkpointing)
        self.layers = 1
        #: the most bytes one layer call has saved through :meth:`pack` (its input)
        self.input_bytes = 0
        self._packed_in_call = 0
        #: bytes of outputs kept for recompute passes and not yet taken back
        self.kept_bytes = 0
        #: host bytes the parked tensors may reach; kept outputs stop before it.
        #: ``None``: read from the host when the first output is kept
        self.host_budget_bytes = host_budget_bytes
        self._budget_read = host_budget_bytes is not None

    def _start(self, device: torch.device) -> None:
        self.device = device
        self.to_host = torch.cuda.Stream(device)
        self.to_device = torch.cuda.Stream(device)

    def wrap(self, checkpoint_func):
        """A checkpointing function that saves its inputs through this offloader."""

        @functools.wraps(checkpoint_func)
        def offloaded(function, *args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint_func(function, *args, **kwargs)

        return offloaded

    # ---------------------------------------------------------------- hooks

    def pack(self, tensor: torch.Tensor):
        self.note_input(tensor)
        if tensor.device.type != "cuda":
            if not self._said_host:
                self._said_host = True
                log.info("gradient_checkpointing: offload on %s: the activations already live in host memory, "
                         "so nothing is moved", tensor.device)
            return tensor
        handle = self._to_host(tensor, previous=self._last)
        self._last = weakref.ref(handle)
        return handle

    def park(self, tensor: torch.Tensor):
        """A kept output (:func:`keep_for_recompute`) on its way to host memory;
        a host tensor stays where it is."""
        tensor = tensor.detach()  # the values only: the recompute builds its own graph around them
        return self._to_host(tensor, previous=None) if tensor.device.type == "cuda" else tensor

    def fetch(self, handle) -> torch.Tensor:
        """A parked tensor back on the device, ready for the compute stream."""
        if not isinstance(handle, _Offloaded):
            return handle
        self._fetch(handle)
        torch.cuda.current_stream(self.device).wait_event(handle.arrived)
        return handle.device_copy

    def prefetch(self, handle) -> None:
        """Start bringing a parked tensor back, without waiting for it."""
        if isinstance(handle, _Offloaded):
            self._fetch(handle)

    def new_layer_call(self) -> _LayerCall:
        """Where one checkpointed layer call keeps its outputs; linked to the call
        before it, which the backward reaches next."""
        self._packed_in_call = 0
        layer_call = _LayerCall(self, self._last_call)
        self._last_call = weakref.ref(layer_call)
        return layer_call

    def note_input(self, tensor: torch.Tensor) -> None:
        """Count a tensor the checkpoint saves (the layer's input) toward
        :attr:`input_bytes`, the host room every layer's input needs."""
        self._packed_in_call += tensor.nbytes
        self.input_bytes = max(self.input_bytes, self._packed_in_call)

    def may_keep(self, first_group) -> bool:
        """Whether a layer call keeps its outputs, asked at its first group.

        Yes while the outputs kept so far, twice this group (a layer's later
        groups, an attention's output projection after q/k/v, are no larger)
        and every layer's input fit :attr:`host_budget_bytes`: the inputs must
        be parked whatever happens, the kept outputs only save recomputation.
        """
        if not self._budget_read:
            self.host_budget_bytes, self._budget_read = host_budget_from_environment(), True
        if self.host_budget_bytes is None:
            return True
        needed = self.kept_bytes + 2 * _nbytes(first_group) + self.layers * self.input_bytes
        if needed <= self.host_budget_bytes:
            return True
        if not self._said_budget:
            self._said_budget = True
            log.info("gradient_checkpointing: offload keeps no more projection outputs for the recompute "
                     "(%.1f GiB kept, %.1f GiB of layer inputs, host budget %.1f GiB): the remaining layers "
                     "recompute them", self.kept_bytes / 2**30, self.layers * self.input_bytes / 2**30,
                     self.host_budget_bytes / 2**30)
        return False

    def _to_host(self, tensor: torch.Tensor, previous) -> _Offloaded:
        if self.device is None:
            self._start(tensor.device)
        compute = torch.cuda.current_stream(self.device)
        (host, last_read) = self.pool.take(tensor)
        self.to_host.wait_stream(compute)  # the values must be written before they are read
        with torch.cuda.stream(self.to_host):
            if last_read is not None:
                self.to_host.wait_event(last_read)  # the buffer's previous tenant has been read back
            host.copy_(tensor, non_blocking=True)
            copied = self.to_host.record_event()
        # the allocator must not give this memory to another tensor before the copy has read it
        tensor.record_stream(self.to_host)
        return _Offloaded(host, copied, previous, self.pool)

    def unpack(self, handle):
        if not isinstance(handle, _Offloaded):
            return handle
        device_copy = self.fetch(handle)
        # the backward runs layers in reverse: the one packed before this is needed next
        previous = handle.previous() if handle.previous is not None else None
        if previous is not None:
            self._fetch(previous)
        return device_copy

    def _fetch(self, handle: _Offloaded) -> None:
        if handle.device_copy is not None:
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.to_device):
            self.to_device.wait_event(handle.copied)
            device_copy = torch.empty(handle.host.shape, dtype=handle.host.dtype, device=self.device)
            device_copy.copy_(handle.host, non_blocking=True)
            handle.arrived = self.to_device.record_event()
        # allocated on the side stream, used and freed on the compute stream
        device_copy.record_stream(compute)
        handle.device_copy = device_copy
