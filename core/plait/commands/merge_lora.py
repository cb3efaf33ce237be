"""`plait merge-lora CONFIG`: fold the trained LoRA adapter into its base model.

The base is loaded unquantized in float32 even when the run was QLoRA
(merging into 4-bit weights would lose the update), the adapter from
``output_dir`` (or ``--lora-model-dir``) is merged, and the result is cast to
the dtype the base checkpoint is stored in and saved with the tokenizer to
``output_dir/merged`` (or ``--out``), loadable with plain transformers.
"""

from __future__ import annotations

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--lora-model-dir", metavar="DIR", help="the adapter to merge (default: output_dir)")
    parser.add_argument("--out", metavar="DIR", help="where to save (default: output_dir/merged)")


def unquantized_fp32(cfg):
    """The config with 4/8-bit loading off, float32 weights and no device
    placement (the merge runs on the CPU): ``W + B @ A * scale`` is done at
    full precision, then cast once."""
    update = {k: False for k in ("load_in_4bit", "load_in_8bit") if k in type(cfg).model_fields}
    return cfg.model_copy(update={**update, "torch_dtype": "float32", "device_map": None, "max_memory": None})


def base_dtype(cfg):
    """The dtype the base checkpoint is stored in (its config's ``dtype``), float32 when unknown."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge(cfg, pm, adapter_dir, out_dir):
    """Load base + adapter on the CPU, merge, save. Returns the merged model."""
    import torch

    from plait.errors import ConfigError
    from plait.train.trained import is_adapter_dir, load_trained

    if not is_adapter_dir(adapter_dir):
        raise ConfigError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json); merge-lora needs a LoRA run "
                          f"(adapter: lora or qlora) or --lora-model-dir")
    if cfg.gptq:
        # a GPTQ base keeps packed integer weights: W + B @ A has nowhere to go
        raise ConfigError(f"config key 'gptq': true; {cfg.base_model!r} is a GPTQ checkpoint, whose packed 4-bit "
                          f"weights cannot take a merged adapter; merge into the float model it was quantized from "
                          f"(base_model: that model, gptq: false), or load the adapter over the GPTQ base "
                          f"(lora_model_dir)")
    model, tokenizer, _ = load_trained(unquantized_fp32(cfg), pm, adapter_dir, device=torch.device("cpu"))
    merged = model.merge_and_unload().to(base_dtype(cfg))
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=cfg.tokenizer_save_jinja_files)
    copy_processor_files(adapter_dir, out_dir)
    return merged


#: files a vision-language run saves beside its adapter (its processor's settings)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def copy_processor_files(adapter_dir, out_dir) -> None:
    """Carry the processor's settings over, so the merged model loads with
    ``AutoProcessor`` like the adapter run did."""
    import shutil
    from pathlib import Path

    for name in PROCESSOR_FILES:
        if (Path(adapter_dir) / name).is_file():
            shutil.copy2(Path(adapter_dir) / name, Path(out_dir) / name)


def run(args, pm) -> int:
    from pathlib import Path

    cfg, pm = load_run_config(args, pm)
    adapter_dir = Path(args.lora_model_dir or cfg.output_dir)
    out_dir = Path(args.out or Path(cfg.output_dir) / "merged")
    merged = merge(cfg, pm, adapter_dir, out_dir)
    dtype = next(merged.parameters()).dtype
    print(f"merged {adapter_dir} into {cfg.base_model} ({str(dtype).replace('torch.', '')}); saved to {out_dir}")
    return 0
