"""One forward pass for training: the backbone's hidden states and the head.

The loop computes the loss itself (:func:`plait.hookspecs.build_loss`), so it
needs the final hidden states rather than logits. It still calls the *outer*
model, because wrappers (peft, DDP, FSDP2) do their work in the outer
``forward``; ``logits_to_keep=1`` makes the model's own head run on one
position only, and a forward hook on the decoder captures its output.
"""

from __future__ import annotations


def unwrap_data_parallel(model):
    """The module inside DDP (which only replicates; FSDP2 keeps the class)."""
    while hasattr(model, "module") and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = model.module
    return model


def unwrap(model):
    """The transformers causal LM inside DDP / peft wrappers."""
    model = unwrap_data_parallel(model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def decoder_and_head(model):
    """``(decoder, head)``: the module producing final hidden states and the LM head."""
    causal_lm = unwrap(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if decoder is None and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(causal_lm).__name__} has no decoder/LM head that Plait can find")
    return decoder, head


def forward_hidden(model, inputs: dict):
    """Run ``model`` on ``inputs`` (everything but labels) and return
    ``(hidden [batch, seq, hidden], head module, outputs)``.

    ``outputs`` is what the outer model returned (its logits cover one
    position only); an ``extra_loss`` plugin reads e.g. ``router_logits``
    from it when the model was configured to return them.
    """
    decoder, head = decoder_and_head(model)
    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handles = [decoder.register_forward_hook(keep_hidden)]
    packed_mask = inputs.get("attention_mask")
    if _returns_router_logits(model) and packed_mask is not None and getattr(packed_mask, "dim", lambda: 2)() != 2:
        # An MoE causal LM asked for router logits computes its own aux loss from
        # ``attention_mask`` after the decoder, and that code takes only a 2-D
        # padding mask. Hand the packed (4-D) mask to the decoder alone; Plait
        # adds the router loss itself (the ``extra_loss`` hook).
        inputs = {**inputs, "attention_mask": None}

        def give_mask(module, args, kwargs):
            return args, {**kwargs, "attention_mask": packed_mask}

        handles.append(decoder.register_forward_pre_hook(give_mask, with_kwargs=True))
    try:
        outputs = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return captured["hidden"], head, outputs


def _returns_router_logits(model) -> bool:
    return bool(getattr(getattr(unwrap(model), "config", None), "output_router_logits", False))
