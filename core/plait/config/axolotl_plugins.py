"""Axolotl's integration plugins named under ``plugins:``.

An Axolotl config turns on an integration by its import path, e.g.
``axolotl.integrations.liger.LigerPlugin``. Plait cannot import those; each
is either served by something Plait has (the entry is dropped and its keys
keep their meaning) or refused by name with what to use instead.

=====================  ===================================================
integration            in Plait
=====================  ===================================================
cut_cross_entropy      core's loss step (never builds full logits)
liger                  plait-kernels (the ``liger_*`` keys)
swanlab                core's trackers (the ``swanlab_*`` keys)
llm_compressor         plait-sparse (the ``llmcompressor:`` block)
spectrum               refused: use ``unfrozen_parameters``
kernels                core: ``use_scattermoe`` / ``use_sonicmoe`` onto
                       transformers' experts functions, ``use_kernels``
                       on (:mod:`plait.model.transformers_kernels`)
others                 refused, named
=====================  ===================================================
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "axolotl.integrations."


@dataclass(frozen=True)
class Integration:
    """How Plait serves one Axolotl integration: ``plugin`` (a Plait
    entry-point name that must be loaded, or ``None`` for core) and what it
    does, or ``refused`` with the reason."""

    serves: str
    plugin: str | None = None
    refused: bool = False
    #: ``"module:function"`` taking the raw config keys, applying what listing the
    #: integration does to them in Axolotl (defaults it sets), returning notes
    applies: str | None = None

    def apply(self, raw: dict) -> list[str]:
        if self.applies is None:
            return []
        import importlib

        module, function = self.applies.split(":")
        return getattr(importlib.import_module(module), function)(raw)


INTEGRATIONS: dict[str, Integration] = {
    "cut_cross_entropy": Integration("Plait's loss step never builds the [tokens, vocab] logits (chunked head + "
                                     "cross-entropy; plait-kernels' fused kernel on CUDA)"),
    "liger": Integration("plait-kernels swaps in liger-kernel's modules for the liger_* keys", plugin="kernels"),
    "spectrum": Integration("Spectrum's layer selection (a hub SNR scan) is not implemented; list the layers to "
                            "train with unfrozen_parameters", refused=True),
    "kernels": Integration("MoE experts kernels: use_scattermoe runs transformers' grouped_mm, use_sonicmoe its "
                           "sonicmoe; use_kernels on", applies="plait.model.transformers_kernels:"
                                                               "apply_axolotl_kernels_plugin"),
    "swanlab": Integration("core's SwanLab tracker (the swanlab_* keys; needs plait[swanlab])"),
    "kd": Integration("knowledge distillation is not implemented", refused=True),
    "lm_eval": Integration("lm-eval-harness runs are not built in; run lm_eval on the saved model", refused=True),
    "grokfast": Integration("the Grokfast gradient filter is not implemented", refused=True),
    "diffusion": Integration("diffusion language-model training is not implemented", refused=True),
    "llm_compressor": Integration("plait-sparse keeps the llmcompressor: recipe's ConstantPruningModifier targets' "
                                  "zero weights at zero while training", plugin="sparse"),
    "mora": Integration("MoRA adapters are not implemented; use adapter: lora (plait-peft)", refused=True),
    "densemixer": Integration("DenseMixer MoE routing is not implemented", refused=True),
    "expert_parallel": Integration("expert parallelism is not implemented; plait-parallel shards MoE models with "
                                   "FSDP2", refused=True),
    "nemo_gym": Integration("NeMo Gym environments (online RL) are not implemented", refused=True),
    "hatchery": Integration("remote training backends (Tinker/Hatchery) are not supported", refused=True),
}


def integration_of(entry: str) -> str | None:
    """``"liger"`` for ``axolotl.integrations.liger.LigerPlugin``; ``None`` for
    an entry that is not an Axolotl integration."""
    if not entry.startswith(PREFIX):
        return None
    return entry[len(PREFIX):].split(".")[0]


def resolve(entry: str, loaded_plugins) -> tuple[str | None, str | None]:
    """``(note, problem)`` for one Axolotl ``plugins:`` entry: a note when
    Plait serves it, a problem line when it cannot (what the entry does to
    the config's keys is :meth:`Integration.apply`)."""
    name = integration_of(entry)
    integration = INTEGRATIONS.get(name)
    if integration is None:
        return None, f"{entry}: Axolotl's {name!r} integration has no equivalent in Plait"
    if integration.refused:
        return None, f"{entry}: {integration.serves}"
    if integration.plugin and integration.plugin not in loaded_plugins:
        return None, (f"{entry}: served by Plait's plugin {integration.plugin!r}, which is not loaded "
                      f"(pip install plait-{integration.plugin}, or stop disabling it)")
    return f"plugins: {entry} -> {integration.serves}", None
