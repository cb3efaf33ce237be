"""One forward pass for training: the backbone's hidden states and the head.

The loop computes the loss itself (:func:`plait.hookspecs.build_loss`), so it
needs the final hidden states rather than logits. It still calls the *outer*
model, because wrappers (peft, DDP, FSDP2) do their work in the outer
``forward``; ``logits_to_keep=1`` makes the model's own head run on one
position only, and a forward hook on the module feeding the head captures its
output.

Which module feeds the head, and whether ``hidden @ head.weight.T`` (plus the
head's bias and Gemma 2's soft cap, :func:`plait.builtin.loss.head_options`)
really is the model's logits, is not assumed from the class layout:
:func:`head_plan` runs one tiny probe forward per model and looks. OPT,
BART-style decoders and BERT-style heads (a transform before the output layer)
put the module feeding the head elsewhere; Cohere (``logit_scale``), Granite
(``logits_scaling``), MiniCPM3 (hidden states scaled inline) and
RecurrentGemma (a logit soft cap) change the logits after or around the output
layer. Where the fused computation cannot reproduce the model's logits, the
loop takes the model's own logits instead (:func:`forward_logits`): never a
loss on different logits.
"""

from __future__ import annotations

import contextlib
import dataclasses

import inspect
import logging
import weakref
from dataclasses import dataclass

log = logging.getLogger("plait.model")


def unwrap_data_parallel(model):
    """The module inside DDP (which only replicates; FSDP2 keeps the class)."""
    while hasattr(model, "module") and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = model.module
    return model


