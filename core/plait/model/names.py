"""Axolotl's ``attn_implementation`` values mapped onto Plait's backends.

Axolotl names the backend with ``attn_implementation`` (eager, sdpa,
flash_attention_2, flash_attention_3, flex_attention, xformers, sage, fp8 or
a hub kernel path); its booleans (``flash_attention: true``, ...) are the
older form. Plait has five backends; each has one boolean, kept in step with
``attn_implementation`` so either spelling reads the same.

======================  =====================  ===============================
attn_implementation     boolean                Plait
======================  =====================  ===============================
eager                   eager_attention        transformers' eager attention
sdpa                    sdp_attention          torch SDPA (the default)
flash_attention_2       flash_attention        flash-attn's varlen kernel
flex_attention          flex_attention         torch flex attention
plait_varlen            varlen_attention       torch's varlen kernel (CUDA)
xformers                –                      sdpa (the same exact attention), noted
flash_attention_3       –                      flash_attention_2, noted
kernels-community/...   –                      a hub attention kernel, loaded
                                               by transformers (``kernels``
                                               package, CUDA); packs as
                                               flash_attention_2 (varlen)
sage, fp8               –                      refused, named
======================  =====================  ===============================

A hub kernel is a repository id (``owner/name``, optionally ``@revision`` and
``:function``) that transformers 5 loads with the ``kernels`` package; a
kernel of another publisher than ``kernels-community`` needs ``use_kernels:
true`` (which trusts any publisher, as in Axolotl). ``flash_optimum: true``
(Axolotl's BetterTransformer switch) is SDPA.
"""

from __future__ import annotations

from plait.errors import ConfigError, did_you_mean

#: backend -> its boolean key
ATTENTION_FLAGS = {
    "eager": "eager_attention",
    "sdpa": "sdp_attention",
    "flash_attention_2": "flash_attention",
    "flex_attention": "flex_attention",
    "plait_varlen": "varlen_attention",
}

#: Axolotl values served by another exact backend (the same attention, computed by another kernel)
SUBSTITUTES = {
    "xformers": ("sdpa", "xformers' memory-efficient attention is exact attention; SDPA computes the same"),
    "flash_attention_3": ("flash_attention_2", "flash-attn 3 is not wired into Plait's packing; flash-attn 2 "
                                               "computes the same attention"),
}

#: Axolotl values Plait has no backend for -> what to use instead
NOT_AVAILABLE = {
    "sage": "SageAttention (quantized, approximate) is not used; use sdpa or flash_attention_2",
    "fp8": "fp8 attention is not implemented; use flash_attention_2 or sdpa",
}

#: the only publisher transformers loads hub kernels from without allow_all_kernels (use_kernels: true)
TRUSTED_KERNEL_PUBLISHER = "kernels-community"


def is_hub_kernel(value) -> bool:
    """Whether an ``attn_implementation`` value names a hub kernel repository
    (transformers' own pattern: ``owner/name[@revision][:function]``)."""
    import re

    return isinstance(value, str) and re.fullmatch(r"[^/:@]+/[^/:@]+(?:@[^/:]+)?(?::[^/:]+)?", value) is not None


#: other spellings Axolotl and transformers accept for the same backends
ALIASES = {"flash": "flash_attention_2", "flash_attention": "flash_attention_2", "flex": "flex_attention",
           "varlen": "plait_varlen"}


def substitute_attention(value):
    """``(backend, note)`` for an Axolotl value another exact backend serves;
    ``(value, None)`` otherwise."""
    if value in SUBSTITUTES:
        backend, why = SUBSTITUTES[value]
        return backend, f"attn_implementation: {value} -> {backend} ({why})"
    return value, None


def resolve_attention(data: dict) -> dict:
    """The ``attn_implementation`` and boolean values for raw config ``data``.

    Raises :class:`ConfigError` naming the key for a value Plait lacks, and
    for booleans that contradict each other or ``attn_implementation``.
    """
    flags_on = [flag for flag in ATTENTION_FLAGS.values() if data.get(flag) is True]
    value = data.get("attn_implementation")
    if value == "sdpa" and data.get("sdp_attention") is False:
        value = None  # the default filled in earlier (a re-validation on assignment), not a choice
    if data.get("flash_optimum") is True:
        # BetterTransformer's decoder fast path is SDPA, which transformers runs natively
        chosen = [f"attn_implementation: {value}"] if value not in (None, "sdpa") else []
        chosen += [f"{flag}: true" for flag in flags_on if flag != "sdp_attention"]
        if chosen:
            raise ConfigError(f"config key 'flash_optimum': true (BetterTransformer, which is SDPA attention) and "
                              f"{', '.join(chosen)} choose different attention backends; keep one")
        value = "sdpa"
    if is_hub_kernel(value):
        if flags_on:
            raise ConfigError(f"config key 'attn_implementation' is the hub kernel {value!r} but "
                              f"{', '.join(flags_on)} {'is' if len(flags_on) == 1 else 'are'} true; keep "
                              f"attn_implementation and remove the older boolean")
        return {"attn_implementation": value}
    if value is not None:
        name = ALIASES.get(str(value), str(value))
        if name in NOT_AVAILABLE:
            raise ConfigError(f"config key 'attn_implementation': {value!r} is not available in Plait: "
                              f"{NOT_AVAILABLE[name]}")
        if name not in ATTENTION_FLAGS:
            raise ConfigError(f"config key 'attn_implementation': {value!r} is not accepted"
                              f"{did_you_mean(name, list(ATTENTION_FLAGS) + list(NOT_AVAILABLE))}; "
                              f"accepted: {', '.join(ATTENTION_FLAGS)}, or a hub kernel such as "
                              f"{TRUSTED_KERNEL_PUBLISHER}/flash-attn3")
        others = [flag for flag in flags_on if flag != ATTENTION_FLAGS[name]]
        if others:
            raise ConfigError(f"config key 'attn_implementation' is {value!r} but {', '.join(others)} "
                              f"{'is' if len(others) == 1 else 'are'} true; keep attn_implementation and remove "
                              f"the older boolean")
        return {"attn_implementation": name, ATTENTION_FLAGS[name]: True}
    if len(flags_on) > 1:
        raise ConfigError(f"{' and '.join(flags_on)} are all true; enable at most one attention backend "
                          f"(or set attn_implementation)")
    if flags_on:
        name = next(n for n, flag in ATTENTION_FLAGS.items() if flag == flags_on[0])
        return {"attn_implementation": name}
    return {"attn_implementation": "sdpa"}


def model_supports_sdpa(model_config) -> bool:
    """Whether transformers' causal-LM class for ``model_config`` runs SDPA
    (Gemma 2 does not: SDPA cannot soft-cap the attention scores)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:  # remote code or an unusual class: let transformers decide
        return True
    return getattr(model_class, "_supports_sdpa", True) is not False
