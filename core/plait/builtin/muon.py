"""``optimizer: muon``: Muon on the weight matrices, AdamW on everything else.

Muon (momentum orthogonalized by Newton-Schulz) replaces each weight
matrix's momentum update by the nearest semi-orthogonal matrix, found by five
iterations of a quintic Newton-Schulz polynomial in bfloat16. Its learning
rate is scaled by ``0.2 * sqrt(max(rows, cols))`` so an update has the RMS an
AdamW update would (Moonlight's scaling, the one Axolotl's Muon uses), so
``learning_rate`` means what it means for AdamW. The input and output
embeddings, and every 1-D or 3-D parameter, train with AdamW at the same rate.

One optimizer holds both kinds, so the learning-rate schedule, the step
hooks and the checkpoint (keyed by parameter name) treat it like any other.
The Muon step matches ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``
and the rest ``torch.optim.AdamW`` (the tests compare them step by step).

Axolotl's own Muon leaves 1-D parameters (norm weights, biases) out of the
optimizer, so they never train; here they train with AdamW.
"""

from __future__ import annotations

import math

import torch

#: the quintic's coefficients (Keller Jordan's, as torch's and Axolotl's Muon use)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to ``update``, approximately: ``steps``
    Newton-Schulz iterations in bfloat16 on the update scaled to norm 1."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: X @ X.T is then the smaller product
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        # x <- a x + (b G + c G^2) x with G = x x^T, each sum fused into its matmul (fewer bf16 roundings)
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the 2-D parameters of groups not marked ``embeddings``; AdamW
    for the rest. Group keys: ``lr``, ``weight_decay`` (decoupled, both kinds),
    ``momentum``, ``nesterov``, ``ns_steps`` (Muon), ``betas``, ``eps`` (AdamW)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, embeddings=False)
        super().__init__(params, defaults)

    @staticmethod
    def uses_muon(group: dict, param: torch.Tensor) -> bool:
        return param.ndim == 2 and not group["embeddings"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if self.uses_muon(group, param):
                    self._muon_step(group, param)
                else:
                    self._adamw_step(group, param)
        return loss

    def _muon_step(self, group: dict, param: torch.Tensor) -> None:
        grad, lr, momentum = param.grad, group["lr"], group["momentum"]
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = orthogonalize(update, group["ns_steps"])
        rows, cols = param.shape
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_step(self, group: dict, param: torch.Tensor) -> None:
        grad, lr = param.grad, group["lr"]
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        param.mul_(1 - lr * group["weight_decay"])
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


#: optim_args muon takes (the rest of its settings come from the run's keys)
MUON_OPTIM_ARGS = ("momentum", "nesterov", "ns_steps")


def build_muon(cfg, params):
    """``optimizer: muon`` with the run's learning rate and weight decay. The
    AdamW part's betas are adam_beta1/adam_beta2 when the config sets both,
    else (0.95, 0.95), and its epsilon adam_epsilon, as Axolotl's Muon takes them."""
    both_betas = all(cfg.source_of(key) != "default" for key in ("adam_beta1", "adam_beta2"))
    betas = (cfg.adam_beta1, cfg.adam_beta2) if both_betas else (0.95, 0.95)
    return MuonWithAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=betas,
                         eps=cfg.adam_epsilon, **cfg.optim_args)


def check_muon(cfg) -> None:
    from plait.errors import ConfigError

    unknown = [key for key in cfg.optim_args if key not in MUON_OPTIM_ARGS]
    if unknown:
        raise ConfigError(f"config key 'optim_args': {unknown} are not settings of optimizer 'muon'; accepted: "
                          f"{', '.join(MUON_OPTIM_ARGS)} (the learning rate, weight decay and AdamW's betas and "
                          f"epsilon come from learning_rate, weight_decay, adam_beta1/2 and adam_epsilon)")
