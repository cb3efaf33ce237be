"""LoRA on fused MoE experts, applied to the routed tokens only.

peft reaches the fused 3D expert weights (``mlp.experts.gate_up_proj`` /
``down_proj``, ``[experts, out, in]``) through ``target_parameters``: a
``ParamWrapper`` per parameter (nested when both are targeted) that, on every
forward, parametrizes the weight as ``W + s * B_e @ A_e`` for *all* experts and
then lets the experts module run. That materializes a full delta weight per
expert each step (a batched matmul over every expert plus copies the size of
the whole expert stack), although each token only meets its top-k experts.

Here the outermost ``ParamWrapper`` of an experts module gets a forward that
sorts the (token, expert) pairs by expert exactly as transformers'
``grouped_mm`` experts do, and computes per projection::

    y = x @ W_e.T + s * (x @ A_e.T) @ B_e.T

with three grouped matmuls over the same offsets, never forming ``W_e + B_e A_e``.
The parameters stay peft's (same names, same layout), so adapters save, load
and merge as before. Any case this path does not cover (several active
adapters, merged or disabled adapters, biases, expert parallelism, a parameter
other than the two, another ``experts_implementation``) calls peft's own
forward, decided per call.

``grouped_matmul`` uses torch's grouped GEMM where it can run (CUDA sm80+, or
the CPU kernel; both need 16-byte aligned strides) and otherwise an exact
per-expert loop, :func:`grouped_matmul_reference`.
"""

from __future__ import annotations

import torch

#: the fused expert parameters this path computes (transformers' gated experts layout)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")

