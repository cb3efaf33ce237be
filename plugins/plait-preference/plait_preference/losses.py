"""The preference losses, per pair (or per KTO row), from sequence log-probs.

Pure functions of tensors, written from the papers' equations with TRL's
conventions (the tests compare them with TRL's trainers and loss functions):
every function returns per-item losses; the objective sums them.
"""

from __future__ import annotations


def dpo(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens, *, beta: float, loss_type: str,
        label_smoothing: float = 0.0):
    """DPO's family on the log-ratios ``log pi/pi_ref`` of chosen and rejected.

    sigmoid: ``-log sigma(beta d)`` (with ``label_smoothing`` e the
    conservative form ``-(1-e) log sigma(beta d) - e log sigma(-beta d)``);
    sigmoid_norm: ``-log sigma(beta d_avg)``; hinge: ``relu(1 - beta d)``;
    ipo: ``(d_avg - 1/(2 beta))^2``, where ``d_avg`` is the difference of the
    log-ratios averaged per response token; robust: the unbiased noisy-label
    loss ``((1-e)(-log sigma(beta d)) + e log sigma(-beta d)) / (1 - 2e)``.
    """
    import torch.nn.functional as F

    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid" and not label_smoothing:
        return -F.logsigmoid(beta * delta)  # the line below with e = 0, without its zero term's five kernels
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * _per_token_delta(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens))
    if loss_type == "hinge":
        return (1 - beta * delta).relu()
    if loss_type == "ipo":
        return (_per_token_delta(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens) - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def _per_token_delta(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens):
    """``d_avg``: the chosen minus the rejected log-ratio, each averaged over its response tokens."""
    return chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)


def orpo_odds_ratio(chosen_avg, rejected_avg, *, beta: float):
    """ORPO's ``beta * log sigma(log odds(chosen) - log odds(rejected))`` on
    per-token average log-probs (to be *subtracted* from the NLL)."""
    import torch
    import torch.nn.functional as F

    def log1mexp(x):  # log(1 - exp(x)) for x < 0, stably
        return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return beta * F.logsigmoid(log_odds), log_odds


def simpo(chosen_avg, rejected_avg, *, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO: ``-log sigma(beta (avg_c - avg_r) - gamma)`` on per-token average log-probs."""
    import torch.nn.functional as F

    logits = (chosen_avg - rejected_avg) - gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def kto(ratio, desirable, kl, *, beta: float, desirable_weight: float, undesirable_weight: float):
    """KTO: ``w_d (1 - sigma(beta (r - kl)))`` for desirable rows,
    ``w_u (1 - sigma(beta (kl - r)))`` for the others; ``kl`` is the batch's
    clamped, detached KL estimate."""
    import torch

    wanted = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    unwanted = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, wanted, unwanted)
