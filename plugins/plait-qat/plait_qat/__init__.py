"""plait-qat: quantization-aware training (Axolotl's ``qat:`` block) through torchao."""

__version__ = "0.1.0"