#: sparse MoE blocks whose experts' output reaches only a view and sums (a shared
#: expert's add) before the decoder layer adds it to the residual and returns:
#: nothing in the layer saves it for the backward, so a checkpoint's recompute
#: pass, whose layer output is discarded, may leave it uncomputed
OUTPUT_FEEDS_RESIDUAL_BLOCKS = ("Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "MixtralSparseMoeBlock")


def grouped_matmul_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[rows of group g] = x[rows of group g] @ weight[g]``, one matmul per
    group; rows at and past ``offsets[-1]`` are zero. ``x`` is ``[rows, in]``,
    ``weight`` ``[groups, in, out]``, ``offsets`` the cumulative row counts."""
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    ends = offsets.tolist()
    start = 0
    for group, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end] @ weight[group]
        start = end
    return out


def _aligned(t: torch.Tensor) -> bool:
    # torch's grouped GEMM reads its operands as 16-byte aligned rows or columns
    strides = [s for s, n in zip(t.stride()[-2:], t.shape[-2:]) if n > 1 and s != 1]
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in strides)


def _grouped_mm_function():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs these operands: it exists, the device
    has it (CPU, or CUDA sm80+), and both operands and the output rows (which
    the backward reads as its gradient) are 16-byte aligned."""
    if _grouped_mm_function() is None or x.dtype != weight.dtype:
        return False
    if torch.compiler.is_compiling() and weight.dtype != torch.bfloat16:
        return False  # as transformers: inductor lowers the grouped GEMM for bf16 only
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or not hasattr(torch.nn.functional, "grouped_mm"):
        return False  # torch < 2.10: the CPU grouped GEMM is missing or unreliable
    output_row = weight.shape[-1] * weight.element_size()
    return _aligned(x) and _aligned(weight) and output_row % 16 == 0


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped ``x @ weight[g]`` by torch's grouped GEMM where it applies, else
    :func:`grouped_matmul_reference` (same result, one matmul per group)."""
    if grouped_mm_applies(x, weight):
        return _grouped_mm_function()(x, weight, offs=offsets)
    return grouped_matmul_reference(x, weight, offsets)


def lora_factors(wrapper, adapter: str, dtype: torch.dtype):
    """peft's ``lora_A`` / ``lora_B`` of one ``ParamWrapper`` as grouped-matmul
    operands: ``(A [experts, in, r], B [experts, r, out], scaling)`` with
    ``x @ A[e] @ B[e] * scaling`` the LoRA term of expert ``e``.

    peft stores ``lora_A.weight`` as ``[experts * r, in]`` (expert-major rows)
    and ``lora_B.weight`` as ``[out, r * experts]`` (rank-major columns); both
    come out column-major per expert, the layout the grouped GEMM reads."""
    experts = wrapper.num_experts
    weight_a = wrapper.lora_A[adapter].weight.to(dtype)
    weight_b = wrapper.lora_B[adapter].weight.to(dtype)
    a = weight_a.reshape(experts, -1, weight_a.shape[-1]).transpose(1, 2)  # [E, in, r]
    b = weight_b.reshape(weight_b.shape[0], -1, experts).permute(2, 0, 1).contiguous().transpose(1, 2)  # [E, r, out]
    return a, b, wrapper.scaling[adapter]


def project(x, weight, factors, offsets, is_transposed: bool):
    """One expert projection of the sorted rows: base grouped matmul plus the
    LoRA term through the rank-r bottleneck (``factors`` None: base only)."""
    base = weight if is_transposed else weight.transpose(-2, -1)  # [E, in, out]
    x = x.to(base.dtype)
    out = grouped_matmul(x, base, offsets)
    if factors is not None:
        a, b, scaling = factors
        # the scaling multiplies the rank-r bottleneck (rows x r), not the rows x out product: the same
        # sum up to rounding, one small kernel instead of a pass over the projection's whole output
        out = out + grouped_matmul(grouped_matmul(x, a, offsets) * scaling, b, offsets)
    return out


class _RoutedRows(torch.autograd.Function):
    """``hidden[token_rows]`` (``token_rows = perm // top_k``): each token's row
    once per expert it was routed to, in expert order. Indexing would do the
    same, but its backward scatter-adds the rows' gradients into their tokens
    (an accumulating index write: atomics or a sort on CUDA, rounding to bf16
    after each add). Each token has exactly ``top_k`` rows, so the backward
    here is :func:`sum_token_rows` (float32 sums, no atomics)."""

    @staticmethod
    def forward(ctx, hidden, token_rows, inverse, top_k, combine_kernel=False):
        ctx.save_for_backward(inverse)
        ctx.top_k, ctx.dtype, ctx.combine_kernel = top_k, hidden.dtype, combine_kernel
        return hidden.index_select(0, token_rows)

    @staticmethod
    def backward(ctx, grad_rows):
        inverse, = ctx.saved_tensors
        return sum_token_rows(grad_rows, inverse, ctx.top_k, ctx.dtype, ctx.combine_kernel), None, None, None, None


class _TokenRowSum(torch.autograd.Function):
    """Each token's ``k`` rows (expert order) summed, unweighted: the end of
    the routed forward when the routing weights were already applied to the
    gated activations (``weight_in_gate``). The adjoint of :class:`_RoutedRows`:
    its backward is one gather of the output gradient, ``d_out[token_rows]``,
    where the weighted combine's is a gather, a product with the weights and a
    product with the saved rows (for the weights' gradient, which the gate's
    backward gives here from ``[tokens * k, intermediate]`` tensors)."""

    @staticmethod
    def forward(ctx, rows, token_rows, inverse, top_k, out_dtype, combine_kernel, skip_output=False):
        ctx.save_for_backward(token_rows)
        ctx.rows_dtype = rows.dtype
        if skip_output:  # a recompute pass that discards the output (routed_lora_experts_forward)
            return rows.new_empty(rows.shape[0] // top_k, rows.shape[-1], dtype=out_dtype)
        return sum_token_rows(rows, inverse, top_k, out_dtype, combine_kernel)

    @staticmethod
    def backward(ctx, grad_out):
        token_rows, = ctx.saved_tensors
        return grad_out.to(ctx.rows_dtype).index_select(0, token_rows), None, None, None, None, None, None


def sum_token_rows(rows, inverse, top_k: int, dtype, combine_kernel: bool = False):
    """``out[t] = sum over slot of rows[inverse[t * k + slot]]`` in ``dtype``:
    each token's ``k`` rows (expert order) summed. With ``combine_kernel`` where
    it applies, the Triton combine with unit weights (one read of the rows,
    float32 sums); else the rows put back in (token, k) order by a gather and
    summed (float32 accumulation)."""
    if combine_kernel:
        ones = torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device)
        if combine_kernel_applies(rows, ones):
            from plait_kernels.ops.moe_combine import moe_combine_forward

            return moe_combine_forward(rows, ones, inverse, top_k, dtype)
    return rows.index_select(0, inverse).view(-1, top_k, rows.shape[-1]).sum(dim=1).to(dtype)


class _GatedRows(torch.autograd.Function):
    """transformers' default gate of gated SiLU experts on the gate/up
    projection's output ``[rows, 2I]``: ``silu(gate) * up`` of its two halves,
    times each row's routing weight when ``row_weights`` is given. With
    ``triton`` Plait's Triton GLU does it, one pass each way (the weight in
    the same pass); else PyTorch's ops. Either way the backward writes
    ``d_gate`` and ``d_up`` into one ``[rows, 2I]`` buffer, where autograd
    through the halves would concatenate them, and gives the weights'
    gradient ``sum(d_out * silu(gate) * up)`` per row."""

    @staticmethod
    def forward(ctx, gate_up, row_weights, triton):
        inter = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        ctx.save_for_backward(gate_up, row_weights)
        ctx.triton = triton
        if triton:
            from plait_kernels.ops.glu import glu_forward

            return glu_forward(gate, up, False, row_scale=row_weights)
        gated = torch.nn.functional.silu(gate) * up
        return gated if row_weights is None else scale_rows(gated, row_weights)

    @staticmethod
    def backward(ctx, d_out):
        gate_up, row_weights = ctx.saved_tensors
        inter = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        d_gate_up = torch.empty_like(gate_up)
        d_weights = None
        if ctx.triton:
            from plait_kernels.ops.glu import glu_backward

            grads = glu_backward(d_out, gate, up, False, out=(d_gate_up[:, :inter], d_gate_up[:, inter:]),
                                 row_scale=row_weights)
            d_weights = grads[2] if row_weights is not None else None
        else:
            silu_gate = torch.nn.functional.silu(gate)
            if row_weights is not None:  # as autograd through the product: the weight's gradient, then the rows'
                d_weights = (d_out * (silu_gate * up)).sum(dim=-1)
                d_out = scale_rows(d_out, row_weights)
            torch.mul(d_out, silu_gate, out=d_gate_up[:, inter:])
            torch.ops.aten.silu_backward.grad_input(d_out * up, gate, grad_input=d_gate_up[:, :inter])
        if d_weights is not None:
            d_weights = d_weights.to(row_weights.dtype)
        return d_gate_up, d_weights, None


def gated_rows(experts, gate_up, row_weights=None, triton_glu: bool = False):
    """The experts' gate on the gate/up output, times ``row_weights`` when
    given: :class:`_GatedRows` for transformers' default SiLU gate (the Triton
    GLU with ``triton_glu`` where it applies), else (another gate, or inside
    ``torch.compile``) the module's own ``_apply_gate`` and a product."""
    from plait_kernels.lora_experts_fold import _is_default_silu_gate, _triton_glu_applies

    # under torch.compile inductor fuses the module's own gate and product itself
    if _is_default_silu_gate(experts) and gate_up.shape[-1] % 2 == 0 and not torch.compiler.is_compiling():
        return _GatedRows.apply(gate_up, row_weights, bool(triton_glu and _triton_glu_applies(gate_up)))
    out = experts._apply_gate(gate_up)
    return out if row_weights is None else scale_rows(out, row_weights)