def unwrap(model):
    """The transformers causal LM inside DDP / peft wrappers."""
    model = unwrap_data_parallel(model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def decoder_and_head(model):
    """``(decoder, head)``: the backbone (``base_model_prefix``) and the LM head."""
    causal_lm = unwrap(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if decoder is None and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(causal_lm).__name__} has no decoder/LM head that Plait can find")
    return decoder, head


@dataclass(frozen=True)
class HeadPlan:
    """How the loss gets its input for one model (:func:`head_plan`)."""

    #: name (in the unwrapped causal LM) of the module whose output the head
    #: multiplies; ``None`` when no module returns exactly that
    feeder: str | None
    #: the fused head (``hidden @ W.T`` + bias, soft cap) reproduces the model's logits
    fused: bool
    #: ``forward`` takes ``logits_to_keep`` (else its head runs on every position)
    logits_to_keep: bool
    #: ``forward`` takes ``use_cache``
    use_cache: bool
    #: why the fused head is not used, for the log
    reason: str = ""
    #: the probe forward on token ids alone failed with this (the model needs other inputs)
    probe_error: str | None = None
    #: a sequence or token classifier (a ``score``/``classifier`` head over the hidden states, no LM head)
    classifier: bool = False


def is_classifier(model) -> bool:
    """Whether ``model`` is transformers' sequence or token classifier: ``num_labels``
    outputs from a ``score`` or ``classifier`` head instead of a vocabulary."""
    import torch

    name = type(model).__name__
    return name.endswith(("ForSequenceClassification", "ForTokenClassification")) and any(
        isinstance(getattr(model, head, None), torch.nn.Module) for head in ("score", "classifier"))


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SWAP_LOGGED: "weakref.WeakSet" = weakref.WeakSet()


def head_plan(model) -> HeadPlan:
    """The :class:`HeadPlan` of ``model``'s causal LM, probed once and kept for
    the model's lifetime. The loop asks right after loading, before adapters
    and parallel wrappers (which keep the same causal LM inside)."""
    causal_lm = unwrap(model)
    plan = _PLANS.get(causal_lm)
    if plan is not None and plan.fused:
        swapped = _swapped_head(causal_lm)
        if swapped:
            # a plugin replaced the head after the probe (fake quantization): only its own forward is right
            if causal_lm not in _SWAP_LOGGED:
                _SWAP_LOGGED.add(causal_lm)
                log.warning("loss: %s; the loss uses the model's own logits", swapped)
            return dataclasses.replace(plan, fused=False, reason=swapped)
    if plan is None:
        plan = _PLANS[causal_lm] = probe_head(causal_lm)
        if plan.probe_error:
            from plait.errors import ConfigError

            raise ConfigError(
                f"base_model: {type(causal_lm).__name__} does not run on token ids alone ({plan.probe_error}); "
                "Plait trains causal LMs whose forward takes input_ids (a draft or assistant model that needs "
                "another model's states cannot be fine-tuned on its own)")
        if plan.classifier:
            log.info("loss: %s", plan.reason)
        elif not plan.fused:
            log.warning("loss: %s; the loss uses the model's own logits (its head runs on every position; a fused "
                        "loss kernel does not apply)", plan.reason)
    return plan


def share_head_plan(copy, original) -> None:
    """Give ``copy``, a structural copy of ``original`` (a frozen reference
    model), ``original``'s :class:`HeadPlan` instead of probing it: a copy
    sharded by FSDP2 before its first forward cannot run the probe on plain
    tensors, and the same modules give the same plan."""
    _PLANS[unwrap(copy)] = head_plan(original)


def _swapped_head(causal_lm) -> str:
    """Why the fused head no longer applies, or ``""``: the head is a subclass
    of ``nn.Linear`` with its own ``forward`` (torchao's fake-quantized linear
    changes its weight and input on the way), which ``hidden @ W.T`` would skip."""
    import torch

    head = causal_lm.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and type(head).forward is not torch.nn.Linear.forward:
        return f"the output layer is a {type(head).__name__}, whose forward differs from nn.Linear's"
    return ""


def _forward_parameters(causal_lm) -> tuple[bool, bool]:
    """Whether ``forward`` takes ``logits_to_keep`` and ``use_cache``."""
    try:
        params = inspect.signature(causal_lm.forward).parameters
    except (TypeError, ValueError):
        return False, False
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return "logits_to_keep" in params, "use_cache" in params or takes_kwargs


def as_hidden(output):
    """The hidden-state tensor in a module's output: the tensor itself, the first
    element of a tuple, or ``last_hidden_state`` of a model output."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("last_hidden_state"), torch.Tensor):
        return output["last_hidden_state"]
    if isinstance(output, (tuple, list)) or isinstance(output, dict):
        values = output.values() if isinstance(output, dict) else output
        return next((v for v in values if isinstance(v, torch.Tensor)), None)
    return None


@contextlib.contextmanager
def probing(module):
    """Eval mode without gradients for a probe forward; every submodule's own
    training flag comes back afterwards.

    bitsandbytes' 4-bit layers stay in training mode: on a CPU with AVX-512
    BF16, an eval-mode forward without gradients repacks their weights in place
    for bitsandbytes' inference kernel, and a training forward never unpacks
    them, so a probe at load time would change the weights the run trains."""
    import torch

    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    for m in module.modules():
        if type(m).__module__.startswith("bitsandbytes"):
            m.training = True
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def probe_head(causal_lm, n_tokens: int = 8) -> HeadPlan:
    """Run ``causal_lm`` once (eval mode, no grad) on ``n_tokens`` tokens and
    find the module whose output the head multiplies, and whether the fused
    head reproduces the returned logits."""
    import torch
    import torch.nn.functional as F

    from plait.model.head import head_options

    keep, cache = _forward_parameters(causal_lm)
    head = causal_lm.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if head is None or weight is None or weight.dim() != 2:
        if is_classifier(causal_lm):
            # a reward or token classifier: its objective reads the model's scores, there is no vocabulary head
            return HeadPlan(None, False, keep, cache, f"{type(causal_lm).__name__} is a classifier (no vocabulary "
                            f"head; its objective reads the model's scores)", classifier=True)
        return HeadPlan(None, False, keep, cache, f"{type(causal_lm).__name__} has no linear output layer")
    head_modules = {id(m) for m in head.modules()}
    seen: list[tuple[str, object]] = []
    captured = {}

    def record(name):
        def hook(module, args, output):
            hidden = as_hidden(output)
            if hidden is not None and hidden.dim() == 3 and hidden.shape[1] == n_tokens \
                    and hidden.shape[-1] == weight.shape[1]:
                seen.append((name, hidden))
        return hook

    def head_input(module, args, kwargs):
        captured["input"] = args[0] if args else next(iter(kwargs.values()), None)

    handles = [head.register_forward_pre_hook(head_input, with_kwargs=True)]
    handles += [module.register_forward_hook(record(name)) for name, module in causal_lm.named_modules()
                if name and id(module) not in head_modules]
    embeddings = causal_lm.get_input_embeddings()
    # the embeddings' device: with a device map, the first layers' (the head may sit elsewhere)
    device = embeddings.weight.device if embeddings is not None and hasattr(embeddings, "weight") else weight.device
    vocab = min(weight.shape[0], getattr(embeddings, "num_embeddings", weight.shape[0]))
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(n_tokens)]], device=device)
    kwargs = {"use_cache": False} if cache else {}
    if keep:
        kwargs["logits_to_keep"] = 0  # every position, to compare
    if getattr(getattr(causal_lm, "config", None), "_attn_implementation", None) == "plait_varlen":
        # torch's varlen kernel has no unpacked path: the probe row goes in as a one-row bin
        offsets = torch.tensor([0, n_tokens], dtype=torch.int32, device=device)
        kwargs.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets.clone(), max_length_q=n_tokens,
                      max_length_k=n_tokens, position_ids=torch.arange(n_tokens, device=device)[None])
    try:
        with probing(causal_lm):
            outputs = causal_lm(input_ids=ids, **kwargs)
    except Exception as exc:  # noqa: BLE001 - recorded: the loop refuses such a model with this reason
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        return HeadPlan(None, False, keep, cache, f"the head probe failed ({error})", probe_error=error)
    finally:
        for handle in handles:
            handle.remove()
    logits = getattr(outputs, "logits", None)
    hidden_in = captured.get("input")
    name = type(causal_lm).__name__
    if logits is None or hidden_in is None:
        return HeadPlan(None, False, keep, cache, f"{name}'s logits do not come from its output layer")
    # the last module to finish with exactly the head's input: the backbone rather than its final norm
    feeder = next((n for n, h in reversed(seen) if h.shape == hidden_in.shape and torch.equal(h, hidden_in)), None)
    if feeder is None:
        return HeadPlan(None, False, keep, cache, f"{name} transforms the hidden states inline before its head")
    if keep and not _feeds_every_position(causal_lm, feeder, ids, kwargs):
        keep = False  # the feeder runs after the model slices positions (a BERT-style head transform)
    options = head_options(causal_lm)
    fused = F.linear(hidden_in, weight, options.get("head_bias")).float()
    if options.get("softcap"):
        fused = torch.tanh(fused / options["softcap"]) * options["softcap"]
    logits = logits.float()
    scale = float(logits.abs().max()) + 1e-6
    if fused.shape != logits.shape or not torch.allclose(fused, logits, rtol=1e-3, atol=1e-3 * scale):
        return HeadPlan(feeder, False, keep, cache,
                        f"{name} changes its logits after the output layer (a logit scale or soft cap)")
    return HeadPlan(feeder, True, keep, cache)


def _feeds_every_position(causal_lm, feeder: str, ids, kwargs) -> bool:
    """Whether ``feeder`` still returns every position when the model is asked
    for the last position's logits only (``logits_to_keep=1``)."""
    lengths = []
    handle = causal_lm.get_submodule(feeder).register_forward_hook(
        lambda module, args, output: lengths.append(as_hidden(output).shape[1]))
    try:
        with probing(causal_lm):
            causal_lm(input_ids=ids, **{**kwargs, "logits_to_keep": 1})
    except Exception:  # noqa: BLE001 - then do not ask for logits_to_keep at all
        return False
    finally:
        handle.remove()
    return bool(lengths) and lengths[-1] == ids.shape[1]


#: where :func:`record_position_offset` keeps its answer on the causal LM
_POSITION_OFFSET = "_plait_position_offset"


def record_position_offset(model) -> int:
    """Find and remember the position id the model gives its first token.

    Packing restarts ``position_ids`` at 0 per row, which is what a model
    computes itself for Llama and nearly all decoders. RoBERTa-style
    embeddings (roberta, xlm-roberta, camembert, data2vec-text, ...) count
    from ``padding_idx + 1`` instead, so position 0 would be an embedding the
    model never trained at the first token. Not assumed from the class: one
    probe compares ``model(ids)`` with ``model(ids, position_ids=k + arange)``
    for ``k`` = 0, then ``pad_token_id + 1`` (:func:`first_position_candidates`);
    the first ``k`` that gives the same logits is added to every
    ``position_ids`` :func:`_call` passes.
    Returns ``k`` (0 when neither matches: then the packed isolation check
    reports the difference).
    """
    import torch

    causal_lm = unwrap(model)
    ids = _probe_ids(causal_lm, 1, 6)
    offset = 0
    with probing(causal_lm):
        try:
            own = causal_lm(input_ids=ids, use_cache=False).logits.float()
        except Exception:  # noqa: BLE001 - a model that does not run on ids alone is refused by the head probe
            setattr(causal_lm, _POSITION_OFFSET, 0)
            return 0
        for k in first_position_candidates(causal_lm):
            try:
                given = causal_lm(input_ids=ids, position_ids=torch.arange(6, device=ids.device)[None] + k,
                                  use_cache=False).logits.float()
            except Exception:  # noqa: BLE001 - positions past the table: not this offset
                continue
            if torch.allclose(own, given, rtol=1e-3, atol=1e-3 * (float(own.abs().max()) + 1e-6)):
                offset = k
                break
    setattr(causal_lm, _POSITION_OFFSET, offset)
    return offset


#: where :func:`record_position_module` keeps its answer on the causal LM
_POSITION_MODULE = "_plait_position_module"


@dataclass(frozen=True)
class PositionModule:
    """Where a causal LM whose ``forward`` takes no ``position_ids`` computes
    its positions (:func:`record_position_module`)."""

    #: name, in the causal LM, of the module whose ``position_ids`` argument Plait sets
    name: str
    #: added to the packed (0-based, per row) positions, as :func:`record_position_offset`'s offset
    offset: int
    #: the model hands the module one ``[seq]`` position vector shared by the batch (the module's
    #: output is broadcast over it): the module is run once per row with that row's positions and
    #: the outputs are stacked along the batch; else it takes ``[batch, seq]`` as they are
    per_row: bool


def first_position_candidates(causal_lm) -> list[int]:
    """The position ids of a row's first token that the position probes try,
    in order: 0 (Llama and nearly every decoder), then ``pad_token_id + 1``
    (RoBERTa-style embeddings number real tokens from ``padding_idx + 1``).

    A pad id of 0 is a real ``padding_idx`` (several vocabularies put
    padding first), whose positions then start at 1, so it counts (``>= 0``).
    Both probes (:func:`record_position_offset`, :func:`record_position_module`)
    read this one list so they cannot disagree. A wrong candidate costs a
    forward and is harmless: a probe takes an offset only when it reproduces
    the model's own logits. A missing, negative or boolean pad id gives no
    second candidate."""
    pad = getattr(_text_config(causal_lm), "pad_token_id", None)
    has_padding_idx = isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0
    return [0, pad + 1] if has_padding_idx else [0]


def _text_config(causal_lm):
    """The text part of the causal LM's config (the config itself for text-only models)."""
    return text_config(causal_lm.config)


def text_config(config):
    """The text part of a model config (the config itself for a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _probe_ids(causal_lm, rows: int, n_tokens: int):
    """``[rows, n_tokens]`` distinct token ids for a probe forward, clear of the
    special tokens and of ``pad_token_id``."""
    import torch

    embeddings = causal_lm.get_input_embeddings()
    vocab = embeddings.num_embeddings
    pad = getattr(_text_config(causal_lm), "pad_token_id", None)
    ids = torch.tensor([[8 + (i * 5 + 3 * row) % max(1, vocab - 8) for i in range(n_tokens)] for row in range(rows)],
                       device=embeddings.weight.device)
    if pad is not None:
        ids[ids == pad] = 8 if pad != 8 else 9
    return ids


def _takes(module, name: str) -> bool:
    """Whether ``module.forward`` names an argument ``name``."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _parameter_index(module, name: str) -> int | None:
    """Where argument ``name`` sits among ``module.forward``'s parameters (positional calls)."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index(name) if name in names else None


def _set_argument(module, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call of ``module`` with argument ``name`` set to
    ``value``, where the caller passed it positionally or by keyword or not at all."""
    index = _parameter_index(module, name)
    if index is not None and index < len(args):
        return args[:index] + (value,) + args[index + 1:], kwargs
    return args, {**kwargs, name: value}


def _argument(module, args: tuple, kwargs: dict, name: str):
    """The value of argument ``name`` in a call of ``module`` (``None`` when not passed)."""
    if name in kwargs:
        return kwargs[name]
    index = _parameter_index(module, name)
    return args[index] if index is not None and index < len(args) else None


def install_positions(module, positions, per_row: bool):
    """Hook ``module`` so that its ``position_ids`` are ``positions``
    (``[batch, seq]``); returns the hook handle. ``per_row``: see
    :attr:`PositionModule.per_row` (the module's own output is discarded and
    recomputed once per row: a position embedding costs a table lookup)."""
    import torch

    if not per_row:
        return module.register_forward_pre_hook(
            lambda mod, args, kwargs: _set_argument(mod, args, kwargs, "position_ids", positions), with_kwargs=True)

    def per_row_outputs(mod, args, kwargs, output):
        rows = [mod.forward(*a, **k) for a, k in
                (_set_argument(mod, args, kwargs, "position_ids", row) for row in positions)]
        if rows[0].dim() == 3 and rows[0].shape[0] == 1:  # [1, seq, dim] each: the module adds the batch axis
            return torch.cat(rows)
        return torch.stack(rows)

    return module.register_forward_hook(per_row_outputs, with_kwargs=True)


def position_module_candidates(causal_lm) -> list[str]:
    """Names of the causal LM's submodules whose ``forward`` names a
    ``position_ids`` argument, outermost first (``named_modules`` order)."""
    return [name for name, module in causal_lm.named_modules() if name and _takes(module, "position_ids")]


def _own_calls(causal_lm, names: list[str], ids, extra: dict) -> tuple:
    """The model's own logits on ``ids``, and for each module of ``names`` the
    ``position_ids`` it was given and its output, in its first call."""
    seen = {}

    def record(name):
        def hook(module, args, kwargs, output):
            seen.setdefault(name, (_argument(module, args, kwargs, "position_ids"), output))
        return hook

    handles = [causal_lm.get_submodule(n).register_forward_hook(record(n), with_kwargs=True) for n in names]
    try:
        logits = causal_lm(input_ids=ids, **extra).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def record_position_module(model, n_tokens: int = 6) -> PositionModule | None:
    """Find and remember the module through which a causal LM whose
    ``forward`` takes no ``position_ids`` gets packed rows' positions.

    BART-style decoders (bart, mbart, marian, pegasus, blenderbot, plbart, mvp,
    trocr, whisper) take no ``position_ids`` in ``forward``, but their decoder
    computes ``arange(seq_len)`` and hands it to its position-embedding module
    as ``position_ids``; their attention takes Plait's block-diagonal mask. For
    packed batches, :func:`_call` hooks that module (:func:`install_positions`)
    so that it embeds the packed rows' restarting positions plus ``offset``;
    unpacked batches never see the hook.

    Not assumed from class names: each submodule taking ``position_ids``
    (:func:`position_module_candidates`, outermost first) is watched in one
    forward on two rows of ``n_tokens`` tokens. One that gets ``[batch, seq]``
    positions takes packed ones as they are; one that returns a tensor and
    gets a shared ``[seq]`` vector (or none: it counts itself) is run per row
    (:attr:`PositionModule.per_row`). For each such module and each offset 0,
    then ``pad_token_id + 1`` (:func:`first_position_candidates`), the hooked model must give its own logits with
    ``offset + arange(n_tokens)`` and different ones with the positions
    reversed (so those positions do reach the output). The first that does is
    recorded on the causal LM and returned; ``None`` when none does (then
    packing is refused: nothing can tell the model where a row starts).
    Whether packed rows are then exactly isolated is proved at load by
    :func:`plait.data.packing.packed_rows_leak`.
    """
    import torch

    causal_lm = unwrap(model)
    setattr(causal_lm, _POSITION_MODULE, None)
    ids = _probe_ids(causal_lm, 2, n_tokens)
    _, cache = _forward_parameters(causal_lm)
    extra = {"use_cache": False} if cache else {}
    arange = torch.arange(n_tokens, device=ids.device)[None].expand(2, n_tokens)
    names = position_module_candidates(causal_lm)
    offsets = first_position_candidates(causal_lm)

    with probing(causal_lm):
        try:
            own, seen = _own_calls(causal_lm, names, ids, extra)
        except Exception:  # noqa: BLE001 - a model that does not run on ids alone is refused by the head probe
            return None
        tolerance = 1e-3 * (float(own.abs().max()) + 1e-6)

        def logits_with(name, positions, per_row):
            handle = install_positions(causal_lm.get_submodule(name), positions, per_row)
            try:
                return causal_lm(input_ids=ids, **extra).logits.float()
            finally:
                handle.remove()

        for name in names:
            if name not in seen:
                continue  # not called on this path
            given, output = seen[name]
            if not isinstance(output, torch.Tensor):
                continue  # a decoder or layer, not a position embedding
            # batched positions are taken as they are; a shared [seq] vector (or none) means one call per row
            per_row = not (isinstance(given, torch.Tensor) and given.dim() == 2 and given.shape[0] == ids.shape[0])
            for offset in offsets:
                try:
                    same = logits_with(name, arange + offset, per_row)
                    reversed_ = logits_with(name, arange.flip(-1) + offset, per_row)
                except Exception:  # noqa: BLE001 - this module does not take positions this way
                    continue
                if same.shape == own.shape and torch.allclose(same, own, rtol=1e-3, atol=tolerance) \
                        and not torch.allclose(reversed_, own, rtol=1e-3, atol=tolerance):
                    found = PositionModule(name, offset, per_row)
                    setattr(causal_lm, _POSITION_MODULE, found)
                    return found
    return None


def position_module(model) -> PositionModule | None:
    """What :func:`record_position_module` found for ``model`` (``None`` when
    it found nothing or was not asked)."""
    return getattr(unwrap(model), _POSITION_MODULE, None)


#: where :func:`record_layer_masks` keeps its answer on the causal LM
_LAYER_MASKS = "_plait_layer_masks"


def decoder_layer_names(causal_lm) -> list[str]:
    """Names of the causal LM's decoder layers that take an ``attention_mask``:
    the elements of each ``nn.ModuleList`` whose every element's ``forward``
    names that argument."""
    import torch

    names = []
    for name, module in causal_lm.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) \
                and all(_takes(layer, "attention_mask") for layer in module):
            names += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return names


