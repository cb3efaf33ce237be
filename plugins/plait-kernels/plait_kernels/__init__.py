"""plait-kernels: Triton kernels for Plait (RMSNorm, rotary, SwiGLU/GeGLU, fused
linear cross-entropy) and the ``patch_model``/``build_loss`` hooks that use them.

The kernels live in :mod:`plait_kernels.ops`; importing this package does not
import torch or triton.
"""

__version__ = "0.1.0"
