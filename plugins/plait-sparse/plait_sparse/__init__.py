"""plait-sparse: fine-tune an already-sparse model keeping its zeros (Axolotl's ``llmcompressor:`` block)."""

__version__ = "0.1.0"