def install_layer_masks(causal_lm, names: list[str], mask) -> list:
    """Forward pre-hooks giving each layer of ``names`` ``attention_mask=mask``; their handles."""
    def hook(module, args, kwargs):
        return _set_argument(module, args, kwargs, "attention_mask", mask)

    return [causal_lm.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True) for name in names]


def record_layer_masks(model, packed_mask, n_tokens: int = 6) -> list[str] | None:
    """Find and remember the decoder layers to which packed batches hand
    Plait's block-diagonal mask directly, for a model whose own ``forward``
    cannot take it.

    Some causal LMs turn their ``attention_mask`` argument into something
    else on the way to attention, which only a 2-D padding mask survives:
    BLOOM builds its ALiBi bias from it (``build_alibi_tensor`` reads
    ``[batch, seq]``), GPT-1 (``openai-gpt``) extends it to 4-D itself. Their
    decoder layers still take the causal mask the model built, in the backend's
    own form (additive under eager, boolean under SDPA), which is exactly what
    Plait's packed mask is (:func:`plait.data.packing.packed_attention_inputs`).
    For packed batches, :func:`_call` gives the outer model no mask (BLOOM's
    ALiBi then counts positions over the whole bin: a per-key bias that grows
    by the same amount for every key a query may see, which a softmax over that
    row's keys does not change) and each layer the packed mask.

    ``packed_mask(seq_lens, width, batch)`` builds the run's packed mask for
    ``batch`` bins of ``width`` tokens holding rows of ``seq_lens`` (the caller
    knows the backend; ``None`` where it has no tensor mask). Probed on two rows
    of ``n_tokens`` tokens: with the one-row causal mask at the layers
    (:func:`decoder_layer_names`), the model must give its own logits, and with
    the rows split in two it must give different ones past the split (the mask
    reaches attention). Records and returns the layer names, or ``None`` (no
    tensor mask, no such layers, or the probe disagrees). The packed isolation check (:func:`plait.data.packing.packed_rows_leak`)
    then proves the route on a real packed batch.
    """
    import torch

    causal_lm = unwrap(model)
    setattr(causal_lm, _LAYER_MASKS, None)
    names = decoder_layer_names(causal_lm)
    if not names or packed_mask([n_tokens], n_tokens, 2) is None:
        return None
    ids = _probe_ids(causal_lm, 2, n_tokens)
    _, cache = _forward_parameters(causal_lm)
    extra = {"use_cache": False} if cache else {}
    half = n_tokens // 2

    def logits_with(seq_lens):
        mask = packed_mask(seq_lens, n_tokens, 2)
        handles = install_layer_masks(causal_lm, names, mask)
        try:
            return causal_lm(input_ids=ids, **extra).logits.float()
        finally:
            for handle in handles:
                handle.remove()

    with probing(causal_lm):
        try:
            own = causal_lm(input_ids=ids, **extra).logits.float()
            same, split = logits_with([n_tokens]), logits_with([half, n_tokens - half])
        except Exception:  # noqa: BLE001 - its layers do not take the mask this way
            return None
    tolerance = 1e-3 * (float(own.abs().max()) + 1e-6)
    if same.shape != own.shape or not torch.allclose(same, own, rtol=1e-3, atol=tolerance) \
            or torch.allclose(split[:, half:], own[:, half:], rtol=1e-3, atol=tolerance):
        return None
    setattr(causal_lm, _LAYER_MASKS, names)
    return names


