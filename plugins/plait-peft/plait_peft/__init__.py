"""plait-peft: LoRA / QLoRA / DoRA adapters for Plait through Hugging Face peft.

``config``  the adapter keys (Axolotl names) and the rules between them
``adapter`` building the peft model: target modules, kbit preparation, loading a saved adapter
``plugin``  the hookimpls the entry point registers (imports nothing heavy)
"""

__version__ = "0.1.0"
