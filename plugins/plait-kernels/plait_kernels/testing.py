"""Helpers for comparing a kernel with its reference, forward and backward."""

from __future__ import annotations


def outputs_and_grads(fn, inputs, seed: int = 1):
    """Call ``fn(*inputs)`` on fresh leaf copies of ``inputs``, backprop a fixed
    random projection of every output (so each output element matters, unlike
    ``.sum()``) and return ``(outputs, grads of the floating-point inputs)``."""
    import torch

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    total.backward()
    return [o.detach() for o in outputs], [t.grad for t in leaves if t.requires_grad]


def gpu_test(fn):
    """Mark a test ``gpu`` and skip it when CUDA is absent."""
    import pytest
    import torch

    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn)
    return pytest.mark.gpu(fn)


# ---------------------------------------------------------------- LoRA fast paths

#: what a LoRA test adapts when it does not say
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(model_dir, dtype, device, targets=ALL_LINEAR, dropout=0.0, load_in_4bit=False):
    """A peft LoRA model (r=4) over the model in ``model_dir``, optionally on a
    bitsandbytes 4-bit base (nf4, double quant, ``dtype`` compute), with random
    ``B`` matrices: peft starts them at zero, which would hide every error in
    the LoRA terms."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                     device_map={"": device})
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=targets)
    model = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_((torch.randn(param.shape, generator=gen) * 0.1).to(param.dtype))
    return model


def with_dequantized_bases(model):
    """``model`` with each 4-bit base replaced by a dense ``nn.Linear`` holding
    its dequantized weight: the exact arithmetic a fused 4-bit path must reproduce."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and type(base).__name__ == "Linear4bit":
            dense = torch.nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device)
            dense.weight = torch.nn.Parameter(dequantize_4bit(base.weight.data, base.weight.quant_state),
                                              requires_grad=False)
            module.base_layer = dense
    return model


def loss_and_lora_grads(model, ids):
    """Mean next-token loss over ``ids`` (through core's loss step) and the
    gradient of every trainable parameter."""
    from plait.model.head import chunked_linear_cross_entropy

    model.zero_grad(set_to_none=True)
    base = model.get_base_model()
    hidden = base.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, base.config.hidden_size)
    loss, n = chunked_linear_cross_entropy(hidden, base.lm_head.weight, ids[:, 1:].reshape(-1))
    (loss / n).backward()
    return loss.detach() / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(got, want, tol: float) -> None:
    """``got`` and ``want`` are :func:`loss_and_lora_grads` results; gradients
    are compared relative to each tensor's largest entry."""
    import torch

    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")


class CountCalls:
    """``with CountCalls(SomeFunction) as calls:`` counts ``SomeFunction.apply``
    calls (a fused path that silently fell back would count zero) and keeps each
    call's arguments in ``calls.args``."""

    def __init__(self, function):
        self.function, self.args = function, []

    @property
    def count(self) -> int:
        return len(self.args)

    def __enter__(self):
        apply = self._apply = self.function.apply

        def counting(*args):
            self.args.append(args)
            return apply(*args)

        self.function.apply = counting
        return self

    def __exit__(self, *exc):
        self.function.apply = self._apply