def forget_layer_masks(model) -> None:
    """Undo :func:`record_layer_masks` (its route did not isolate packed rows)."""
    setattr(unwrap(model), _LAYER_MASKS, None)


#: where :func:`mark_masks_from_positions` leaves its mark on the causal LM
_MASKS_FROM_POSITIONS = "_plait_masks_from_positions"


def mark_masks_from_positions(model) -> None:
    """Packed batches reach this model as restarting ``position_ids`` without
    Plait's block-diagonal mask (:func:`_call` drops it), so transformers builds
    the masks itself, the model's sliding or chunked window included
    (:func:`plait.data.packing.masks_from_positions`)."""
    setattr(unwrap(model), _MASKS_FROM_POSITIONS, True)


def masks_from_positions_marked(model) -> bool:
    """Whether :func:`mark_masks_from_positions` was called on ``model``."""
    return bool(getattr(unwrap(model), _MASKS_FROM_POSITIONS, False))


def _call(model, inputs: dict, plan: HeadPlan, extra: dict, hooks=()):
    """``model(**inputs)`` with ``extra`` keyword arguments and forward ``hooks``
    ``[(module, fn)]``; an MoE's packed mask reaches its decoder only,
    ``position_ids`` are shifted to where the model counts from
    (:func:`record_position_offset`) or, where ``forward`` takes none, handed
    to the module that computes the model's positions
    (:func:`record_position_module`), a model whose forward cannot take the
    packed mask has it handed to its layers (:func:`record_layer_masks`), and a windowed model gets no packed mask
    (:func:`mark_masks_from_positions`). transformers' mask checks that the host can answer (token ids alone, a
    padding mask with padding) are answered without a device read (:mod:`plait.model.mask_checks`)."""
    from plait.model.mask_checks import answered_on_host

    causal_lm = unwrap(model)
    handles = []
    # decided on what the caller passed: the routes below may take positions or masks out of ``inputs``
    host_answers = answered_on_host(inputs)
    mixers = getattr(causal_lm, _SEGMENT_MIXERS, None)
    if mixers:
        # recurrent / convolutional modules run one packed row at a time (record_segment_mixers)
        packed = inputs.get("position_ids") is not None
        seg = packed_segments(inputs["position_ids"]) if packed else None
        handles += [install_segment_runs(causal_lm.get_submodule(name), seg) for name in mixers]
        if packed and not _takes(causal_lm, "position_ids") and getattr(causal_lm, _POSITION_MODULE, None) is None:
            # a purely recurrent model (Mamba, RWKV): no positions, no attention; the rows are all it needs
            inputs = {k: v for k, v in inputs.items() if k not in _PACKED_ATTENTION_KEYS}
    positions_at = getattr(causal_lm, _POSITION_MODULE, None)
    if inputs.get("position_ids") is not None and positions_at is not None:
        # forward takes no position_ids: they reach the module that computes the model's positions
        positions = inputs["position_ids"] + positions_at.offset
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
        handles.append(install_positions(causal_lm.get_submodule(positions_at.name), positions, positions_at.per_row))
    layers = getattr(causal_lm, _LAYER_MASKS, None)
    mask = inputs.get("attention_mask")
    if layers and getattr(mask, "dim", lambda: 0)() == 4:
        # the model's forward cannot take the packed mask: its decoder layers get it
        inputs = {**inputs, "attention_mask": None}
        handles += install_layer_masks(causal_lm, layers, mask)
    if inputs.get("position_ids") is not None:
        offset = getattr(causal_lm, _POSITION_OFFSET, 0)
        if offset:
            inputs = {**inputs, "position_ids": inputs["position_ids"] + offset}
        mask = inputs.get("attention_mask")
        if getattr(causal_lm, _MASKS_FROM_POSITIONS, False) and mask is not None and mask.dim() == 4:
            inputs = {**inputs, "attention_mask": None}
    handles += [module.register_forward_hook(fn) for module, fn in hooks]
    packed_mask = inputs.get("attention_mask")
    if _returns_router_logits(model) and packed_mask is not None and getattr(packed_mask, "dim", lambda: 2)() != 2:
        # An MoE causal LM asked for router logits computes its own aux loss from
        # ``attention_mask`` after the decoder, and that code takes only a 2-D
        # padding mask. Hand the packed (4-D) mask to the decoder alone; Plait
        # adds the router loss itself (the ``extra_loss`` hook).
        decoder, _ = decoder_and_head(model)
        inputs = {**inputs, "attention_mask": None}

        def give_mask(module, args, kwargs):
            return args, {**kwargs, "attention_mask": packed_mask}

        handles.append(decoder.register_forward_pre_hook(give_mask, with_kwargs=True))
    if plan.use_cache:
        extra = {"use_cache": False, **extra}
    try:
        with host_answers:
            return model(**inputs, **extra)
    finally:
        for handle in handles:
            handle.remove()


