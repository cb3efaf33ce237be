"""Attach LoRA to a causal LM with peft, as the config says."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from plait.errors import ConfigError
from plait.model.forward import probing

log = logging.getLogger("plait.peft")

#: LoRA shape keys and the ``adapter_config.json`` fields they become; a saved
#: adapter (``lora_model_dir``) brings its own values and these keys are not used
SAVED_SHAPE_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                    "lora_target_modules": "target_modules", "peft_use_dora": "use_dora",
                    "peft_use_rslora": "use_rslora", "lora_rank_pattern": "rank_pattern",
                    "lora_alpha_pattern": "alpha_pattern"}


def linear_targets(cfg, model) -> list[str]:
    """Targets for ``lora_target_linear``: the model family's curated list
    (plait-models), else :func:`generic_linear_targets`."""
    from plait.families import find_family

    pm = cfg.plugin_manager
    family = find_family(pm, model.config.model_type) if pm is not None else None
    if family is not None and family.lora_target_linear:
        return list(family.lora_target_linear)
    return generic_linear_targets(model)


def linear_layer_types():
    """Module types LoRA adapts as linear layers: ``nn.Linear`` (bitsandbytes'
    4/8-bit layers subclass it, so QLoRA bases are covered) and transformers'
    ``Conv1D`` (GPT-2 style: a linear layer with the weight transposed; peft
    sets ``fan_in_fan_out`` for it)."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return (torch.nn.Linear,)
    return torch.nn.Linear, Conv1D


def peft_refuses(model):
    """``refused(leaf_name) -> bool``: whether peft declines LoRA on a module of
    that name in this model (its rule for Mamba-style mixers, whose fused kernel
    reads ``out_proj``/``conv1d`` weights directly and would skip an adapter)."""
    from peft import LoraConfig

    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # a peft without the rule refuses nothing by name
        return lambda name: False
    config = LoraConfig(target_modules=["_"])

    def refused(name: str) -> bool:
        try:
            check(config, model, name)
        except ValueError:
            return True
        return False

    return refused


def linear_layers_run_on_text(model, n_tokens: int = 8) -> set[str] | None:
    """Names of the linear layers (:func:`linear_layer_types`) a text-only
    forward of ``model`` calls *as linear layers*: each returned one tensor of
    its ``out_features`` (one probe of ``n_tokens`` tokens, eval mode, no
    gradients). ``None`` if the probe fails.

    Left out: a layer the forward never calls (a vision tower given no image,
    a weight a fused kernel reads directly), whose adapter would train
    nothing; and an ``nn.Linear`` subclass whose own ``forward`` returns more
    (an MoE router's ``(scores, indices)``), which peft would break."""
    import torch

    linear = linear_layer_types()
    plain: set[str] = set()

    def record(name):
        def hook(module, args, output):
            width = getattr(module, "out_features", None) or getattr(module, "nf", None)
            if isinstance(output, torch.Tensor) and output.shape[-1] == width:
                plain.add(name)
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if name and isinstance(module, linear)]
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(n_tokens)]], device=embeddings.weight.device)
    try:
        with probing(model):  # leaves bitsandbytes' 4-bit weights as training reads them
            model(input_ids=ids)
    except Exception:  # noqa: BLE001 - without the probe every linear layer is a target
        return None
    finally:
        for handle in handles:
            handle.remove()
    return plain


