"""QLoRA through the hooks ``plait train`` calls: plait-bnb's ``load_model``
then plait-peft's ``load_adapter``.

plait-bnb prepares the 4-bit model itself and marks it
(``plait.model.loading.mark_kbit_prepared``); plait-peft must then skip peft's
``prepare_model_for_kbit_training``, which would cast the frozen embedding,
head and norms to float32 and undo the memory saving measured in
``test_bnb_memory.py``. With ``bf16: true`` they stay bfloat16, and the
adapters still receive gradients.
"""

from __future__ import annotations

import torch

from plait.testing import build_run_config
from plait.model.loading import is_kbit_prepared
from plait_bnb.reference import model_device


def test_qlora_adapter_keeps_vocab_weights_and_norms_in_compute_dtype(tiny_model_dir):
    cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "adapter": "qlora", "load_in_4bit": True,
                                "lora_target_linear": True, "bf16": True})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    base = pm.hook.load_model(cfg=cfg, tokenizer=tokenizer)
    assert is_kbit_prepared(base)
    model = pm.hook.load_adapter(cfg=cfg, model=base)

    inner = model.get_base_model()
    assert inner.get_input_embeddings().weight.dtype == torch.bfloat16
    assert inner.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in inner.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0)).to(model_device(model))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    # lora_B starts at zero, so only its gradient is non-zero after one backward
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