def scale_rows(rows, row_weights):
    """Each routed row times its routing weight, in the rows' dtype (the
    product rounded once, as torch's multiply of the two dtypes rounds it)."""
    return (rows * row_weights.unsqueeze(-1)).to(rows.dtype)


def routed_lora_experts_forward(experts, adapters: dict, hidden_states, top_k_index, top_k_weights,
                                combine_kernel: bool = False, fold: bool = False, triton_glu: bool = False,
                                weight_in_gate: bool = True, skip_output: bool = False):
    """transformers' grouped_mm experts forward (gated, no bias, no expert
    parallelism) with the LoRA term added per projection; ``adapters`` maps a
    parameter name to ``(wrapper, adapter name)``. ``combine_kernel``: weight
    and sum each token's rows with the Triton combine where it applies
    (:func:`combine_kernel_applies`), else :func:`combine_reference`.
    ``fold``: compute the rows with each LoRA term folded into its
    projection's grouped GEMM where the module was folded at install
    (:mod:`plait_kernels.lora_experts_fold`; ``triton_glu``: its SiLU gate by
    Plait's Triton GLU where that applies), else as below.

    ``weight_in_gate`` (``moe_weight_in_gate``, on by default): each row's
    routing weight multiplies its gated activation (``[rows, intermediate]``,
    inside the Triton GLU where that runs) instead of the down projection's
    output (``[rows, hidden]``): the down projection is linear and has no
    bias, so ``w * (h @ W2) = (w * h) @ W2``. The rows are then summed per
    token unweighted (:class:`_TokenRowSum`), whose backward is one gather.

    ``skip_output`` (with ``weight_in_gate``: a checkpoint's recompute pass
    whose output nothing saves, :func:`skips_output`): every tensor the
    backward needs is saved as usual, and what only makes the output is left
    out: the token sum, and on the folded path the down projection's grouped
    GEMM; the returned tensor is uninitialised."""
    num_top_k = top_k_index.size(-1)
    routing_weights = top_k_weights.reshape(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    # each sorted row's token, built once: the gather of the rows and the backward of their sum read it
    token_rows = perm // num_top_k
    # histc, as transformers does (bincount would sync); CPU histc needs floats
    counted = expert_ids.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids.int()
    per_expert = torch.histc(counted, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    row_weights = routing_weights[perm] if weight_in_gate else None
    folded = _folded_weights(experts, adapters) if fold else None
    if folded is not None:
        from plait_kernels.lora_experts_fold import folded_routed_rows

        # with the weights in the gate, the token sum too (its backward then frees the rows' gradient early)
        out = folded_routed_rows(adapters, folded, hidden_states, token_rows, inverse, num_top_k, offsets,
                                 combine_kernel=combine_kernel, triton_glu=triton_glu, row_weights=row_weights,
                                 skip_output=skip_output and weight_in_gate, sum_rows=weight_in_gate)
        if weight_in_gate:
            return out
    else:
        out = _unfolded_routed_rows(experts, adapters, hidden_states, token_rows, inverse, num_top_k, offsets,
                                    row_weights=row_weights, combine_kernel=combine_kernel, triton_glu=triton_glu)
    if weight_in_gate:
        return _TokenRowSum.apply(out, token_rows, inverse, num_top_k, hidden_states.dtype, combine_kernel,
                                  skip_output)
    if combine_kernel and combine_kernel_applies(out, routing_weights):
        return _moe_combine()(out, routing_weights, inverse, num_top_k, hidden_states.dtype)
    return combine_reference(out, routing_weights, perm, num_top_k, hidden_states.dtype)


def _folded_weights(experts, adapters):
    from plait_kernels.lora_experts_fold import fold_applies

    return fold_applies(experts, adapters)


def _unfolded_routed_rows(experts, adapters, hidden_states, token_rows, inverse, num_top_k, offsets,
                          row_weights=None, combine_kernel: bool = False, triton_glu: bool = False):
    """The down projection of every routed row (expert order): per projection
    a base grouped matmul plus the LoRA term through its bottleneck;
    ``row_weights`` (sorted order): the gated activations times them
    (:func:`gated_rows`, by the Triton GLU with ``triton_glu`` where it applies)."""
    rows = _RoutedRows.apply(hidden_states, token_rows, inverse, num_top_k, combine_kernel)

    def factors(name, weight):
        if name not in adapters:
            return None
        wrapper, adapter = adapters[name]
        return lora_factors(wrapper, adapter, weight.dtype)

    gate_up = experts.gate_up_proj
    out = project(rows, gate_up, factors("gate_up_proj", gate_up), offsets, experts.is_transposed)
    out = gated_rows(experts, out, row_weights, triton_glu)
    down = experts.down_proj
    return project(out, down, factors("down_proj", down), offsets, experts.is_transposed)


def combine_reference(rows, routing_weights, perm, top_k: int, out_dtype):
    """The experts' output rows (expert-sorted) times their routing weights,
    summed per token: ``[tokens, hidden]`` in ``out_dtype``. PyTorch code, the
    reference for :func:`plait_kernels.ops.moe_combine.moe_combine` (which
    computes the same without the ``[tokens * k, hidden]`` intermediates)."""
    out = rows * routing_weights[perm].unsqueeze(-1)  # as transformers: the router weights' dtype (fp32 sums)
    restored = torch.empty_like(out)
    restored[perm] = out  # back to (token, k) order (an index write: its backward is a plain gather)
    return restored.view(-1, top_k, rows.shape[-1]).sum(dim=1).to(out_dtype)


_COMBINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def combine_kernel_applies(rows, routing_weights) -> bool:
    """Whether the Triton combine (``moe_combine_kernel: true``) runs these
    tensors: CUDA tensors (or the CPU under ``TRITON_INTERPRET=1``, the tests),
    Triton importable, float dtypes, and not inside ``torch.compile`` (which
    fuses the PyTorch code itself)."""
    if rows.dtype not in _COMBINE_DTYPES or routing_weights.dtype not in _COMBINE_DTYPES:
        return False
    if torch.compiler.is_compiling():
        return False
    if rows.device.type != "cuda":
        from plait_kernels.selection import interpreter_enabled

        if rows.device.type != "cpu" or not interpreter_enabled():
            return False
    return _moe_combine() is not None


def _moe_combine():
    """:func:`plait_kernels.ops.moe_combine.moe_combine`, or None without Triton."""
    try:
        from plait_kernels.ops.moe_combine import moe_combine
    except ImportError:
        return None
    return moe_combine


def _param_wrapper_class():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def _low_precision(dtype) -> bool:
    # peft adds float8 deltas in higher precision; leave those to peft
    return dtype.itemsize == 1


def expert_parallel(experts) -> bool:
    """Whether the experts are split over ranks (expert parallelism): other
    ranks' experts then come as sentinel ids this path does not handle.
    transformers 5.2x says so in ``_is_expert_parallel``; earlier 5.x releases
    have no flag (nor ``has_post_expert_norm``, absent meaning none) and shard
    the fused weights as DTensors when they split the experts."""
    flag = getattr(experts, "_is_expert_parallel", None)
    if flag is not None:
        return bool(flag)
    from torch.distributed.tensor import DTensor

    return any(isinstance(getattr(experts, name, None), DTensor) for name in EXPERT_PARAMETERS)


def routing_plan(outer) -> tuple[object, dict] | str:
    """``(experts module, {parameter: (wrapper, adapter)})`` when this chain of
    ``ParamWrapper`` can run the routed path now, else why not (peft's path)."""
    param_wrapper = _param_wrapper_class()
    adapters, module = {}, outer
    while isinstance(module, param_wrapper):
        name = module.parameter_name
        if name not in EXPERT_PARAMETERS or name in adapters:
            return f"adapts {name!r}, not only {' and '.join(EXPERT_PARAMETERS)} once each"
        if module.disable_adapters or module.merged:
            return "its adapter is disabled or merged"
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) > 1 or any(module.lora_bias.get(a) for a in active):
            return "several active adapters, or a LoRA bias"
        if active:
            adapters[name] = (module, active[0])
        module = module.base_layer
    experts = module
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation != "grouped_mm":
        return f"experts_implementation is {implementation!r}, not 'grouped_mm'"
    if not getattr(experts, "has_gate", False) or not hasattr(experts, "_apply_gate"):
        return "not gated experts (gate_up_proj)"
    if getattr(experts, "has_bias", True) or getattr(experts, "has_post_expert_norm", False):
        return "experts with biases or a post-expert norm"
    if expert_parallel(experts):
        return "expert parallelism"
    for name, (wrapper, _) in adapters.items():
        weight = getattr(experts, name, None)
        if weight is None or weight.ndim != 3 or wrapper.num_experts != experts.num_experts:
            return f"{name} is not a fused [experts, out, in] weight"
        if _low_precision(weight.dtype):
            return f"{name} is stored in {weight.dtype} (peft adds the update in higher precision)"
    return experts, adapters


def routed_adapters(outer) -> tuple[object, dict] | None:
    """:func:`routing_plan` when the routed path applies, else ``None``."""
    plan = routing_plan(outer)
    return None if isinstance(plan, str) else plan


def _routed_forward(self, *args, **kwargs):
    """Forward of an outermost expert ``ParamWrapper``: the routed path when it
    applies to this call, peft's otherwise."""
    found = routed_adapters(self) if not kwargs.get("adapter_names") else None
    if found is None or len(args) + len(kwargs) != 3:
        return type(self).forward(self, *args, **kwargs)
    experts, adapters = found
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]
    if len(values) != 3:
        return type(self).forward(self, *args, **kwargs)
    return routed_lora_experts_forward(experts, adapters, *values,
                                       combine_kernel=getattr(self, "_plait_moe_combine", False),
                                       fold=getattr(self, "_plait_fold", False),
                                       triton_glu=getattr(self, "_plait_triton_glu", False),
                                       weight_in_gate=getattr(self, "_plait_weight_in_gate", True),
                                       skip_output=skips_output(self))


