"""Model helpers plugins may use: part of the published plugin API.

- :mod:`plait.model.loading` -- what every loader shares: the compute dtype,
  ``from_pretrained`` arguments, fitting embeddings to the tokenizer.
- :mod:`plait.model.batch` -- the padded batch of tokenized rows collators start from.
- :mod:`plait.model.choice` -- the attention backend a model supports
  (``load_with_supported_attention``: SDPA, then eager, when one is refused).
- :mod:`plait.model.forward` -- one training forward pass: the backbone's
  hidden states and the LM head, through DDP/peft wrappers.
- :mod:`plait.model.head` -- the chunked LM-head cross-entropy and what a
  model's head does beyond ``hidden @ W.T``.
- :mod:`plait.model.mesh` -- the device mesh ``wrap_parallel`` sharded the
  model over (``attach_mesh``/``mesh_of``).
- :mod:`plait.model.mesh` -- the device mesh ``wrap_parallel`` sharded the
  model over (``attach_mesh``/``mesh_of``).
- :mod:`plait.model.params` -- trainable parameters in the optimizer's
  decay / no-decay groups.
- :mod:`plait.model.recompute` -- gradient checkpointing, activation offload
  and the "is this the recompute pass" signal kernels need.
- :mod:`plait.model.varlen` -- the ``plait_varlen`` attention function
  registered with transformers' ``AttentionInterface``.

Modules here import torch/transformers only inside functions or on their own
import (never from this ``__init__``), so ``import plait.model`` stays cheap
(``plait --help`` must not import torch).
"""
