"""The reference's adapter switch against peft's own ``disable_adapter``."""

from __future__ import annotations

import torch


def test_switch_gives_peft_disable_adapter_logits_and_restores_everything():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait_preference.adapter_switch import AdapterSwitch

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    with torch.no_grad():  # make the adapter and the saved head's copy change the output
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    ids = torch.randint(0, 97, (2, 9))
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}

    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base_by_peft = model(input_ids=ids).logits
        switch = AdapterSwitch(model)
        assert switch.layers  # LoRA layers and the modules_to_save wrapper, not peft's fallback
        with switch.off():
            base_by_switch = model(input_ids=ids).logits
        after = model(input_ids=ids).logits

    assert (adapted - base_by_peft).abs().max() > 1e-3  # the adapter matters here
    torch.testing.assert_close(base_by_switch, base_by_peft, rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
