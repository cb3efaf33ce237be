"""plait-bnb: bitsandbytes quantization for Plait.

* ``load_in_4bit`` / ``load_in_8bit`` load the base model quantized (QLoRA's base);
* ``optimizer: adamw_8bit`` (``adamw_bnb_8bit``), ``paged_adamw_8bit`` and
  ``paged_adamw_32bit`` build bitsandbytes optimizers.

The hookimpls are in :mod:`plait_bnb.plugin`; nothing heavy is imported until a
hook asks for it.
"""
