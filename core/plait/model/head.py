"""The LM head and cross-entropy over trained tokens, in chunks.

The training loop hands over the backbone's hidden states
(:func:`plait.model.forward.forward_hidden`); computing the head in chunks
keeps the ``[tokens, vocab]`` logits from existing all at once. Core's
``build_loss`` returns :func:`chunked_linear_cross_entropy` with the model's
:func:`head_options`; a fused kernel plugin replaces it with the same
signature.
"""

from __future__ import annotations


def token_cross_entropy(logits, labels, eaft: tuple[float, int] | None = None):
    """Summed cross-entropy of float ``logits`` rows against ``labels`` (all trained).

    ``eaft=(alpha, k)``: entropy-aware focal training (Axolotl's ``use_eaft``).
    Each token's cross-entropy is weighted by the entropy of the softmax over
    its ``k`` largest logits, raised to ``alpha``. The weight carries no
    gradient. Confident tokens (low entropy) count for less, uncertain ones
    for more.
    """
    import torch
    import torch.nn.functional as F

    if eaft is None:
        return F.cross_entropy(logits, labels, reduction="sum")
    alpha, k = eaft
    per_token = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).values.softmax(dim=-1)
        # the 1e-10 keeps log(0) out for a top-k entry whose probability underflows, as Axolotl's does
        weight = (-(top * torch.log(top + 1e-10)).sum(dim=-1)).pow(alpha)
    return (per_token * weight).sum()


def chunked_linear_cross_entropy(hidden, head_weight, labels, chunk_size: int = 4096, head_bias=None,
                                 softcap: float | None = None, eaft: tuple[float, int] | None = None):
    """Summed cross-entropy of ``hidden @ head_weight.T`` against ``labels``.

    ``hidden`` is ``[tokens, hidden]``, ``labels`` ``[tokens]`` with ``-100``
    for untrained positions (already shifted). Only trained rows go through the
    head, chunk by chunk. ``softcap`` applies ``softcap * tanh(logits /
    softcap)`` first (Gemma 2's ``final_logit_softcapping``); ``eaft`` weights
    each token (:func:`token_cross_entropy`). Returns
    ``(loss_sum, n_trained_tokens)``.
    """
    import torch
    import torch.nn.functional as F

    trained = labels != -100
    hidden = hidden[trained]
    labels = labels[trained]
    n_tokens = labels.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk_size):
        logits = F.linear(hidden[start:start + chunk_size], head_weight, head_bias).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + token_cross_entropy(logits, labels[start:start + chunk_size], eaft)
    if n_tokens == 0:
        # keep the graph connected so backward works on a batch with nothing to train
        total = total + hidden.sum() * 0.0 + head_weight.sum() * 0.0
    return total, n_tokens


def logits_cross_entropy(logits, labels, eaft: tuple[float, int] | None = None):
    """Summed cross-entropy of the model's own ``logits`` (``[tokens, vocab]``)
    against ``labels`` (``[tokens]``, ``-100`` untrained, already shifted):
    the loss for models whose head the fused step cannot reproduce
    (:func:`plait.model.forward.head_plan`); ``eaft`` as in
    :func:`token_cross_entropy`. Returns ``(loss_sum, n_trained_tokens)``."""
    trained = labels != -100
    n_tokens = int(trained.sum())
    if n_tokens == 0:
        return logits.sum() * 0.0, 0
    return token_cross_entropy(logits[trained].float(), labels[trained], eaft), n_tokens


def eaft_of(cfg) -> tuple[float, int] | None:
    """``(eaft_alpha, eaft_k)`` when the config asks for entropy-aware focal training."""
    return (cfg.eaft_alpha, cfg.eaft_k) if getattr(cfg, "use_eaft", None) else None


def head_options(model) -> dict:
    """What the model's head does beyond ``hidden @ W.T``: a bias, logit softcapping."""
    if model is None:
        return {}
    from plait.model.forward import unwrap

    options = {}
    softcap = getattr(getattr(unwrap(model), "config", None), "final_logit_softcapping", None)
    if softcap:
        options["softcap"] = float(softcap)
    try:
        # the output layer itself, also where no base_model_prefix backbone exists
        head = unwrap(model).get_output_embeddings()
    except (TypeError, AttributeError, NotImplementedError):
        return options
    if getattr(head, "bias", None) is not None:
        options["head_bias"] = head.bias
    return options