def forward_hidden(model, inputs: dict):
    """Run ``model`` on ``inputs`` (everything but labels) and return
    ``(hidden [batch, seq, hidden], head module, outputs)``.

    ``outputs`` is what the outer model returned (its logits cover one
    position only where the model takes ``logits_to_keep``); an ``extra_loss``
    plugin reads e.g. ``router_logits`` from it when the model was configured
    to return them. Only for models whose :func:`head_plan` is fused.
    """
    plan = head_plan(model)
    if not plan.fused:
        raise TypeError(f"forward_hidden: {plan.reason}; use forward_logits")
    causal_lm = unwrap(model)
    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = as_hidden(output)

    extra = {"logits_to_keep": 1} if plan.logits_to_keep else {}
    outputs = _call(model, inputs, plan, extra, [(causal_lm.get_submodule(plan.feeder), keep_hidden)])
    return captured["hidden"], causal_lm.get_output_embeddings(), outputs


def forward_logits(model, inputs: dict):
    """Run ``model`` on ``inputs`` and return its outputs with logits for every
    position: the loss input for models whose head the fused loss cannot
    reproduce (:func:`head_plan`)."""
    return _call(model, inputs, head_plan(model), {})


def _returns_router_logits(model) -> bool:
    return bool(getattr(getattr(unwrap(model), "config", None), "output_router_logits", False))


