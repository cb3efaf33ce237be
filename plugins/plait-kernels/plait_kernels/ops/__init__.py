"""Triton kernels, each behind a ``torch.autograd.Function`` with its own backward.

Modules here import triton at import time; the plugin module imports them only
when a model is patched, so ``plait --help`` never loads triton or torch.
Kernels load inputs, upcast to float32, compute, and cast on store: Triton's
CPU interpreter (``TRITON_INTERPRET=1``, used by the tests) gives wrong results
for bf16 arithmetic, and float32 math is what the PyTorch references do too.
"""
