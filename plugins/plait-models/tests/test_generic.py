"""describe_optimisations: what the log says for known and unknown model types."""

from __future__ import annotations

from plait.families import find_family

from plait_models import describe_optimisations, family_of_model
from plait_models.testing import build_model


def test_unknown_model_type_lists_what_is_off(pm):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4))
    family = family_of_model(pm, model)
    assert family is None
    text = "\n".join(describe_optimisations(model, family))
    assert "'gpt2' has no Plait model family" in text
    assert "tensor parallel: unavailable" in text and "kernel swaps" in text
    assert "GPT2Block" in text  # transformers' _no_split_modules is the fallback unit


def test_a_well_covered_family_reports_nothing_missing(pm):
    model = build_model("llama")
    assert describe_optimisations(model, find_family(pm, "llama")) == []


def test_modules_a_kernel_plugin_swapped_in_count_as_the_family_classes(pm):
    """A kernel plugin's patch_model runs first; its modules name the class they
    replace, so the report does not call the swap skipped."""
    import torch

    model = build_model("llama")
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "LlamaRMSNorm":
            parent, _, attr = name.rpartition(".")
            swapped = torch.nn.Identity()
            swapped.replaces_class = "LlamaRMSNorm"
            setattr(model.get_submodule(parent), attr, swapped)
    assert "LlamaRMSNorm" not in {type(m).__name__ for m in model.modules()}
    assert describe_optimisations(model, find_family(pm, "llama")) == []
    for module in model.modules():
        if isinstance(module, torch.nn.Identity):
            del module.replaces_class
    assert any("RMSNorm class LlamaRMSNorm not found" in line
               for line in describe_optimisations(model, find_family(pm, "llama")))


def test_family_gaps_and_quirks_are_reported(pm):
    phi3 = "\n".join(describe_optimisations(build_model("phi3"), find_family(pm, "phi3")))
    assert "tensor parallel unavailable" in phi3
    gemma2 = "\n".join(describe_optimisations(build_model("gemma2"), find_family(pm, "gemma2")))
    assert "soft-capped at 30.0" in gemma2
    mixtral = describe_optimisations(build_model("mixtral"), find_family(pm, "mixtral"))
    assert any("no MLP kernel swap" in line for line in mixtral)
    assert any("4 trainable" in line for line in mixtral)  # 2 layers x (gate_up_proj, down_proj)
    dense_layer = describe_optimisations(build_model("qwen3_moe", mlp_only_layers=[1]), find_family(pm, "qwen3_moe"))
    assert any("dense layers [1]" in line for line in dense_layer)


def test_a_family_whose_classes_drifted_is_reported(pm):
    import dataclasses

    stale = dataclasses.replace(find_family(pm, "llama"), decoder_layer_class="LlamaLayer", norm_class="LlamaNorm")
    text = "\n".join(describe_optimisations(build_model("llama"), stale))
    assert "LlamaLayer not found" in text and "LlamaNorm not found" in text


def test_family_of_a_peft_model_and_the_override(pm):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("qwen2"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert family_of_model(pm, model).name == "qwen2"
    assert family_of_model(pm, model, model_config_type="gemma3_text").name == "gemma3"


def test_layers_sharded_by_fsdp2_keep_their_family_class(pm):
    # plait-parallel shards each decoder layer with fully_shard, which renames its class FSDP<Name>; the
    # log read that as "decoder layer class ... not found" and claimed a _no_split_modules fallback.
    # One gloo process: fully_shard swaps the classes just as with several.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model("qwen3_moe")
    family = find_family(pm, "qwen3_moe")
    before = describe_optimisations(model, family)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.model.layers[0]).__name__ == "FSDPQwen3MoeDecoderLayer"
        after = describe_optimisations(model, family)
    finally:
        dist.destroy_process_group()
    assert not any("not found" in line for line in after), after
    assert after == before
