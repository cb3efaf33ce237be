"""Which plugin owns a key the run's config class lacks.

Derived from what is installed, so it cannot drift from the plugins: every
installed plugin (entry point in the group ``plait``) that this run did not
load (``disable_plugins``, ``PLAIT_LOAD_PLUGINS``, or a test's manager
without entry points) is asked for its ``config_schema`` here.

First-party plugins that are not installed cannot be asked; their keys that
Axolotl configs use are listed in :data:`FIRST_PARTY_KEYS`, and
``tests/test_axolotl_examples.py`` checks the list against each plugin's
schema wherever the plugin is installed.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

#: first-party distribution -> Axolotl keys it declares (used only while it is not installed)
FIRST_PARTY_KEYS: dict[str, tuple[str, ...]] = {
    "plait-preference": ("rl", "rl_beta", "dpo_beta", "dpo_loss_type", "dpo_loss_weights", "dpo_label_smoothing",
                         "dpo_use_weighting", "dpo_padding_free", "orpo_alpha", "simpo_gamma", "cpo_alpha",
                         "kto_desirable_weight", "kto_undesirable_weight", "precompute_ref_log_probs",
                         "reward_model", "process_reward_model", "num_labels", "center_rewards_coefficient"),
    "plait-vision": ("processor_type", "image_size", "image_resize_algorithm", "freeze_mm_modules"),
    "plait-kernels": ("flash_attn_fuse_mlp", "flash_attn_rms_norm"),
    "plait-qat": ("qat", "quantization"),
}

#: what each of those distributions brings, for the message
FIRST_PARTY_PURPOSE: dict[str, str] = {
    "plait-preference": "preference training (DPO, IPO, ORPO, KTO, SimPO) and reward models",
    "plait-vision": "multimodal (vision-language) training",
    "plait-kernels": "the fused kernels (RMSNorm, MLP, rotary, loss)",
    "plait-qat": "quantization-aware training and post-training quantization (torchao)",
}


@dataclass(frozen=True)
class KeyOwner:
    """A plugin that would declare a key: its entry-point name (``None`` when
    not installed) and its distribution."""

    plugin: str | None
    distribution: str
    installed: bool

    def advice(self) -> str:
        if self.installed:
            return (f"declared by plugin {self.plugin!r} ({self.distribution}), which is installed but not loaded "
                    f"in this run (see disable_plugins / PLAIT_DISABLE_PLUGINS / PLAIT_LOAD_PLUGINS)")
        purpose = FIRST_PARTY_PURPOSE.get(self.distribution)
        what = f"{purpose} comes with" if purpose else "needs"
        return f"{what} the plugin package {self.distribution!r}, which is not installed (pip install {self.distribution})"


def _schema_keys(plugin) -> list[str]:
    hook = getattr(plugin, "config_schema", None)
    if hook is None:
        return []
    try:
        model = hook()
    except Exception:  # a broken plugin is reported when it is loaded, not here
        return []
    return list(getattr(model, "model_fields", {}) or {})


def unloaded_key_owners(pm) -> dict[str, KeyOwner]:
    """key -> owner, for installed plugins this run did not load and for
    first-party plugins that are not installed."""
    owners: dict[str, KeyOwner] = {}
    installed_dists = set()
    for ep in importlib.metadata.entry_points(group="plait"):
        dist = ep.dist.name if ep.dist else ep.name
        installed_dists.add(dist)
        if pm is not None and pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception:
            continue
        if pm is not None and pm.is_registered(plugin):  # registered under another name (the test kit)
            continue
        for key in _schema_keys(plugin):
            owners.setdefault(key, KeyOwner(ep.name, dist, True))
    for dist, keys in FIRST_PARTY_KEYS.items():
        if dist in installed_dists:
            continue
        for key in keys:
            owners.setdefault(key, KeyOwner(None, dist, False))
    return owners
