"""The routed LoRA experts with each LoRA term folded into its projection's grouped GEMM
(``lora_experts_fold: true``).

:mod:`plait_kernels.lora_experts` computes a projection of the routed rows as
three grouped matmuls and an add, ``x @ W_e.T + (s * x @ A_e.T) @ B_e.T``: the
add, and the rank-r matmul that feeds it, are each a full pass over the
``[tokens * k, out]`` output. Here the bottleneck ``s * x @ A_e.T`` is written
beside the rows, and the frozen weight and ``B`` are one operand along the
contraction::

    y = [x | s * x A_e^T] @ [W_e^T ; B_e^T]            (one grouped GEMM)

so each projection's forward is the small GEMM for the bottleneck and one
grouped GEMM, with no add. For that the frozen expert weights live in one
persistent buffer per projection, made once when the path is installed: the
experts module's ``gate_up_proj`` / ``down_proj`` become views of its first
columns (same values, dtype and shape; ``r`` more columns per expert, so the
buffers cost ``r / in`` more than the weights they replace), and each forward
copies the current LoRA factors (peft's parameters, unchanged: they save,
load, merge and train as before) into the remaining ones, a copy of the size
of the factors, as the unfolded path's layout change of ``B`` already does.

The gate/up buffer also holds ``A`` of gate/up below the weight's rows
(``[E, 2I + r, H + r]``), which folds the backward the same way along its
contraction: ``dx = [dy | s * dy B_e] @ [W_e ; A_e]`` in one grouped GEMM.

:class:`FoldedExperts` is one autograd function for the whole routed experts
computation of a layer (gather of the rows, gate/up, SiLU gate, down): its
backward gives the hidden states' gradient and ``A`` and ``B``'s of both
projections, and none for the frozen weights (no weight-gradient GEMM). It
covers transformers' default gate (``act_fn(gate) * up`` on the concatenated
halves) with SiLU, ``is_transposed`` false and both projections adapted at
the rank the buffers were made for; :func:`fold_applies` says when, and the
unfolded path runs otherwise. The gate is PyTorch's ``silu`` and product, or
(``triton_glu``, on CUDA) Plait's Triton GLU, which writes the gate's output
straight into the down projection's operand and its gradients straight into
gate/up's backward operand, one pass each way; its backward pass also writes
the gated activations again (the forward's values) over the gradient it has
read, so the forward keeps only the down projection's bottleneck of them.
"""

from __future__ import annotations

import torch

from plait_kernels import lora_experts

#: the attribute of an experts module holding its :class:`FoldedWeights`
FOLDED_ATTRIBUTE = "_plait_folded_lora"


