"""Pieces of the wrapping that need no process group: layer discovery, the
per-layer TP plan (peft-aware), mixed-precision choice."""

import pytest
import torch

from plait.errors import ConfigError
from plait_parallel.fsdp import param_dtype
from plait_parallel.layers import decoder_layer_class, decoder_layers
from plait_parallel.tensor_parallel import DEFAULT_TP_PLAN, _layer_plan


class Cfg:
    """The two attributes these helpers read (no plugin manager: generic path)."""

    plugin_manager = None

    def __init__(self, bf16=False, fp16=False):
        self.bf16, self.fp16 = bf16, fp16


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_decoder_layers_found_by_heuristic_and_by_name(llama):
    assert decoder_layer_class(Cfg(), llama) == "LlamaDecoderLayer"
    assert len(decoder_layers(llama, "LlamaDecoderLayer")) == 2
    with pytest.raises(ConfigError, match=r"'LlamaDecoderLayr' matches no module.*LlamaDecoderLayer"):
        decoder_layers(llama, "LlamaDecoderLayr")


def test_tp_plan_of_plain_and_lora_layers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = _layer_plan(model.model.layers[0], DEFAULT_TP_PLAN)
    assert isinstance(plain["self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plain["mlp.down_proj"], RowwiseParallel)

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    layer = peft_model.base_model.model.model.layers[0]
    plan = _layer_plan(layer, DEFAULT_TP_PLAN)
    # column-wise base: B column-wise, A replicated; row-wise base: A row-wise, B replicated
    assert isinstance(plan["self_attn.q_proj.base_layer"], ColwiseParallel)
    assert isinstance(plan["self_attn.q_proj.lora_B.default"], ColwiseParallel)
    assert "self_attn.q_proj.lora_A.default" not in plan
    assert isinstance(plan["self_attn.o_proj.lora_A.default"], RowwiseParallel)
    assert "self_attn.o_proj.lora_B.default" not in plan
    assert isinstance(plan["self_attn.k_proj"], ColwiseParallel)  # not adapted: plain linear


def test_bad_plan_entry_is_a_config_error(llama):
    with pytest.raises(ConfigError, match=r"'diagonal' is not accepted; accepted: colwise, rowwise, sequence"):
        _layer_plan(llama.model.layers[0], {"self_attn.q_proj": "diagonal"})


def test_mixed_precision_dtype(llama):
    assert param_dtype(Cfg(bf16=True), llama) == torch.bfloat16
    assert param_dtype(Cfg(fp16=True), llama) == torch.float16
    assert param_dtype(Cfg(bf16=False), llama) is None
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    assert param_dtype(Cfg(bf16="auto"), llama) == expected
