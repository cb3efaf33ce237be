"""Attention functions Plait registers with transformers' ``AttentionInterface``.

Modules here import torch/transformers only inside functions, so importing the
package stays cheap (``plait --help`` must not import torch).
"""
