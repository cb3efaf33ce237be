"""Tiled MLP (Axolotl's ``tiled_mlp``, from ALST, Arctic Long Sequence Training).

At long context a decoder layer's MLP is where activation memory peaks: its
gate and up projections make ``tokens x intermediate`` values (3.5 times the
hidden width for Llama), and autograd keeps them for backward. A tiled MLP
runs the layer's MLP over shards of the sequence instead::

    x [batch, seq, hidden] --chunk(seq)--> x_1 .. x_n
    forward  (no grad):  y = cat(mlp(x_1), .., mlp(x_n))         keeps only x
    backward:            for each shard i: recompute mlp(x_i) with grad,
                         backprop dy_i into dx_i and the weights' gradients

so at most one shard's intermediate activations exist at a time, in forward
and in backward, at the cost of one more MLP forward (the same trade as
gradient checkpointing, which it composes with). Every token's MLP output
depends on that token only, so the result is the untiled one up to the
order of the weight-gradient sums.

The MLP's trainable parameters are inputs of the autograd Function, and their
gradients, summed over the shards, are its outputs: autograd accumulates them
once, as for any module, so data-parallel and FSDP hooks on them fire once.
The random-number state is restored for the recomputation, so dropout (a
LoRA's, say) draws the same masks as the forward did.

What is tiled: each decoder layer's dense MLP (its ``mlp`` child, whatever
module a kernel plugin put there). A mixture-of-experts block routes tokens
and returns router logits; it is left alone, as Axolotl does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: shards are sized to about this many tokens when ``tiled_mlp_num_shards`` is unset
#: (Axolotl's default: smaller shards starve the matmuls, larger ones save little)
TOKENS_PER_SHARD = 32768

#: decoder-layer attributes holding the MLP, in transformers' naming
MLP_ATTRIBUTES = ("mlp", "feed_forward")

#: modules of the llama MLP layout, which ``use_original_mlp=False`` runs directly
LLAMA_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def shard_count(seq_len: int, num_shards: int | None) -> int:
    """Shards for a sequence of ``seq_len`` tokens: ``num_shards`` when given,
    else one per :data:`TOKENS_PER_SHARD` tokens; never more than the tokens."""
    shards = num_shards if num_shards else math.ceil(seq_len / TOKENS_PER_SHARD)
    return max(1, min(shards, seq_len))


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class TiledMLPFunction(torch.autograd.Function):
    """``cat(forward_fn(x_i))`` over ``shards`` chunks of ``x`` along its
    second-to-last (sequence) dimension; see the module docstring."""

    @staticmethod
    def forward(ctx, forward_fn, shards: int, x: torch.Tensor, *params: torch.Tensor):
        ctx.forward_fn, ctx.shards, ctx.params = forward_fn, shards, params
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        # autograd.Function.forward runs without grad: nothing inside is kept for backward
        return torch.cat([forward_fn(chunk) for chunk in x.chunk(shards, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        x_grad = torch.empty_like(x) if need_x else None
        param_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        cpu_state, device_state = ctx.rng
        devices = [x.device] if device_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            if device_state is not None:
                torch.cuda.set_rng_state(device_state, x.device)
            chunks = zip(x.chunk(ctx.shards, dim=-2), grad_output.chunk(ctx.shards, dim=-2),
                         x_grad.chunk(ctx.shards, dim=-2) if need_x else [None] * ctx.shards)
            for chunk, grad_chunk, x_grad_chunk in chunks:
                chunk = chunk.detach().requires_grad_(need_x)
                with torch.enable_grad():
                    out = ctx.forward_fn(chunk)
                inputs = ([chunk] if need_x else []) + [ctx.params[i] for i in wanted]
                grads = list(torch.autograd.grad(out, inputs, grad_chunk, allow_unused=True))
                if need_x:
                    x_grad_chunk.copy_(grads.pop(0))
                for i, grad in zip(wanted, grads):
                    if grad is None:  # not used by this MLP's forward: no gradient, as autograd gives
                        continue
                    # summed in the parameter's dtype, as autograd sums a parameter's uses
                    param_grads[i] = grad if param_grads[i] is None else param_grads[i].add_(grad)
        return (None, None, x_grad, *param_grads)


def _is_moe(module: nn.Module) -> bool:
    """A routed mixture-of-experts block (experts, a router), not a dense MLP."""
    names = {name for name, _ in module.named_children()}
    return bool(names & {"experts", "router", "gate"}) and not {"gate_proj", "up_proj"} <= names


def _llama_forward(module: nn.Module):
    return lambda x: module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))


_tiled_classes: dict[type, type] = {}


def _tiled_class(base: type) -> type:
    """A subclass of MLP class ``base`` whose forward is tiled; a subclass, so
    parameter names and ``isinstance`` checks (peft, FSDP) are unchanged."""
    if base in _tiled_classes:
        return _tiled_classes[base]

    @torch.compiler.disable  # the Function's backward runs autograd itself: keep it out of a compiled layer's graph
    def forward(self, x, *args, **kwargs):
        original = (lambda chunk: base.forward(self, chunk, *args, **kwargs)) if self._plait_tiled_original \
            else _llama_forward(self)
        if x.dim() < 2:
            return original(x)
        shards = shard_count(x.shape[-2], self._plait_tiled_shards)
        if not torch.is_grad_enabled():  # nothing is kept anyway: just bound each shard's activations
            return torch.cat([original(chunk) for chunk in x.chunk(shards, dim=-2)], dim=-2)
        params = [p for p in self.parameters() if p.requires_grad]
        return TiledMLPFunction.apply(original, shards, x, *params)

    cls = type(f"Tiled{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    _tiled_classes[base] = cls
    return cls


def tile_mlps(model: nn.Module, num_shards: int | None = None, use_original_mlp: bool = True,
              layer_class: str | None = None) -> dict[str, str]:
    """Tile the dense MLP of every decoder layer of ``model`` in place.

    ``num_shards``: shards per sequence (``None``: one per
    :data:`TOKENS_PER_SHARD` tokens). ``use_original_mlp=False`` runs the
    llama layout ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` instead of
    the module's own forward (Axolotl's ``tiled_mlp_use_original_mlp``); a
    module without those parts raises ``ValueError``. Decoder layers are
    modules of class ``layer_class``, or whose class name ends in
    ``DecoderLayer``. Returns ``{"<MLP class> xN": what was done}``.
    """
    report: dict[tuple[str, str], int] = {}
    shards = f"{num_shards} shards" if num_shards else f"1 shard per {TOKENS_PER_SHARD} tokens"
    for layer in model.modules():
        name = type(layer).__name__
        if not (name == layer_class if layer_class else name.endswith("DecoderLayer")):
            continue
        mlp = next((getattr(layer, attr) for attr in MLP_ATTRIBUTES if isinstance(getattr(layer, attr, None),
                                                                                  nn.Module)), None)
        if mlp is None:
            continue
        kind = type(mlp).__name__
        if _is_moe(mlp):
            what = "not tiled (a mixture-of-experts block)"
        else:
            if not use_original_mlp and not all(hasattr(mlp, part) for part in LLAMA_MLP_PARTS):
                raise ValueError(f"{kind} has no {', '.join(LLAMA_MLP_PARTS)}: the llama MLP layout cannot run it")
            if type(mlp) not in _tiled_classes.values():
                mlp.__class__ = _tiled_class(type(mlp))
            mlp._plait_tiled_shards, mlp._plait_tiled_original = num_shards, use_original_mlp
            kind = type(mlp).__mro__[1].__name__
            what = f"tiled over the sequence ({shards}{'' if use_original_mlp else ', llama MLP forward'})"
        report[(kind, what)] = report.get((kind, what), 0) + 1
    return {f"{kind} x{count}": what for (kind, what), count in report.items()}