def skips_output(wrapper) -> bool:
    """Whether this call of an outermost expert ``ParamWrapper`` may leave its
    output uncomputed: it sits in a block of :data:`OUTPUT_FEEDS_RESIDUAL_BLOCKS`
    (noted at install), and this is a non-reentrant checkpoint's recompute pass
    (``plait.model.recompute.is_recomputing``), outside ``torch.compile``."""
    if not getattr(wrapper, "_plait_output_feeds_residual", False) or torch.compiler.is_compiling():
        return False
    from plait.model.recompute import is_recomputing

    return is_recomputing()


def outermost_expert_wrappers(model) -> list:
    """The outermost ``ParamWrapper`` of each adapted experts module (peft
    nests one per targeted parameter)."""
    try:
        param_wrapper = _param_wrapper_class()
    except ImportError:  # no peft: no expert adapters
        return []
    wrappers = [m for m in model.modules() if isinstance(m, param_wrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    return [w for w in wrappers if id(w) not in inner and w.parameter_name in EXPERT_PARAMETERS]


def install_routed_lora_experts(model, combine_kernel: bool = False, fold: bool = False,
                                triton_glu: bool = False, weight_in_gate: bool = True) -> list[str]:
    """Give every outermost expert ``ParamWrapper`` of ``model`` that the
    routed path covers its forward; returns the class names of the experts
    modules it covers (:func:`left_to_peft` says why the others are not).
    ``combine_kernel``: end that forward with the Triton combine
    (``moe_combine_kernel``), stored on each wrapper. ``fold``
    (``lora_experts_fold``): move the frozen expert weights of each covered
    module that can be folded into the folded path's buffers
    (:func:`plait_kernels.lora_experts_fold.fold_experts`; :func:`not_folded`
    says why any was not); ``triton_glu``: its SiLU gate by Plait's Triton GLU
    where that applies (CUDA tensors). ``weight_in_gate`` (``moe_weight_in_gate``,
    on by default): the routing weights multiply the gated activations, not the
    down projection's output (:func:`routed_lora_experts_forward`)."""
    covered, moved_on_cuda = [], False
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for wrapper in outermost_expert_wrappers(model):
        found = routed_adapters(wrapper)
        if found is None:
            continue
        # an instance attribute: the module tree, its names and state dict stay peft's
        wrapper.forward = _routed_forward.__get__(wrapper)
        wrapper._plait_moe_combine = bool(combine_kernel)
        wrapper._plait_fold = bool(fold)
        wrapper._plait_triton_glu = bool(triton_glu)
        wrapper._plait_weight_in_gate = bool(weight_in_gate)
        block = parents.get(id(wrapper))
        wrapper._plait_output_feeds_residual = type(block).__name__ in OUTPUT_FEEDS_RESIDUAL_BLOCKS
        if fold:
            from plait_kernels.lora_experts_fold import fold_experts

            if fold_experts(*found) is not None and found[0].gate_up_proj.is_cuda:
                moved_on_cuda = True
        covered.append(type(wrapper.get_base_layer()).__name__)
    if fold and moved_on_cuda:
        # each buffer is a little larger than the weights it replaced, so the caching allocator
        # cannot reuse their freed blocks for the next buffer: hand them back to the device
        torch.cuda.empty_cache()
    return covered


def not_folded(model) -> list[tuple[str, str]]:
    """``(experts class, why)`` for each routed experts module whose LoRA
    terms are not folded into its grouped GEMMs (``lora_experts_fold``)."""
    from plait_kernels.lora_experts_fold import foldable

    left = []
    for wrapper in outermost_expert_wrappers(model):
        found = routed_adapters(wrapper)
        if found is not None and (why := foldable(*found)) is not None:
            left.append((type(wrapper.get_base_layer()).__name__, why))
    return left


def left_to_peft(model) -> list[tuple[str, str]]:
    """``(experts class, why)`` for each adapted experts module the routed
    path does not cover: they keep peft's forward."""
    left = []
    for wrapper in outermost_expert_wrappers(model):
        plan = routing_plan(wrapper)
        if isinstance(plan, str):
            left.append((type(wrapper.get_base_layer()).__name__, plan))
    return left
