"""selective_checkpointing: a checkpointed layer keeps its attention output instead of recomputing it.

Counted with a dispatch mode over one forward and backward of a tiny model on the CPU, where SDPA runs
``aten::_scaled_dot_product_flash_attention_for_cpu``: plain checkpointing runs attention twice a layer
(forward and recompute), selective checkpointing once, and every gradient is the same.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plait.errors import ConfigError
from plait.model.selective_checkpoint import is_attention_op
from plait.testing import build_run_config, make_tiny_model


class AttentionCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_attention_op(func):
            self.count[func.name()] += 1
        return func(*args, **(kwargs or {}))


def attention_calls_and_grads(model_dir, **keys):
    from plait.pipeline import setup_model

    # the model stays on the CPU, so no Triton kernels even on a machine with a GPU (auto would pick them there)
    cfg, pm = build_run_config({"base_model": str(model_dir), "gradient_checkpointing": True,
                                "plait_kernels": "off", **keys})
    torch.manual_seed(0)  # the same adapter initialisation in every call
    model = setup_model(cfg, pm, None, for_training=True, device=torch.device("cpu"))
    model.train()
    ids = torch.randint(5, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    calls = AttentionCalls()
    with calls:
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(calls.count.values()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sac") / "llama")  # two layers


@pytest.mark.parametrize("keys", [{}, {"gradient_checkpointing": "offload", "adapter": "lora",
                                      "lora_target_linear": True}])
def test_attention_is_kept_not_recomputed_and_gradients_are_unchanged(llama, keys):
    plain_calls, plain_grads = attention_calls_and_grads(llama, **keys)
    kept_calls, kept_grads = attention_calls_and_grads(llama, selective_checkpointing=True, **keys)
    assert (plain_calls, kept_calls) == (4, 2)
    assert kept_grads.keys() == plain_grads.keys() and kept_grads
    for name, grad in plain_grads.items():
        assert torch.equal(kept_grads[name], grad), name


def test_sliding_window_layers_recompute_their_attention_unless_asked(tmp_path):
    """A hybrid model (layer_types): the sliding layer's attention is recomputed by default."""
    model = make_tiny_model(tmp_path / "qwen2", family="qwen2", use_sliding_window=True, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"])
    assert attention_calls_and_grads(model, selective_checkpointing=True)[0] == 3
    assert attention_calls_and_grads(model, selective_checkpointing={"save_sliding_window": True})[0] == 2
    assert attention_calls_and_grads(model, selective_checkpointing={"recompute_layer_types": []})[0] == 2


@pytest.mark.parametrize("keys, message", [
    ({"selective_checkpointing": True}, "gradient_checkpointing is off"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True},
      "selective_checkpointing": True}, "needs non-reentrant checkpointing"),
    ({"gradient_checkpointing": True, "adapter": "lora", "lora_target_linear": True,
      "selective_checkpointing": {"save": ["attention", "aten::mm"]}}, r"\['aten::mm'\] keep matmul outputs"),
    ({"gradient_checkpointing": True, "selective_checkpointing": {"offload": True}}, "offload.: true is not available"),
])
def test_selective_checkpointing_rules(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config({"base_model": "m", **keys})
