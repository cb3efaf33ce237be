"""The fused LoRA MLP's kept stacked gate/up weight (``lora_mlp_fold``): the bases live in
one buffer, no call copies them, training is bit-identical to the per-call build, and a
replaced weight or a merge still gives peft's values."""

import copy
from types import SimpleNamespace

import pytest
import torch
from plait.testing import make_tiny_model
from plait_kernels import lora_mlp
from plait_kernels.lora_mlp_fold import FOLD_ATTRIBUTE, unfold_gate_up
from plait_kernels.patch import patch
from plait_kernels.testing import CountCalls, assert_same_loss_and_grads, lora_model, loss_and_lora_grads
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")

MLP_ONLY = ["gate_proj", "up_proj", "down_proj"]
RANK = 4  # lora_model's


def _patched(model, fold):
    cfg = SimpleNamespace(torch_compile=False, plugin_manager=None, lora_mlp_fold=fold)
    patch(cfg, model, dict(rms_norm=None, rope=None, glu="triton", loss=None))
    return model


def _mlps(model):
    return [layer.mlp for layer in model.get_base_model().model.layers]


def _ids(model, device):
    return torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)


class StackedWeights(TorchDispatchMode):
    """Counts the new tensors of the stacked weight's shape that ops allocate (the
    Triton interpreter's own ``set_`` calls re-point existing ones: not counted)."""

    ALLOCATING = {"empty", "empty_strided", "new_empty", "new_empty_strided", "zeros", "new_zeros", "cat", "clone"}

    def __init__(self, shape):
        super().__init__()
        self.shape, self.made = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.ALLOCATING and tuple(getattr(out, "shape", ())) == self.shape:
            self.made += 1
        return out


def test_the_bases_become_views_of_one_buffer_with_their_values(tiny_dir, device):
    model = lora_model(tiny_dir, torch.float32, device, targets=MLP_ONLY)
    before = [(m.gate_proj.base_layer.weight.detach().clone(), m.up_proj.base_layer.weight.detach().clone())
              for m in _mlps(model)]
    _patched(model, None)  # the default in a single-process run
    for mlp, (w_g, w_u) in zip(_mlps(model), before):
        buffer = getattr(mlp, FOLD_ATTRIBUTE).buffer
        inter, hidden = w_g.shape
        assert buffer.shape == (2 * inter, hidden + 2 * RANK)
        gate, up = mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight
        assert gate.data_ptr() == buffer.data_ptr() and up.data_ptr() == buffer[inter:].data_ptr()
        assert not gate.requires_grad and not up.requires_grad
        assert torch.equal(gate, w_g) and torch.equal(up, w_u)


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("fold", [None, False])
def test_no_call_copies_the_bases_when_folded(tiny_dir, device, fold, checkpointed):
    """Folded, no forward, recompute or backward makes a ``[2 * inter, hidden + r_g + r_u]``
    tensor (the backward gets the parameters themselves back from autograd, so the buffer's
    check holds there too); built per call (``lora_mlp_fold: false``) each of them makes one."""
    from plait.model.recompute import enable_gradient_checkpointing

    model = _patched(lora_model(tiny_dir, torch.float32, device, targets=MLP_ONLY), fold)
    if checkpointed:
        enable_gradient_checkpointing(model, True)
        model.train()
    config = model.config
    layers, passes = config.num_hidden_layers, 3 if checkpointed else 2
    with StackedWeights((2 * config.intermediate_size, config.hidden_size + 2 * RANK)) as stacked:
        with CountCalls(lora_mlp.LoRAGLUMLPFunction) as calls:
            loss_and_lora_grads(model, _ids(model, device))
    assert calls.count == layers * (passes - 1)  # the fused path ran (forward, and the recompute)
    assert stacked.made == (0 if fold is None else passes * layers)


def test_folded_equals_peft_and_a_replaced_weight_takes_the_per_call_build(tiny_dir, device):
    reference = lora_model(tiny_dir, torch.float32, device, targets=MLP_ONLY)
    model = _patched(copy.deepcopy(reference), None)
    ids = _ids(model, device)
    assert_same_loss_and_grads(loss_and_lora_grads(model, ids), loss_and_lora_grads(reference, ids), 1e-5)
    # a weight replaced under the module (as peft's safe merge or a dtype move does): the
    # buffer no longer backs it, so that call builds the weight from the new values
    mlp = _mlps(model)[0]
    fold = getattr(mlp, FOLD_ATTRIBUTE)
    new = mlp.gate_proj.base_layer.weight.detach() * 1.5
    mlp.gate_proj.base_layer.weight.data = new.clone()
    _mlps(reference)[0].gate_proj.base_layer.weight.data = new.clone()
    assert not fold.backs(mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight,
                          mlp.gate_proj.lora_B["default"].weight, mlp.up_proj.lora_B["default"].weight, torch.float32)
    assert_same_loss_and_grads(loss_and_lora_grads(model, ids), loss_and_lora_grads(reference, ids), 1e-5)


def test_a_merged_folded_model_unfolds_saves_and_loads_as_the_unfolded_one(tiny_dir, tmp_path, device):
    """peft's merge writes ``W + s B A`` into the views; transformers' save refuses
    weights that share a storage without being contiguous, so ``unfold_gate_up``
    gives them their own again, and the merged model saves and loads back in plain
    transformers with the logits of the unfolded model merged the same way."""
    from transformers import AutoModelForCausalLM

    reference = lora_model(tiny_dir, torch.float32, device, targets=MLP_ONLY)
    model = _patched(copy.deepcopy(reference), None)
    ids = _ids(model, device)
    merged = model.merge_and_unload()
    assert unfold_gate_up(merged) == merged.config.num_hidden_layers
    mlp = merged.model.layers[0].mlp
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    assert gate.is_contiguous() and up.is_contiguous()
    assert gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()
    assert not hasattr(mlp, FOLD_ATTRIBUTE)
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).to(device)
    want = reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")
def test_training_with_the_kept_weight_is_bit_identical(tmp_path, loop_losses):
    """Two optimizer steps of two checkpointed micro-batches in bfloat16: each call
    writes the updated ``B`` into the kept buffer, and the losses equal the per-call
    build's to the bit."""
    import plait_peft.plugin as peft_plugin

    model_dir = make_tiny_model(tmp_path / "model")

    def losses(fold):
        return loop_losses(model_dir, tmp_path / str(fold), {
            "plait_kernels": "triton", "torch_dtype": "bfloat16", "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "lora_target_linear": True, "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True, "max_steps": 2, "lora_mlp_fold": fold,
        }, plugins=[peft_plugin], rows=2)

    per_call, kept = losses(False), losses(True)
    assert len(kept) == 2 and kept == per_call
    assert kept[1] != kept[0]  # the second step ran on updated factors
