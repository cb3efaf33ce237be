"""Check that a parallel layout trains like one process.

A deliberately small training loop (AdamW, a fixed global batch of packed
rows, summed cross-entropy normalised by the global token count) that runs
either in one process (``mesh=None``) or under ``torchrun`` with any layout of
this package. The tests compare the loss curves; plugin authors can use it to
check a new family's tensor-parallel plan::

    torchrun --nproc-per-node 2 -m plait_parallel.equivalence \\
        --model DIR --scenarios tp,fsdp --out results.json
"""

from __future__ import annotations

import argparse
import json
import os

#: name -> (config keys, LoRA?, save a checkpoint after SAVE_AT steps?)
SCENARIOS = {
    "fsdp": ({"fsdp": ["full_shard", "auto_wrap"]}, False, True),
    "fsdp_lora": ({"fsdp": ["full_shard", "auto_wrap"]}, True, True),
    "tp": ({"tensor_parallel_size": 2, "dp_shard_size": 1}, False, False),
    "tp_lora": ({"tensor_parallel_size": 2, "dp_shard_size": 1}, True, False),
    "cp": ({"context_parallel_size": 2, "dp_shard_size": 1, "ring_attn": "batch_zigzag"}, False, False),
    "cp_lora": ({"context_parallel_size": 2, "dp_shard_size": 1, "ring_attn": True, "heads_k_stride": 1}, True, False),
    "fsdp_tp": ({"tensor_parallel_size": 2, "fsdp": ["full_shard"]}, False, False),
    "fsdp_tp_lora": ({"tensor_parallel_size": 2, "fsdp": ["full_shard"]}, True, False),
    "fsdp_options": ({"fsdp": ["shard_grad_op", "offload", "auto_wrap"],
                      "fsdp_config": {"fsdp_activation_checkpointing": True,
                                      "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}, False, False),
    "hsdp_lora": ({"fsdp": ["hybrid_shard"], "dp_replicate_size": 2}, True, False),
    "tp_cp_lora": ({"tensor_parallel_size": 2, "context_parallel_size": 2, "ring_attn": "zigzag"}, True, False),
    "fsdp_cp": ({"context_parallel_size": 2, "fsdp": True}, False, False),
}
STEPS = 4
SAVE_AT = 2
LR = 3e-3
#: low enough that the first steps clip: the parallel norm must equal the plain one
MAX_GRAD_NORM = 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batch(vocab_size: int, rows: int = 4, seq_len: int = 22, seed: int = 0) -> dict:
    """Packed rows: each row holds two documents, positions restart at the second."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (rows, seq_len), generator=g)
    position_ids = torch.empty_like(input_ids)
    labels = input_ids.clone()
    for r in range(rows):
        cut = 7 + 3 * r
        position_ids[r, :cut] = torch.arange(cut)
        position_ids[r, cut:] = torch.arange(seq_len - cut)
        labels[r, cut - 1] = -100  # no target crosses a document boundary (a collator would mask it)
        labels[r, :2] = -100  # an untrained prompt
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def load_model(model_dir: str, lora: bool):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 init_lora_weights="gaussian"))
    return model


def batch_loss(model, batch: dict) -> float:
    """Mean next-token loss of ``model`` (plain, one process) on ``batch``."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :-1] = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100))


def build_cfg(model_dir: str, keys: dict):
    """A validated run config with this package's keys, as ``plait train`` would build it."""
    import plait_parallel.plugin as plugin
    from plait.config import build_config
    from plait.testing import plugin_manager

    pm = plugin_manager(plugin, entry_points=False)
    return build_config(pm, {"base_model": model_dir, **keys})


def describe_layout(model) -> dict:
    """Type, local shape and placements of the first ``q_proj`` weight."""
    for name, param in model.named_parameters():
        if "q_proj" in name and name.endswith("weight") and "lora" not in name:
            local = param.to_local() if hasattr(param, "to_local") else param
            return {"type": type(param).__name__, "local_shape": list(local.shape),
                    "placements": [str(p) for p in getattr(param, "placements", ())]}
    return {}


def _logits(model, batch):
    """Logits computed the way Plait's loop does: the decoder's hidden states
    (captured by a forward hook) times the head weight *outside* the model's
    forward, so the check covers FSDP2 handing the root's parameters to code
    that runs after forward."""
    import torch
    import torch.nn.functional as F

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings()
    captured = {}

    def keep(module, args, out):
        if not isinstance(out, torch.Tensor):
            out = out[0] if isinstance(out, tuple) else out.last_hidden_state
        captured["hidden"] = out

    handle = decoder.register_forward_hook(keep)
    try:
        # use_cache=False: with a cache transformers ignores packed position_ids when masking
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    weight = head.weight
    # under tensor parallel the head weight is a replicated DTensor: its local
    # tensor is the full weight, and the gradient flows back through to_local
    weight = weight.to_local() if hasattr(weight, "to_local") else weight
    return F.linear(captured["hidden"], weight)


def _global_mean_loss(loss_sum, tokens, mesh) -> float:
    import torch
    import torch.distributed as dist

    pair = torch.tensor([float(loss_sum), float(tokens)], dtype=torch.float64)
    if mesh is not None:
        for name in ("dp", "cp"):
            if mesh[name].size() > 1:
                dist.all_reduce(pair, group=mesh[name].get_group())
    return float(pair[0] / pair[1])


def train_curve(model_dir: str, keys: dict, lora: bool, *, distributed: bool, steps: int = STEPS,
                save_dir: str | None = None, load_dir: str | None = None, info: dict | None = None) -> list[float]:
    """Train ``steps`` AdamW steps on the fixed batch; returns the global mean loss of each step.

    ``info``, when given, receives ``layout``: how the first q_proj weight is
    held (see :func:`describe_layout`), so a test can tell a layout from a
    no-op, and ``grad_norms``: the gradient norm of each step before clipping.
    """
    import torch
    import torch.nn.functional as F

    from plait.model.recompute import apply_gradient_checkpointing
    from plait_parallel.checkpoint import load_sharded, save_sharded
    from plait_parallel.config import ring_split
    from plait_parallel.context_parallel import shard_batch_for_context_parallel
    from plait_parallel.mesh import build_mesh, data_parallel_rank_and_size, loss_divisor

    cfg = build_cfg(model_dir, keys if distributed else {})
    model = load_model(model_dir, lora)
    # as plait.pipeline.setup_model does: fsdp_config.activation_checkpointing answers through the hook
    apply_gradient_checkpointing(cfg, cfg.plugin_manager, model)
    mesh = build_mesh(cfg) if distributed else None
    if mesh is not None:
        model = cfg.plugin_manager.hook.wrap_parallel(cfg=cfg, model=model, mesh=mesh)
    model.train()
    if info is not None:
        info["layout"] = describe_layout(model)
        # decoder layers that recompute in the backward (fsdp_config.activation_checkpointing)
        info["checkpointed"] = sum(bool(getattr(m, "gradient_checkpointing", False))
                                   for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=True: the kernels GPUs use by default, which refuse mixed DTensor/plain parameters
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)
    if load_dir:
        load_sharded(load_dir, model, optimizer)

    batch = make_batch(model.config.vocab_size if not lora else model.get_base_model().config.vocab_size)
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)
    rows = batch["input_ids"].shape[0] // dp_size
    local = {k: v[dp_rank * rows:(dp_rank + 1) * rows] for k, v in batch.items()}
    if mesh is not None and mesh["cp"].size() > 1:
        local = shard_batch_for_context_parallel(local, mesh, ring_split(cfg))
    else:
        shifted = torch.full_like(local["labels"], -100)
        shifted[:, :-1] = local["labels"][:, 1:]
        local["shift_labels"] = shifted

    losses, grad_norms = [], []
    for step in range(steps):
        logits = _logits(model, local)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), local["shift_labels"].flatten(),
                                   ignore_index=-100, reduction="sum")
        tokens = int((local["shift_labels"] != -100).sum())
        (loss_sum / loss_divisor(mesh, tokens)).backward()
        # torch's own clipping, as Plait's loop does: every parameter is a DTensor of one mesh
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(_global_mean_loss(loss_sum.detach(), tokens, mesh))
        if save_dir and step + 1 == SAVE_AT:
            save_sharded(save_dir, model, optimizer, {"step": SAVE_AT})
    if info is not None:
        info["grad_norms"] = grad_norms
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated names of SCENARIOS")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-root", default=None, help="save checkpoints of scenarios that save, here")
    parser.add_argument("--load", default=None, help="NAME=DIR: run NAME resuming from DIR for the remaining steps")
    parser.add_argument("--other-model", action="append", default=[], metavar="LABEL=DIR:SCENARIOS",
                        help="also run SCENARIOS (comma-separated) on the model in DIR, reported as LABEL/NAME; "
                             "one launch checks several families (the start-up dominates)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {}
    for name in args.scenarios.split(","):
        keys, lora, saves = SCENARIOS[name]
        save_dir = os.path.join(args.ckpt_root, name) if args.ckpt_root and saves else None
        info = {}
        results[name] = train_curve(args.model, keys, lora, distributed=True, save_dir=save_dir, info=info)
        results["layout:" + name] = info["layout"]
        results["checkpointed:" + name] = info["checkpointed"]
        results["norms:" + name] = info["grad_norms"]
    for other in args.other_model:
        label, rest = other.split("=", 1)
        model_dir, names = rest.rsplit(":", 1)
        for name in names.split(","):
            keys, lora, _ = SCENARIOS[name]
            results[f"{label}/{name}"] = train_curve(model_dir, keys, lora, distributed=True)
    if args.load:
        name, load_dir = args.load.split("=", 1)
        keys, lora, _ = SCENARIOS[name]
        results["resumed:" + name] = train_curve(args.model, keys, lora, distributed=True, steps=STEPS - SAVE_AT,
                                                 load_dir=load_dir)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    # gloo sometimes aborts while tearing down after all work is done; results are written
    os._exit(0)


if __name__ == "__main__":
    main()
