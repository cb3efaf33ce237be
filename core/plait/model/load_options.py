"""How the base model is loaded, by Axolotl's keys: a transformers
quantization config (``model_quantization_config``), a GPTQ checkpoint
(``gptq``) and placement over this machine's devices (``device_map``,
``max_memory``). Each becomes a ``from_pretrained`` argument
(:func:`load_kwargs`, added by :func:`plait.model.loading.pretrained_kwargs`);
the checks here run at config time, and what this machine lacks (a package,
a GPU) is a :class:`~plait.errors.MachineFactError` (a note for ``plait config
validate``, a refusal for ``plait train``).
"""

from __future__ import annotations

#: device_map strings from_pretrained places a model with (accelerate's strategies)
PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

#: keys that parallelise over processes and so own the placement (plait-parallel's)
PARALLEL_KEYS = ("fsdp", "fsdp_config", "fsdp_version", "tensor_parallel_size", "context_parallel_size")


def quantization_config_classes() -> dict:
    """transformers' quantization config classes by name (every class its
    ``AutoQuantizationConfig`` knows), read from the installed transformers."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    return {cls.__name__: cls for cls in AUTO_QUANTIZATION_CONFIG_MAPPING.values()}


def _bnb_keys_on(cfg) -> list[str]:
    # plait-bnb's keys, read by name: core imports no plugin
    return [key for key in ("load_in_4bit", "load_in_8bit") if getattr(cfg, key, False)]


def build_named_quantization_config(cfg):
    """``model_quantization_config`` built with its kwargs (ConfigError naming
    the key for an unknown class or arguments the class refuses)."""
    from plait.errors import ConfigError, did_you_mean

    name = cfg.model_quantization_config
    classes = quantization_config_classes()
    if name not in classes:
        raise ConfigError(f"config key 'model_quantization_config': {name!r} is not a transformers quantization config "
                          f"class{did_you_mean(name, classes)}; accepted: {', '.join(sorted(classes))}")
    try:
        return classes[name](**cfg.model_quantization_config_kwargs)
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"config key 'model_quantization_config_kwargs': {cfg.model_quantization_config_kwargs!r} "
                          f"is not accepted by {name}: {reason}") from None


#: what :func:`checkpoint_quantization` returns when it did not read the config (a hub name at validate)
NOT_READ = object()


def checkpoint_quantization(cfg, *, read_hub: bool):
    """The ``quantization_config`` of ``base_model``'s config.json (or of
    ``base_model_config``), ``None`` when it has none: read from a local
    directory always, from the hub only when ``read_hub`` (at load, never at
    validate); :data:`NOT_READ` otherwise."""
    import json
    import os

    source = getattr(cfg, "base_model_config", None) or cfg.base_model
    path = os.path.join(source, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("quantization_config")
    if not read_hub:
        return NOT_READ
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, revision=cfg.revision_of_model, trust_remote_code=cfg.trust_remote_code)
    found = getattr(config, "quantization_config", None)
    return found.to_dict() if hasattr(found, "to_dict") else found


def gptq_config(cfg, *, read_hub: bool = True):
    """``GPTQConfig`` from the checkpoint's own quantization_config, as Axolotl
    builds it; ``gptq_disable_exllama: true`` asks gptqmodel for a trainable
    kernel (exllama has no backward) where the checkpoint leaves the backend
    to gptqmodel (unset or ``auto``), transformers 5 having replaced the
    exllama switches by ``backend``. ``None`` when the config was not read."""
    from transformers import GPTQConfig

    from plait.errors import ConfigError

    found = checkpoint_quantization(cfg, read_hub=read_hub)
    if found is NOT_READ:
        return None
    if not found or found.get("quant_method") != "gptq":
        method = (found or {}).get("quant_method")
        raise ConfigError(f"config key 'gptq': true, but {cfg.base_model!r} is not a GPTQ checkpoint (its config.json "
                          f"has {'quant_method ' + repr(method) if method else 'no quantization_config'}); use a GPTQ "
                          f"checkpoint or remove gptq")
    settings = {key: value for key, value in found.items() if key not in ("quant_method", "disable_exllama",
                                                                          "use_exllama", "exllama_config")}
    if cfg.gptq_disable_exllama and settings.get("backend") in (None, "auto"):  # auto may choose exllama
        settings["backend"] = "auto_trainable"
    try:
        return GPTQConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'gptq': the checkpoint's GPTQ quantization_config is not accepted by "
                          f"transformers' GPTQConfig: {' '.join(str(exc).split())}") from None


def quantization_config(cfg, *, read_hub: bool = True):
    """The ``quantization_config`` these keys pass to ``from_pretrained``, or ``None``."""
    if cfg.model_quantization_config:
        return build_named_quantization_config(cfg)
    if cfg.gptq:
        return gptq_config(cfg, read_hub=read_hub)
    return None


def check_quantization_keys(cfg) -> None:
    """Conflicts, bad names and arguments (ConfigError); what this machine
    lacks for the chosen quantization (MachineFactError, from transformers'
    own environment check of that method)."""
    from plait.errors import ConfigError

    if cfg.model_quantization_config_kwargs and not cfg.model_quantization_config:
        raise ConfigError("config key 'model_quantization_config_kwargs' is set without model_quantization_config; "
                          "name the class (e.g. model_quantization_config: Mxfp4Config) or remove the kwargs")
    if cfg.gptq_disable_exllama is not None and not cfg.gptq:
        raise ConfigError("config key 'gptq_disable_exllama' chooses the kernels of a GPTQ base, and gptq is off; set "
                          "gptq: true or remove gptq_disable_exllama")
    chosen = [key for key in ("model_quantization_config", "gptq") if getattr(cfg, key)]
    bnb = _bnb_keys_on(cfg)
    if len(chosen) > 1 or (chosen and bnb):
        both = chosen + bnb
        raise ConfigError(f"config keys {' and '.join(repr(k) for k in both)} each choose how the base model is "
                          f"quantized; keep one of them")
    if not chosen:
        return
    if cfg.gptq and cfg.adapter == "qlora":
        raise ConfigError("config key 'gptq': true with adapter: qlora; a GPTQ base is trained with adapter: lora "
                          "(qlora means a bitsandbytes 4-bit base)")
    config = quantization_config(cfg, read_hub=False)
    check_quantization_environment(chosen[0], config, cfg)


def check_quantization_environment(key: str, config, cfg) -> None:
    """transformers' ``validate_environment`` of the method's quantizer, run
    now on a copy of ``config``: a missing package or GPU is a fact of this
    machine. A GPTQ config not read yet (a hub checkpoint) is checked by
    method alone."""
    import copy

    from plait.errors import MachineFactError

    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if config is None:  # gptq on a hub checkpoint: the method is known, its settings are read at load
        from transformers import GPTQConfig

        config = GPTQConfig(bits=4)
    method = config.quant_method.value if hasattr(config.quant_method, "value") else config.quant_method
    if method == "bitsandbytes":
        method = "bitsandbytes_8bit" if getattr(config, "load_in_8bit", False) else "bitsandbytes_4bit"
    quantizer_class = AUTO_QUANTIZER_MAPPING.get(method)
    if quantizer_class is None:
        return
    try:
        # some quantizers check their packages already when built (GPTQ: optimum)
        quantizer = quantizer_class(copy.deepcopy(config), pre_quantized=True)
        quantizer.validate_environment(device_map=cfg.device_map, weights_only=True)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise MachineFactError(f"config key {key!r}: {type(config).__name__} cannot load on this machine: "
                               f"{' '.join(str(exc).split())}") from None


def parallel_keys_set(cfg) -> list[str]:
    """The keys of :data:`PARALLEL_KEYS` the config sets to something that shards the run."""
    return [key for key in PARALLEL_KEYS if getattr(cfg, key, None) not in (None, False, [], {}, 1, "")]


def check_placement_keys(cfg) -> None:
    """``device_map`` / ``max_memory`` place one process's model: refused with
    the parallel keys (ConfigError) and under a multi-process launch
    (MachineFactError: the world size is a fact of the launch)."""
    import os

    from plait.errors import ConfigError, MachineFactError

    given = [key for key in ("device_map", "max_memory", "gpu_memory_limit") if getattr(cfg, key, None) is not None]
    if not given:
        return
    if cfg.max_memory is not None and getattr(cfg, "gpu_memory_limit", None) is not None:
        raise ConfigError("config keys 'gpu_memory_limit' and 'max_memory' both set the memory per device; keep "
                          "one (gpu_memory_limit is max_memory with the same limit for every GPU)")
    named = " and ".join(given)
    keys = f"config key{'s' if len(given) > 1 else ''} {' and '.join(repr(k) for k in given)}"
    parallel = parallel_keys_set(cfg)
    if parallel:
        raise ConfigError(f"{keys} {'places' if len(given) == 1 else 'place'} the model within one process, and "
                          f"{', '.join(parallel)} "
                          f"{'shards' if len(parallel) == 1 else 'shard'} it over processes; remove {named} (the "
                          f"parallel plugin places every shard)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise MachineFactError(f"{keys} {'splits' if len(given) == 1 else 'split'} the model over one process's "
                               f"devices (naive model "
                               f"parallel), and this launch runs {world_size} processes (WORLD_SIZE); run it as one "
                               f"process (plait train, not torchrun), or remove {named} and shard with fsdp")
    if isinstance(cfg.device_map, str) and not _is_device_name(cfg.device_map):
        raise ConfigError(f"config key 'device_map': {cfg.device_map!r} is neither a placement strategy nor a device; "
                          f"accepted: {', '.join(PLACEMENT_STRATEGIES)}, a device (cpu, cuda, cuda:1, 0), or a map "
                          f"of module names to devices such as {{'': 0}}")
    if isinstance(cfg.device_map, dict):
        bad = {module: device for module, device in cfg.device_map.items() if not _is_device_name(device, disk=True)}
        if bad:
            raise ConfigError(f"config key 'device_map': {bad!r} names no device; accepted devices: cpu, disk, "
                              f"cuda, cuda:N, mps, or a GPU index N")
    if cfg.max_memory is not None and isinstance(cfg.device_map, dict):
        raise ConfigError("config keys 'max_memory' and 'device_map' (a map) are both set: max_memory limits a "
                          "placement strategy (device_map: auto, balanced, sequential); remove one of them")
    if cfg.max_memory is not None:
        bad = [str(device) for device in cfg.max_memory if not _is_device_name(device, disk=True)]
        if bad:
            raise ConfigError(f"config key 'max_memory': {', '.join(bad)} names no device; accepted keys: a GPU "
                              f"index, cpu, disk, mps")


def _is_device_name(value, *, disk: bool = False) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    text = str(value)
    if text in PLACEMENT_STRATEGIES and not disk or (disk and text == "disk") or text.isdigit():
        return True
    import torch

    try:
        torch.device(text)
    except (RuntimeError, TypeError):
        return False
    return True


def placement_kwargs(cfg) -> dict:
    """``device_map`` / ``max_memory`` for ``from_pretrained``; ``max_memory``
    alone places with ``auto`` within its limits (Axolotl infers the same map
    through accelerate's ``infer_auto_device_map``)."""
    kwargs = {}
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    max_memory = cfg.max_memory if cfg.max_memory is not None else gpu_memory_limits(cfg)
    if max_memory is not None:
        kwargs["max_memory"] = dict(max_memory)
        kwargs.setdefault("device_map", "auto")
    return kwargs


#: where ``gpu_memory_limit`` puts what the GPUs do not hold: enough host memory for any model (Axolotl's figure)
HOST_MEMORY_FOR_THE_REST = "256GiB"


def gpu_memory_limits(cfg) -> dict | None:
    """``gpu_memory_limit`` as ``max_memory``: the limit (an int is GiB) for each GPU this machine has, and the
    rest in host memory."""
    limit = getattr(cfg, "gpu_memory_limit", None)
    if limit is None:
        return None
    import torch

    per_gpu = f"{limit}GiB" if isinstance(limit, int) else str(limit)
    return {**{index: per_gpu for index in range(torch.cuda.device_count())}, "cpu": HOST_MEMORY_FOR_THE_REST}


def process_device_map():
    """This process's GPU as a ``device_map`` (``LOCAL_RANK`` under torchrun), ``None`` without CUDA."""
    import os

    import torch

    return {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None


def load_kwargs(cfg) -> dict:
    """Every ``from_pretrained`` argument of this module's keys."""
    kwargs = placement_kwargs(cfg)
    config = quantization_config(cfg)
    if config is not None:
        kwargs["quantization_config"] = config
        # a quantized model is not moved after loading (the loop leaves it where it is), and quantizers place
        # weights while they load: onto this process's GPU, as Axolotl's default device_map does
        if "device_map" not in kwargs and process_device_map() is not None:
            kwargs["device_map"] = process_device_map()
    return kwargs
