"""``llama4_linearized_experts``: Llama 4's experts as one ``nn.Linear`` per expert.

transformers' ``Llama4TextExperts`` holds every expert in two fused 3-D
parameters, ``gate_up_proj`` ``[experts, hidden, 2 * inter]`` and
``down_proj`` ``[experts, inter, hidden]`` (stored input-major: ``x @ W``),
which neither LoRA's ``target_modules`` nor bitsandbytes' linear-layer
quantization reaches. :class:`LinearizedLlama4Experts` computes the same
thing with ``gate_projs[e]``, ``up_projs[e]``, ``down_projs[e]``
(``nn.Linear``, weights ``[out, in]``), the module names of Axolotl's
linearized Llama 4 checkpoints (``axolotl-quants/Llama-4-*-Linearized-*``),
so such a checkpoint loads as it is, ``load_in_4bit`` quantizes each expert
and LoRA targets them (``lora_target_linear``, or
``lora_target_modules: ['experts.gate_projs.[0-9]+$', ...]``).

While the model loads, :func:`building_linearized_experts` makes transformers
build this class in place of ``Llama4TextExperts`` (plait's
``loading_context`` hook); the checkpoint must therefore store its experts
per expert. :func:`linearized_from_fused` converts a fused experts module
(and :func:`save_linearized_checkpoint` a fused checkpoint) to that layout.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

#: the fused parameters of transformers' Llama4TextExperts, as they appear in a checkpoint's weight names
FUSED_NAMES = ("experts.gate_up_proj", "experts.down_proj")


class LinearizedLlama4Experts(nn.Module):
    """Llama 4's routed experts, one ``nn.Linear`` triple per expert.

    Input ``[experts * tokens, hidden]``, grouped by expert (Llama4TextMoe
    repeats every token once per expert, scaled by its router score, which
    is 0 for an expert the token is not routed to); output the same shape.
    """

    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.expert_dim = config.intermediate_size

        def linears(n_in, n_out):
            return nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(self.num_experts))

        self.gate_projs = linears(self.hidden_size, self.expert_dim)
        self.up_projs = linears(self.hidden_size, self.expert_dim)
        self.down_projs = linears(self.expert_dim, self.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        by_expert = hidden_states.view(self.num_experts, -1, self.hidden_size)
        outputs = [self.down_projs[e](self.up_projs[e](x) * self.act_fn(self.gate_projs[e](x)))
                   for e, x in enumerate(by_expert)]
        return torch.stack(outputs).view(-1, self.hidden_size)


@torch.no_grad()
def linearized_from_fused(experts, config) -> LinearizedLlama4Experts:
    """A :class:`LinearizedLlama4Experts` holding the weights of a fused
    ``Llama4TextExperts`` (``gate_up_proj[e]`` is ``[hidden, 2 * inter]``:
    its first half of columns the gate, the second the up projection)."""
    linear = LinearizedLlama4Experts(config).to(experts.gate_up_proj.device, experts.gate_up_proj.dtype)
    inter = linear.expert_dim
    for e in range(linear.num_experts):
        linear.gate_projs[e].weight.copy_(experts.gate_up_proj[e, :, :inter].T)
        linear.up_projs[e].weight.copy_(experts.gate_up_proj[e, :, inter:].T)
        linear.down_projs[e].weight.copy_(experts.down_proj[e].T)
    return linear


def linearize(model) -> int:
    """Replace every fused ``Llama4TextExperts`` of a loaded ``model`` by its
    linearized equivalent; returns how many were replaced."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    text_config = getattr(model.config, "text_config", None) or model.config
    fused = [(name, module) for name, module in model.named_modules() if isinstance(module, Llama4TextExperts)]
    for name, module in fused:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linearized_from_fused(module, text_config))
    return len(fused)


def save_linearized_checkpoint(source, target) -> Path:
    """Save the fused Llama 4 checkpoint ``source`` with its experts linearized
    (the layout ``llama4_linearized_experts: true`` loads), tokenizer files included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    linearize(model)
    model.save_pretrained(target)
    with contextlib.suppress(OSError, ValueError):  # a checkpoint without tokenizer files
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return Path(target)


@contextlib.contextmanager
def building_linearized_experts():
    """While open, every ``Llama4TextMoe`` transformers builds holds
    :class:`LinearizedLlama4Experts` as its ``experts``.

    The MoE block's constructor is wrapped rather than the name
    ``Llama4TextExperts`` rebound: transformers' weight initialisation tests
    modules against that name while the model loads and would take ours for
    the fused module."""
    from transformers.models.llama4 import modeling_llama4

    moe = modeling_llama4.Llama4TextMoe
    fused_init = moe.__init__

    def init_with_linear_experts(self, config):
        fused_init(self, config)
        self.experts = LinearizedLlama4Experts(config)

    moe.__init__ = init_with_linear_experts
    try:
        yield
    finally:
        moe.__init__ = fused_init


def checkpoint_weight_names(source) -> list[str] | None:
    """Weight names of a local safetensors checkpoint (its index, else the
    file headers), or ``None`` when ``source`` is not a readable local folder."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return list(json.loads(index.read_text())["weight_map"])
        from safetensors import safe_open

        names = []
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                names += list(handle.keys())
        return names or None
    except (OSError, ValueError, KeyError):
        return None


def has_fused_experts(source) -> bool:
    """Whether a local checkpoint stores Llama 4's experts fused (``experts.gate_up_proj``)."""
    names = checkpoint_weight_names(source) or []
    return any(name.endswith(fused) for name in names for fused in FUSED_NAMES)