#: model classes whose sequence mixing is not attention: state carried along the
#: sequence crosses row boundaries whatever the mask says (named in the refusal)
RECURRENT_HINTS = ("Mamba", "Mixer", "Recurrent", "Rglru", "ShortConv", "LinearAttention", "GatedDeltaNet",
                   "Rwkv", "Conv1d", "Lightning", "Ssm")


#: where :func:`record_segment_mixers` keeps its answer on the causal LM
_SEGMENT_MIXERS = "_plait_segment_mixers"

#: the packed batch's fields a model without positions or attention does not take
_PACKED_ATTENTION_KEYS = ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                          "max_length_k")


def segment_mixer_candidates(causal_lm) -> list[str]:
    """Names of the modules a packed batch would run one sequence at a time:
    the outermost modules, inside the decoder layers, whose class looks
    recurrent or convolutional (:data:`RECURRENT_HINTS`, or
    the transformers module holding a ``torch.nn.Conv1d``).

    A decoder layer (an element of a ``ModuleList``) is not taken whole: it may
    return per-batch extras (an MoE's router logits over every token) that
    could not be put back in packed order. torch's own classes (the
    ``Conv1d`` itself, whose input is ``[batch, channels, seq]``), norms (per
    token, named after the family: ``MambaRMSNorm``) and the models are not
    candidates either. Whether running them per sequence makes
    packing exact is proved by :func:`plait.data.packing.packed_rows_leak`."""
    import torch
    from transformers import PreTrainedModel

    layers = {id(layer) for m in causal_lm.modules() if isinstance(m, torch.nn.ModuleList) for layer in m}
    holds_conv = {id(m) for m in causal_lm.modules()
                  if any(isinstance(child, torch.nn.Conv1d) for child in m.children())}

    def candidate(module) -> bool:
        name = type(module).__name__.lower()
        if isinstance(module, PreTrainedModel) or type(module).__module__.startswith("torch.") \
                or id(module) in layers or name.endswith("norm"):  # a norm is per token (MambaRMSNorm: the family)
            return False
        return id(module) in holds_conv or any(h.lower() in name for h in RECURRENT_HINTS + ("Lstm",))

    chosen: list[str] = []
    for name, module in causal_lm.named_modules():
        if name and candidate(module) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