def _padded_rank(rank: int, dtype: torch.dtype) -> int:
    # the rank columns are padded (with zeros) so that every row of the buffers
    # and activations stays 16-byte aligned, as torch's grouped GEMM requires
    per_16_bytes = max(1, 16 // dtype.itemsize)
    return -(-rank // per_16_bytes) * per_16_bytes


class FoldedWeights:
    """The persistent buffers of one experts module (``E`` experts, hidden
    ``H``, intermediate ``I``, rank ``r`` padded to ``p``):

    - ``gate_up`` ``[E, 2I + p, H + p]``: ``[:, :2I, :H]`` is the frozen
      ``gate_up_proj`` (the module's parameter is this view), ``[:, :2I, H:H+r]``
      gate/up's ``B_e`` and ``[:, 2I:2I+r, :H]`` its ``A_e``;
    - ``down`` ``[E, H, I + p]``: ``[:, :, :I]`` the frozen ``down_proj``,
      ``[:, :, I:I+r]`` down's ``B_e``;
    - ``down_a`` ``[E, p, I]``: down's ``A_e``.

    Padding entries are zero and stay zero."""

    def __init__(self, experts, rank: int):
        gate_up, down = experts.gate_up_proj, experts.down_proj
        num_experts, two_i, hidden = gate_up.shape
        inter = down.shape[-1]
        self.rank, self.padded = rank, _padded_rank(rank, gate_up.dtype)
        p = self.padded
        self.gate_up = gate_up.new_zeros(num_experts, two_i + p, hidden + p)
        self.down = down.new_zeros(num_experts, hidden, inter + p)
        self.down_a = down.new_zeros(num_experts, p, inter)
        with torch.no_grad():
            self.gate_up[:, :two_i, :hidden].copy_(gate_up)
            self.down[:, :, :inter].copy_(down)
        # the module's weights become views of the buffers: the old storage is freed, so the
        # buffers cost only their rank columns; values, dtype, shape and requires_grad are the same
        experts.gate_up_proj = torch.nn.Parameter(self.gate_up[:, :two_i, :hidden], requires_grad=gate_up.requires_grad)
        experts.down_proj = torch.nn.Parameter(self.down[:, :, :inter], requires_grad=down.requires_grad)
        self.gate_up_view, self.down_view = experts.gate_up_proj, experts.down_proj

    def still_backs(self, experts) -> bool:
        """Whether the module's weights are still the buffers' views (a
        ``param.data = ...`` elsewhere, e.g. peft's safe merge, or a move to
        another device or dtype, replaces them: then the unfolded path runs)."""
        return all(getattr(experts, name, None) is view and view.data_ptr() == buffer.data_ptr()
                   and view.device == buffer.device and view.dtype == buffer.dtype
                   for name, view, buffer in (("gate_up_proj", self.gate_up_view, self.gate_up),
                                              ("down_proj", self.down_view, self.down)))

    def load_factors(self, a1, b1, a2, b2) -> None:
        """Copy peft's current factors (``lora_A.weight`` ``[E * r, in]``,
        ``lora_B.weight`` ``[out, r * E]``) into the buffers, in their dtype."""
        num_experts, two_i_p, hidden_p = self.gate_up.shape
        r, p = self.rank, self.padded
        two_i, hidden = two_i_p - p, hidden_p - p
        inter = self.down.shape[-1] - p
        with torch.no_grad():
            self.gate_up[:, :two_i, hidden:hidden + r].copy_(b1.view(two_i, r, num_experts).permute(2, 0, 1))
            self.gate_up[:, two_i:two_i + r, :hidden].copy_(a1.view(num_experts, r, hidden))
            self.down[:, :, inter:inter + r].copy_(b2.view(hidden, r, num_experts).permute(2, 0, 1))
            self.down_a[:, :r].copy_(a2.view(num_experts, r, inter))


def fold_experts(experts, adapters: dict) -> FoldedWeights | None:
    """Make the buffers of one experts module the routed path covers (when
    :func:`foldable` says it can be folded), and keep them on the module."""
    if foldable(experts, adapters) is not None:
        return None
    rank = adapters["gate_up_proj"][0].r[adapters["gate_up_proj"][1]]
    folded = FoldedWeights(experts, rank)
    setattr(experts, FOLDED_ATTRIBUTE, folded)
    return folded


def _is_default_silu_gate(experts) -> bool:
    gate = getattr(type(experts), "_apply_gate", None)
    act = getattr(experts, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return (getattr(gate, "__name__", None) == "_default_apply_gate" and silu
            and getattr(experts, "is_concatenated", True))


def foldable(experts, adapters: dict) -> str | None:
    """None when this experts module's projections can be folded, else why not."""
    if set(adapters) != set(lora_experts.EXPERT_PARAMETERS):
        return "only one of gate_up_proj and down_proj is adapted"
    if len({wrapper.r[name] for wrapper, name in adapters.values()}) != 1:
        return "gate_up_proj and down_proj have different ranks"
    if any(not isinstance(wrapper.scaling[name], (int, float)) for wrapper, name in adapters.values()):
        return "a LoRA scaling that is not a number"
    if getattr(experts, "is_transposed", False):
        return "the expert weights are stored transposed"
    if not _is_default_silu_gate(experts):
        return "not the default SiLU gate"
    gate_up, down = experts.gate_up_proj, experts.down_proj
    per_16_bytes = max(1, 16 // gate_up.dtype.itemsize)
    if gate_up.dtype != down.dtype or any(n % per_16_bytes for n in (*gate_up.shape[1:], down.shape[1])):
        return "the expert dimensions are not 16-byte aligned"
    return None


def fold_applies(experts, adapters: dict) -> FoldedWeights | None:
    """The module's :class:`FoldedWeights` when this call can take the folded
    path: buffers made for this rank still back the weights, and no
    ``torch.compile`` trace (the buffers are written in place)."""
    folded = getattr(experts, FOLDED_ATTRIBUTE, None)
    if folded is None or torch.compiler.is_compiling() or not folded.still_backs(experts):
        return None
    if foldable(experts, adapters) is not None:
        return None
    wrapper, name = adapters["gate_up_proj"]
    return folded if wrapper.r[name] == folded.rank else None


# ------------------------------------------------------------------ grouped matmuls


def _grouped(x, weight, offsets):
    """``x[rows of g] @ weight[g]`` (``weight`` ``[E, K, N]``)."""
    return lora_experts.grouped_matmul(x, weight, offsets)


def _grouped_over_rows(left_t, right, offsets):
    """``out[g] = left_t[:, rows of g] @ right[rows of g]``, ``[E, M, N]``: the
    weight-gradient form, contracting over each group's rows."""
    fn = lora_experts._grouped_mm_function()
    if fn is not None and lora_experts.grouped_mm_applies(left_t, right.unsqueeze(0)) \
            and lora_experts._aligned(right):
        return fn(left_t, right, offs=offsets)
    out = left_t.new_zeros(offsets.numel(), left_t.shape[0], right.shape[-1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            out[group] = left_t[:, start:end] @ right[start:end]
        start = end
    return out


class FoldedExperts(torch.autograd.Function):
    """The routed experts of one layer, both LoRA terms folded into the grouped
    GEMMs (module docstring). Inputs: ``hidden`` ``[T, H]``, each sorted
    row's token ``token_rows`` (``perm // top_k``) and the sort's
    ``inverse``, ``top_k``, the experts' row ``offsets``, peft's ``A``/``B``
    weights of gate/up and down, their scalings, the module's
    :class:`FoldedWeights`, and optionally ``row_weights``, each sorted row's
    routing weight, applied to its gated activation. Output: the down
    projection of every routed row, ``[T * k, H]`` in expert order (the
    combine weights, unless ``row_weights`` did, and sums them); with
    ``sum_rows`` (the weights applied in the gate) each token's ``k`` rows
    summed here, ``[T, H]`` in ``hidden``'s dtype, so that the backward makes
    the rows' gradient (a gather of the tokens') itself and frees it once the
    down projection's backward has read it: a separate sum's backward hands it
    over, and autograd keeps what it handed over until this backward returns."""

    @staticmethod
    def forward(ctx, hidden, token_rows, inverse, top_k, offsets, a1, b1, a2, b2, s1, s2, folded, combine_kernel,
                triton_glu, row_weights=None, skip_output=False, sum_rows=False):
        buffers = folded
        dtype = buffers.gate_up.dtype
        buffers.load_factors(a1, b1, a2, b2)  # copy_ casts to the buffers' dtype
        p = buffers.padded
        hidden_size = hidden.shape[-1]
        two_i = buffers.gate_up.shape[1] - p
        inter = two_i // 2
        rows = token_rows.numel()
        # [x | s * x A1^T]: the gather writes the rows straight into the first H columns
        x1 = hidden.new_empty(rows, hidden_size + p, dtype=dtype)
        torch.index_select(hidden.to(dtype), 0, token_rows, out=x1[:, :hidden_size])
        xa1 = _grouped(x1[:, :hidden_size], buffers.gate_up[:, two_i:, :hidden_size].transpose(1, 2), offsets)
        torch.mul(xa1, s1, out=x1[:, hidden_size:])
        y1 = _grouped(x1, buffers.gate_up[:, :two_i].transpose(1, 2), offsets)  # [rows, 2I]: gate | up
        gate, up = y1[:, :inter], y1[:, inter:]
        x2 = hidden.new_empty(rows, inter + p, dtype=dtype)
        # the gate's output, written beside its bottleneck
        glu = _triton_glu() if triton_glu and _triton_glu_applies(y1) else None
        if glu is not None:  # one pass (the routing weight too); the backward recomputes silu(gate), not kept
            glu.glu_forward(gate, up, False, out=x2[:, :inter], row_scale=row_weights)
            silu_gate = None
        else:
            silu_gate = torch.nn.functional.silu(gate)
            if row_weights is None:
                torch.mul(silu_gate, up, out=x2[:, :inter])
            else:  # as autograd would: the gated product rounded, then times the weight
                torch.mul(silu_gate * up, row_weights.unsqueeze(-1), out=x2[:, :inter])
        xa2 = _grouped(x2[:, :inter], buffers.down_a.transpose(1, 2), offsets)
        torch.mul(xa2, s2, out=x2[:, inter:])
        # the Triton GLU's backward writes the gated activations again (the same values, in its one pass),
        # so x2 ([rows, I + p]) is not kept, only the down projection's bottleneck xa2 ([rows, p])
        kept_x2, kept_xa2 = (None, xa2) if glu is not None else (x2, None)
        if skip_output:  # a recompute pass that discards the output: everything saved below is made, not it
            out = x2.new_empty(rows // top_k if sum_rows else rows, hidden_size,
                               dtype=hidden.dtype if sum_rows else dtype)
        else:
            out = _grouped(x2, buffers.down.transpose(1, 2), offsets)  # [rows, H]
            if sum_rows:
                out = lora_experts.sum_token_rows(out, inverse, top_k, hidden.dtype, combine_kernel)
        ctx.save_for_backward(x1, y1, silu_gate, kept_x2, kept_xa2, inverse, offsets, row_weights,
                              token_rows if sum_rows else None)
        ctx.folded, ctx.top_k, ctx.scalings, ctx.combine_kernel = buffers, top_k, (s1, s2), combine_kernel
        ctx.dtypes = (hidden.dtype, a1.dtype, b1.dtype, a2.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Each saved tensor is dropped (del) as soon as its last use is done: under a checkpoint's
        # recompute (how the bench trains) the recomputed tensors are referenced only here once unpacked,
        # so each is freed then, and the activations of the routed rows are not all live at once.
        x1, y1, silu_gate, x2, xa2, inverse, offsets, row_weights, token_rows = ctx.saved_tensors
        buffers, (s1, s2) = ctx.folded, ctx.scalings
        hidden_dtype, a1_dtype, b1_dtype, a2_dtype, b2_dtype = ctx.dtypes
        r, p = buffers.rank, buffers.padded
        num_experts, two_i_p, hidden_p = buffers.gate_up.shape
        two_i, hidden_size = two_i_p - p, hidden_p - p
        inter = two_i // 2
        if token_rows is not None:  # the token sum's backward: each row's gradient is its token's
            grad_out = grad_out.to(y1.dtype).index_select(0, token_rows)
            del token_rows
        grad_out = grad_out.to(y1.dtype).contiguous()

        # down: [d act | d(s xa2)] = dy @ [W2 | B2^T] in one grouped GEMM
        # (d B2 first: the rows' gradient is then dead once the GEMM has read it)
        xa2_scaled = x2[:, inter:] if x2 is not None else xa2 * s2  # as the forward wrote it beside the activations
        d_b2 = _grouped_over_rows(xa2_scaled.t(), grad_out, offsets)  # [E, p, H]
        del xa2_scaled, xa2
        dx2 = _grouped(grad_out, buffers.down, offsets)
        del grad_out
        dxa2 = dx2[:, inter:] * s2
        d_act = dx2[:, :inter]
        d_act += _grouped(dxa2, buffers.down_a, offsets)
        if x2 is not None:
            d_a2 = _grouped_over_rows(x2[:, :inter].t(), dxa2, offsets)  # [E, I, p]
            del x2, dxa2

        # SiLU gate (as autograd: the product's two gradients, then SiLU's backward),
        # written into [d gate | d up | d(s xa1)], the operand of gate/up's folded backward
        dy1 = torch.empty(y1.shape[0], two_i + p, dtype=y1.dtype, device=y1.device)
        d_weights = None
        if silu_gate is None:  # the Triton GLU's backward: one pass, the weight's gradient too where it scaled
            # the gated activations (x2's first columns, not kept) are written over d_act, each value read first
            grads = _triton_glu().glu_backward(d_act, y1[:, :inter], y1[:, inter:], False,
                                               out=(dy1[:, :inter], dy1[:, inter:two_i]), h_out=d_act,
                                               row_scale=row_weights)
            d_weights = grads[2] if row_weights is not None else None
            d_a2 = _grouped_over_rows(d_act.t(), dxa2, offsets)  # d A2 = h^T (s dy B2^T): [E, I, p]
            del dxa2
        else:
            if row_weights is not None:  # the product's two gradients: the weight's, then the gated product's
                d_weights = (d_act * (silu_gate * y1[:, inter:])).sum(dim=-1)
                d_act = d_act * row_weights.unsqueeze(-1)
            torch.mul(d_act, silu_gate, out=dy1[:, inter:two_i])
            torch.ops.aten.silu_backward.grad_input(d_act * y1[:, inter:], y1[:, :inter], grad_input=dy1[:, :inter])
        del d_act, dx2, y1, silu_gate
        dxa1 = _grouped(dy1[:, :two_i], buffers.gate_up[:, :two_i, hidden_size:], offsets)
        torch.mul(dxa1, s1, out=dy1[:, two_i:])
        del dxa1
        d_b1 = _grouped_over_rows(x1[:, hidden_size:].t(), dy1[:, :two_i], offsets)  # [E, p, 2I]
        d_a1 = _grouped_over_rows(x1[:, :hidden_size].t(), dy1[:, two_i:], offsets)  # [E, H, p]
        del x1

        d_hidden = None
        if ctx.needs_input_grad[0]:
            # gate/up: dx = [dy | s dy B1] @ [W1 ; A1] in one grouped GEMM, then each token's k rows summed
            dx1 = _grouped(dy1, buffers.gate_up[:, :, :hidden_size], offsets)
            del dy1
            d_hidden = lora_experts.sum_token_rows(dx1, inverse, ctx.top_k, hidden_dtype, ctx.combine_kernel)
            del dx1

        def a_grad(d_a, dtype):  # [E, in, p] -> peft's lora_A.weight [E * r, in]
            return d_a[:, :, :r].transpose(1, 2).reshape(num_experts * r, -1).to(dtype)

        def b_grad(d_b, dtype):  # [E, p, out] -> peft's lora_B.weight [out, r * E]
            return d_b[:, :r].permute(2, 1, 0).reshape(d_b.shape[-1], r * num_experts).to(dtype)

        if d_weights is not None:
            d_weights = d_weights.to(row_weights.dtype)
        return (d_hidden, None, None, None, None, a_grad(d_a1, a1_dtype), b_grad(d_b1, b1_dtype),
                a_grad(d_a2, a2_dtype), b_grad(d_b2, b2_dtype), None, None, None, None, None, d_weights, None,
                None)


def _triton_glu():
    """:mod:`plait_kernels.ops.glu`, or None without Triton."""
    try:
        from plait_kernels.ops import glu
    except ImportError:
        return None
    return glu


def _triton_glu_applies(rows) -> bool:
    """Whether Plait's Triton GLU runs on these rows: CUDA tensors (or the CPU
    under ``TRITON_INTERPRET=1``, the tests), a float dtype, and not inside
    ``torch.compile`` (the folded path is not taken there anyway)."""
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return False
    if rows.device.type != "cuda":
        from plait_kernels.selection import interpreter_enabled

        if rows.device.type != "cpu" or not interpreter_enabled():
            return False
    return _triton_glu() is not None


def folded_routed_rows(adapters: dict, folded: FoldedWeights, hidden_states, token_rows, inverse, top_k: int,
                       offsets, combine_kernel: bool = False, triton_glu: bool = False, row_weights=None,
                       skip_output: bool = False, sum_rows: bool = False):
    """The down projection of every routed row (expert order) through
    :class:`FoldedExperts`. ``combine_kernel``: its backward sums each token's
    row gradients with the Triton combine where it applies. ``triton_glu``:
    the SiLU gate (forward and backward) by Plait's Triton GLU where it
    applies (:func:`_triton_glu_applies`), one pass each way writing straight
    into the folded operands, else PyTorch's ops. ``row_weights`` (sorted
    order): the gated activations times them (in the Triton GLU's one pass
    where it runs), and their gradient from the gate's backward.
    ``skip_output``: leave the down projection's GEMM out (its output is
    uninitialised), for a recompute pass whose output is discarded.
    ``sum_rows``: return each token's rows summed, ``[T, H]`` (the routing
    weights must then be ``row_weights``); :class:`FoldedExperts` says why
    here."""
    (w1, n1), (w2, n2) = adapters["gate_up_proj"], adapters["down_proj"]
    return FoldedExperts.apply(hidden_states, token_rows, inverse, top_k, offsets,
                               w1.lora_A[n1].weight, w1.lora_B[n1].weight, w2.lora_A[n2].weight,
                               w2.lora_B[n2].weight, w1.scaling[n1], w2.scaling[n2], folded, combine_kernel,
                               triton_glu, row_weights, skip_output, sum_rows)