def adapters_peft_cannot_reload(model, names) -> set[str]:
    """The module names among ``names`` whose saved LoRA weights peft would not load back.

    peft (0.21, with transformers 5) passes a saved adapter's keys through the
    model's checkpoint conversion (``transformers.conversion_mapping``), which
    renames original checkpoint names to transformers' module names. A pattern
    that also matches an already-converted name renames it again, and the
    weights are silently dropped on load: Inkling 2's ``sconv.weight_proj``
    gains a ``.weight``; Laguna's ``mlp.shared_expert.`` (its dots match any
    character) turns ``shared_experts.gate_proj`` into ``shared_experts..gate_proj``.
    Found by converting the keys an adapter of each module would be saved
    under and seeing which do not come back unchanged; empty for a model with
    no conversion (nearly all) or a peft without one."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return set()
    if not names or get_checkpoint_conversion_mapping(getattr(model.config, "model_type", None)) is None:
        return set()
    import torch

    saved = {f"base_model.model.{name}.lora_{part}.weight": name for name in names for part in "AB"}
    try:
        loaded = convert_peft_adapter_state_dict_for_transformers(
            model, LoraConfig(target_modules=sorted(names)), {key: torch.zeros(1, 1) for key in saved}, "default")
    except Exception:  # noqa: BLE001 - a conversion that cannot run on this probe: nothing is known lost
        return set()
    return {name for key, name in saved.items() if key not in loaded}


def generic_linear_targets(model) -> list[str]:
    """Every linear layer (:func:`linear_layer_types`) a text forward runs as
    one (:func:`linear_layers_run_on_text`), except the output head.

    Targets are leaf names (``q_proj``) where every module of that name is such
    a layer; otherwise the full module names, so peft is never asked to adapt
    a same-named module of another kind (a Mamba mixer's ``out_proj`` beside
    an attention ``out_proj``, say)."""
    head = model.get_output_embeddings()
    head_modules = {id(m) for m in head.modules()} if head is not None else set()
    run = linear_layers_run_on_text(model)
    linear = linear_layer_types()
    refused = peft_refuses(model)
    by_leaf: dict[str, list[tuple[str, bool]]] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        wanted = (isinstance(module, linear) and id(module) not in head_modules and (run is None or name in run)
                  and not refused(name.rsplit(".", 1)[-1]))
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append((name, wanted))
    # an adapter peft would drop when loading it back is not trained at all, and the user is told which
    lost = adapters_peft_cannot_reload(model, [name for named in by_leaf.values() for name, wanted in named if wanted])
    if lost:
        log.warning("lora_target_linear: not adapting %s: peft renames these modules' saved LoRA weights when "
                    "loading them (the model's checkpoint conversion in transformers matches their names too), "
                    "so an adapter of them would not load back", ", ".join(sorted(lost)))
        by_leaf = {leaf: [(name, wanted and name not in lost) for name, wanted in named]
                   for leaf, named in by_leaf.items()}
    targets: list[str] = []
    for leaf, named in sorted(by_leaf.items()):
        chosen = [name for name, wanted in named if wanted]
        if chosen and len(chosen) == len(named):
            targets.append(leaf)
        else:
            targets.extend(chosen)
    return targets


def expert_targets(cfg, model) -> list[str]:
    """peft ``target_parameters`` for ``lora_target_experts: true`` (a plait-models
    key): the family's fused 3D expert weights, which are parameters, not
    ``nn.Linear`` modules, so ``target_modules`` cannot reach them. Empty when
    the key is off; an error when no family names experts for this model, since
    the experts would otherwise stay frozen without a word."""
    from plait.families import find_family

    if not getattr(cfg, "lora_target_experts", False):
        return []
    pm = cfg.plugin_manager
    model_type = model.config.model_type
    family = find_family(pm, model_type) if pm is not None else None
    if family is None or not family.expert_parameters:
        raise ConfigError(f"config key 'lora_target_experts': true, but model type {model_type!r} has no fused "
                          "expert parameters known to a model family (plait-models); set it to false")
    # peft's ParamWrapper (LoRA on a parameter) computes W + BA once, so input dropout and DoRA cannot apply
    for key, value in (("lora_dropout", cfg.lora_dropout), ("peft_use_dora", cfg.peft_use_dora)):
        if value:
            raise ConfigError(f"config key {key!r}: {value!r} cannot be combined with lora_target_experts: true "
                              "(peft adapts fused expert parameters without dropout or DoRA); set it to 0/false")
    from plait_peft.parameters import logical_parameters

    names = [f"{module_name}.{name}" for module_name, _, name in logical_parameters(model)]
    missing = [s for s in family.expert_parameters if not any(n.endswith("." + s) for n in names)]
    if missing:
        raise ConfigError(f"config key 'lora_target_experts': the {family.name} expert parameters {missing} "
                          f"are not in this {model_type} model")
    return list(family.expert_parameters)


def target_modules(cfg, model):
    """peft ``target_modules``: a list of names, or a regex string."""
    explicit = cfg.lora_target_modules
    if isinstance(explicit, str):
        try:
            re.compile(explicit)
        except re.error as exc:
            raise ConfigError(f"config key 'lora_target_modules': {explicit!r} is not a valid regex: {exc}") from None
        if cfg.lora_target_linear:
            raise ConfigError("lora_target_modules as a regex cannot be combined with lora_target_linear; "
                              "give a list of names instead")
        return explicit
    targets = list(explicit or [])
    if cfg.lora_target_linear:
        targets += [t for t in linear_targets(cfg, model) if t not in targets]
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if n})[:20]
        raise ConfigError(f"config key 'lora_target_modules': {missing} match no module of this "
                          f"{model.config.model_type} model; modules are e.g. {leaves}")
    return targets


def keys_differing_from_saved_adapter(cfg, adapter_dir) -> list[str]:
    """``"key: set (saved value)"`` for each LoRA shape key the user set (not a
    default) that differs from the adapter saved in ``adapter_dir``; empty when
    the directory is not local and readable (a hub id: peft fetches it)."""
    try:
        saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return []
    differing = []
    for key, field in SAVED_SHAPE_KEYS.items():
        if cfg.source_of(key) == "default" or field not in saved:
            continue
        given, kept = getattr(cfg, key), saved[field]
        if isinstance(given, (list, tuple)) and isinstance(kept, (list, tuple)):
            same = sorted(given) == sorted(kept)  # peft saves target_modules from a set: any order
        else:
            same = given == kept
        if not same:
            differing.append(f"{key}: {given!r} (saved {kept!r})")
    return differing


def keep_adapter_in_compute_dtype(cfg) -> bool:
    """Adapters stay float32 under autocast, the safe default; with ``bf16: full``
    the user asked for pure bfloat16, so the adapter follows the base, as it does
    with ``peft_autocast_adapter_dtype: false``."""
    if cfg.peft_autocast_adapter_dtype is not None:
        return not cfg.peft_autocast_adapter_dtype
    return cfg.bf16 == "full"


def peft_task_type(model) -> str:
    """peft's task type for the model's class: a reward model's sequence classifier
    and a process reward model's token classifier get their own wrappers (a causal
    LM's wrapper needs generation methods these heads lack), as in Axolotl."""
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def attach_lora(cfg, model):
    """Return ``model`` wrapped as a ``peft.PeftModel`` with trainable LoRA weights."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from plait.model.loading import is_kbit_prepared
    from plait_peft.parameters import (keep_base_parametrizations, load_saved_adapter, nest_in_definition_order,
                                       parameter_targets)

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    # plait-bnb's loader already prepared the model (frozen base, input grads)
    # *without* peft's fp32 upcast of embeddings, head and norms, which would
    # undo its memory saving (plait.model.loading.mark_kbit_prepared)
    if quantized and not is_kbit_prepared(model):
        # QLoRA training; merge-lora reloads a qlora run's base unquantized and skips this
        # norms to float32 and input grads on, so gradients reach the adapters through the frozen 4-bit base;
        # gradient checkpointing is already on (core's model pipeline switches it on before adapters)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    autocast_adapter = not keep_adapter_in_compute_dtype(cfg)
    if cfg.lora_model_dir:
        differing = keys_differing_from_saved_adapter(cfg, cfg.lora_model_dir)
        if differing:
            log.info("lora_model_dir: training continues with the settings saved in %s; these keys you set differ "
                     "from it and are not used: %s", Path(cfg.lora_model_dir) / "adapter_config.json",
                     ", ".join(differing))
        return load_saved_adapter(model, cfg.lora_model_dir, autocast_adapter)
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # [] not None: without module targets peft would pick its own defaults for the model type
        target_modules=target_modules(cfg, model) or [],
        # fused MoE experts (3D nn.Parameters) are adapted by parameter name, not by module
        target_parameters=parameter_targets(cfg, model, expert_targets(cfg, model)) or None,
        modules_to_save=cfg.lora_modules_to_save,
        fan_in_fan_out=cfg.lora_fan_in_fan_out,
        layers_to_transform=cfg.peft_layers_to_transform,
        layers_pattern=cfg.peft_layers_pattern,
        rank_pattern=cfg.lora_rank_pattern or {},
        alpha_pattern=cfg.lora_alpha_pattern or {},
        init_lora_weights=True if cfg.peft_init_lora_weights is None else cfg.peft_init_lora_weights,
        trainable_token_indices=cfg.peft_trainable_token_indices,
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        ensure_weight_tying=bool(cfg.peft_ensure_weight_tying),
        bias="none",
        task_type=peft_task_type(model),
        **loftq_kwargs(cfg),
    )
    peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=autocast_adapter)
    # over 4-bit experts: peft's own ParamWrapper cleanup, and the same adapter keys as on a float base
    nest_in_definition_order(keep_base_parametrizations(peft_model))
    if cfg.gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when the embeddings are frozen
        peft_model.enable_input_require_grads()
    return peft_model


def loftq_kwargs(cfg) -> dict:
    """LoraConfig's LoftQ arguments for ``peft.loftq_config`` (Axolotl's meaning): the
    adapter is initialised by LoftQ, which also replaces each adapted base weight by
    its quantized value."""
    from plait_peft.config import loftq

    settings = loftq(cfg)
    if settings is None:
        return {}
    from peft import LoftQConfig

    return {"init_lora_weights": "loftq",
            "loftq_config": LoftQConfig(loftq_bits=settings.loftq_bits, loftq_iter=settings.loftq_iter)}