def record_segment_mixers(model) -> list[str] | None:
    """Remember that packed batches run the model's recurrent or convolutional
    modules (:func:`segment_mixer_candidates`) one packed row at a time
    (:func:`install_segment_runs`), and return their names (``None`` when
    there are none). The caller proves the route with the packed isolation
    check and calls :func:`forget_segment_mixers` when it fails."""
    causal_lm = unwrap(model)
    names = segment_mixer_candidates(causal_lm) or None
    setattr(causal_lm, _SEGMENT_MIXERS, names)
    return names


def forget_segment_mixers(model) -> None:
    """Undo :func:`record_segment_mixers`."""
    causal_lm = unwrap(model)
    for name in getattr(causal_lm, _SEGMENT_MIXERS, None) or ():
        remove_segment_runs(causal_lm.get_submodule(name))
    setattr(causal_lm, _SEGMENT_MIXERS, None)


def segment_mixers(model) -> list[str] | None:
    """What :func:`record_segment_mixers` recorded for ``model`` (``None``: not in use)."""
    return getattr(unwrap(model), _SEGMENT_MIXERS, None)


@dataclass(frozen=True)
class Segments:
    """Where the packed rows of a ``[batch, seq]`` micro-batch lie, as gather
    indices (:func:`packed_segments`)."""

    batch: int
    seq: int
    #: ``[n, longest]``: bin and position in the packed batch of each segment's token
    #: (padding slots past a segment's end repeat its last token)
    bin_index: object
    pos_index: object
    #: ``[n, longest]`` bool: a real token of the segment, not right padding
    real: object
    #: ``[batch, seq]``: segment and slot of each packed token (the way back)
    seg_of: object
    slot_of: object


def packed_segments(position_ids) -> Segments:
    """The packed rows of a micro-batch, found where ``position_ids`` restart
    at 0 (core's collation restarts them per row and for the padding tail,
    :func:`plait.data.packing.collate_packed`).

    Finding them takes ``nonzero``, a maximum and ``repeat_interleave``: on a
    GPU each reads the device (the host waits for everything queued). Where
    the batch's host copy was kept (:mod:`plait.model.host_copies`) they run on
    it and the index tensors are copied to the device without waiting."""
    from plait.model.host_copies import host_copy

    host = host_copy(position_ids)
    if host is None or host is position_ids:
        return _packed_segments(position_ids)
    seg = _packed_segments(host)
    device = position_ids.device

    def moved(tensor):
        # through pinned memory, as plait.data.batching.move_to_device: a pageable copy would wait for the device
        return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)

    return Segments(seg.batch, seg.seq, *(moved(t) for t in (seg.bin_index, seg.pos_index, seg.real, seg.seg_of,
                                                              seg.slot_of)))


def _packed_segments(position_ids) -> Segments:
    import torch

    batch, seq = position_ids.shape
    device = position_ids.device
    starts = position_ids == 0
    starts[:, 0] = True
    bins, begins = starts.nonzero(as_tuple=True)
    flat_begin = bins * seq + begins
    flat_end = torch.cat([flat_begin[1:], flat_begin.new_tensor([batch * seq])])
    flat_end = torch.minimum(flat_end, (bins + 1) * seq)  # a segment ends with its bin
    lengths = flat_end - flat_begin
    longest = int(lengths.max())
    slots = torch.arange(longest, device=device)
    flat = flat_begin[:, None] + torch.minimum(slots[None], lengths[:, None] - 1)
    seg_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths).view(batch, seq)
    slot_of = (torch.arange(batch * seq, device=device) - torch.repeat_interleave(flat_begin, lengths)).view(batch, seq)
    return Segments(batch, seq, flat // seq, flat % seq, slots[None] < lengths[:, None], seg_of, slot_of)


def _split_mask(mask, seg: Segments):
    """A packed attention mask for ``[n, longest]`` segments: a 2-D padding mask
    is cut like the tokens (right padding masked), a 4-D ``[batch, heads, seq,
    seq]`` mask keeps each segment's own block (right padding sees only itself)."""
    import torch

    if mask.dim() == 2:
        return seg.real.to(mask.dtype) * mask[seg.bin_index, seg.pos_index]
    rows = mask[seg.bin_index[:, :, None], :, seg.pos_index[:, :, None], seg.pos_index[:, None, :]]
    rows = rows.permute(0, 3, 1, 2)  # [n, heads, longest, longest]
    pad = ~(seg.real[:, :, None] & seg.real[:, None, :])
    eye = torch.eye(rows.shape[-1], dtype=torch.bool, device=rows.device)
    if rows.dtype == torch.bool:
        return rows.masked_fill(pad[:, None], False) | (eye & ~seg.real[:, :, None])[:, None]
    low = torch.finfo(rows.dtype).min
    return rows.masked_fill(pad[:, None], low).masked_fill((eye & ~seg.real[:, :, None])[:, None], 0)


def _split_value(value, seg: Segments, name: str = ""):
    """An argument of a module call, cut into segments where it is per token."""
    import torch

    if isinstance(value, (tuple, list)):
        return type(value)(_split_value(v, seg) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if name == "attention_mask" and value.dim() in (2, 4) and value.shape[-1] == seg.seq:
        return _split_mask(value, seg)
    if value.dim() >= 2 and value.shape[1] == seg.seq and value.shape[0] in (seg.batch, 1):
        return value.expand(seg.batch, *value.shape[1:])[seg.bin_index, seg.pos_index]
    if value.dim() == 1 and value.shape[0] == seg.seq and not value.is_floating_point() \
            and torch.equal(value, torch.arange(seg.seq, device=value.device)):
        return torch.arange(seg.real.shape[1], device=value.device)  # cache_position
    return value


def _join_value(value, seg: Segments):
    """A module's output put back in packed order where it is per segment token."""
    import torch

    if isinstance(value, (tuple, list)):
        return type(value)(_join_value(v, seg) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == seg.real.shape:
        return value[seg.seg_of, seg.slot_of]
    return value


#: where :func:`install_segment_runs` keeps a module's current packed rows
_ROWS = "_plait_packed_rows"


class _PerSegmentForward:
    """A module's forward that runs the packed rows of :data:`_ROWS` one at a
    time (:func:`install_segment_runs`), or the module's own forward when it
    has none or the input is not that batch."""

    def __init__(self, module, original):
        self.module, self.original = weakref.ref(module), original
        # the argument names, read once: positional arguments are cut by name (attention_mask)
        try:
            self.names = list(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            self.names = []

    def __call__(self, *args, **kwargs):
        import torch

        seg = getattr(self.module(), _ROWS, None)
        hidden = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if seg is None or hidden is None or tuple(hidden.shape[:2]) not in ((seg.batch, seg.seq), (1, seg.seq)):
            return self.original(*args, **kwargs)
        names = self.names
        args = tuple(_split_value(a, seg, names[i] if i < len(names) else "") for i, a in enumerate(args))
        kwargs = {k: _split_value(v, seg, k) for k, v in kwargs.items()}
        return _join_value(self.original(*args, **kwargs), seg)


class _SegmentRun:
    """An installed :func:`install_segment_runs`; ``remove()`` gives the module
    its earlier rows back after a forward without gradients."""

    def __init__(self, module, previous, keep: bool):
        self.module, self.previous, self.keep = module, previous, keep

    def remove(self) -> None:
        if not self.keep:
            setattr(self.module, _ROWS, self.previous)


def install_segment_runs(module, seg: "Segments | None") -> _SegmentRun:
    """Make ``module`` run each packed row of ``seg`` as its own sequence
    (``None``: an unpacked batch, its own forward as it is).

    Per-token arguments are gathered into ``[rows, longest, ...]`` with right
    padding, the module's own forward runs once on them, and per-token outputs
    are gathered back into packed order. A causal module's output at a real
    token does not depend on the padding after it, so this equals running the
    rows apart. Cache arguments stay as given (None in training).

    The rows of a forward with gradients stay on the module after it: gradient
    checkpointing runs the layer again in the backward, which must cut the
    same rows; the next forward replaces them. A forward without gradients
    (a reference model's, an eval batch's) puts the earlier rows back."""
    import torch

    if not isinstance(module.__dict__.get("forward"), _PerSegmentForward):
        module.forward = _PerSegmentForward(module, module.forward)
    previous = getattr(module, _ROWS, None)
    setattr(module, _ROWS, seg)
    return _SegmentRun(module, previous, keep=torch.is_grad_enabled())


def remove_segment_runs(module) -> None:
    """Give ``module`` its own forward back (:func:`forget_segment_mixers`)."""
    if isinstance(module.__dict__.get("forward"), _PerSegmentForward):
        del module.__dict__["forward"]
    module.__dict__.pop(_ROWS, None)
