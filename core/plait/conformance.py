"""Does an architecture fine-tune in Plait? Checks for one transformers ``model_type``.

:func:`tiny_config` shrinks any causal-LM config generically (hidden sizes,
layers, heads, experts, vocabulary; the text and vision parts of composite
configs), :func:`build_tiny_model` saves a random-init model of it with the tiny
tokenizer, and :func:`check_architecture` runs it through Plait's real pipeline
on the CPU, one check at a time:

``logits``    one batch in eval mode: Plait's loss input (the backbone's hidden
              states and the head, or the model's own logits where the fused
              head cannot reproduce them) gives the loss of ``model(**inputs).logits``
``lora``      ``adapter: lora`` + ``lora_target_linear`` trains two steps; the saved
              adapter reloads in plain transformers + peft with the same logits,
              and ``plait merge-lora`` gives a plain model with those logits too
``full``      full fine-tuning trains two steps and reloads with the same logits
``packing``   ``sample_packing``: the packed micro-batch's summed loss equals the
              rows' losses run one by one (no leak across row boundaries)

Each check ends ``pass``, ``refused`` (a :class:`plait.errors.PlaitError`: a
message for the user, the right answer for what cannot work), ``mismatch`` (it
ran, the numbers disagree) or ``error`` (a traceback: a bug). ``bench/architectures.py``
sweeps every model type; the tests run a sample.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: tiny sizes, by config key; a key whose default is already smaller keeps it
HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "model_dim", "dim", "hidden_dim",
               "word_embed_proj_dim", "d_embed", "embedding_size")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
              "num_decoder_layers", "num_encoder_layers")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
             "encoder_attention_heads", "num_attention_heads_per_layer")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "n_head_kv")
HEAD_DIM_KEYS = ("head_dim", "attention_head_size", "kv_channels", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "qk_head_dim", "attention_head_dim")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "top_k", "num_selected_experts")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length")
#: overrides a default cannot be shrunk into generically (coupled sizes), per model type
EXTRA = {
    # Mamba-2 heads must tile expand * hidden_size exactly
    "mamba2": dict(num_heads=8, head_dim=16, expand=2, n_groups=1),
}

TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4, top_k=2,
            positions=256)
SEQUENCE_LEN = 64


def _tiny_int(key: str, value: int, n_layers_default: int | None) -> int | None:
    """The tiny value of an int config field, or ``None`` to leave it as it is."""
    k = key.lower()
    if k in HIDDEN_KEYS:
        return min(value, TINY["hidden"])
    if "intermediate" in k or k in ("ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "decoder_ffn_dim",
                                    "encoder_ffn_dim", "inner_hidden_size", "d_inner", "mlp_dim"):
        return min(value, TINY["intermediate"])
    if k in LAYER_KEYS:
        return min(value, TINY["layers"])
    if k in HEAD_KEYS:
        return min(value, TINY["heads"])
    if k in KV_HEAD_KEYS:
        return min(value, TINY["kv_heads"])
    if k in HEAD_DIM_KEYS:
        return min(value, TINY["head_dim"])
    if k in ("kv_lora_rank", "q_lora_rank"):
        return min(value, 32)
    if k in EXPERT_KEYS:
        return min(value, TINY["experts"])
    if k in TOP_K_KEYS:
        return min(value, TINY["top_k"])
    if k in ("n_shared_experts", "num_shared_experts", "n_group", "topk_group", "num_expert_group"):
        return min(value, 1)
    if "vocab" in k and k != "vocab_size" and value > 1024:
        return 512  # a second embedding table (BLT's hashed byte groups)
    if k in ("rotary_dim", "rotary_emb_dim"):
        return min(value, TINY["head_dim"] // 2)
    if k.endswith("_period") and "layer" in k and value > TINY["layers"]:
        return TINY["layers"]  # Jamba's attn_layer_period: every second layer, so the tiny model keeps both kinds
    if k.endswith("_offset") and "layer" in k and value >= TINY["layers"]:
        return TINY["layers"] - 1
    if k in POSITION_KEYS:
        return min(value, TINY["positions"]) if value >= SEQUENCE_LEN else None
    if "hidden_size" in k and value > 256:
        return TINY["hidden"]  # BLT's hidden_size_global: another part's hidden size, shrunk alike
    if (k.endswith("_size") or k.startswith(("num_", "n_"))) and value > 256 and any(
            part in k for part in ("hidden", "embed", "proj", "ffn", "mlp", "state", "expert", "head", "layer")):
        return 64
    return None


def _layer_pattern(value: str) -> bool:
    """A string with one character per layer (``"M-M*"``: Mamba, MLP, attention), not a word like ``"gelu"``."""
    return len(set(value)) <= (2 if value.isalpha() else 4)


def _layer_subset(pattern: list, n_default: int) -> list[int]:
    """Indices of a per-layer list to keep: the first layer of each kind (at most
    three kinds), so a hybrid keeps one attention and one recurrent layer."""
    seen, keep = set(), []
    for i, kind in enumerate(pattern):
        key = repr(kind)
        if key not in seen and len(keep) < 3:
            seen.add(key)
            keep.append(i)
    while len(keep) < min(TINY["layers"], n_default):
        keep.append(next(i for i in range(n_default) if i not in keep))
    return sorted(keep)


def tiny_overrides(defaults: dict, vocab: dict) -> dict:
    """Constructor arguments that make the config ``defaults`` (a ``to_dict()``) tiny.

    Only changed keys are returned, so values the config derives from others
    (``layer_types`` from the layer count, say) are derived again. Sub-configs
    (``text_config``, ``vision_config``, ...) are shrunk the same way.
    """
    n_layers_default = next((defaults[k] for k in LAYER_KEYS if isinstance(defaults.get(k), int)), None)
    out: dict[str, Any] = {}
    layer_lists = {k: v for k, v in defaults.items()
                   if (isinstance(v, list) or (isinstance(v, str) and _layer_pattern(v)))
                   and n_layers_default and len(v) == n_layers_default
                   and len(v) > TINY["layers"] and k not in ("model_type", "architectures")}
    kept_layers = None
    for key, value in layer_lists.items():
        # a list of layer kinds ("mamba", "attention"), not of layer indices
        kinds = isinstance(value, list) and not all(isinstance(x, int) for x in value)
        if kinds and len({repr(x) for x in value}) > 1:
            kept_layers = _layer_subset(value, n_layers_default)
            break
    # a size tied to the hidden size under another name (an adapter's in_dim, say) shrinks with it
    hidden_default = next((defaults[k] for k in HIDDEN_KEYS if isinstance(defaults.get(k), int)), None)
    for key, value in defaults.items():
        if (isinstance(value, int) and not isinstance(value, bool) and hidden_default and value == hidden_default
                and value > 256 and key not in POSITION_KEYS and key != "vocab_size" and "vocab" not in key):
            out[key] = TINY["hidden"]
            continue
        if isinstance(value, dict) and ("model_type" in value or "return_dict" in value):
            # a sub-config (text, vision, a patcher...): shrunk the same way
            kind = {"model_type": value["model_type"]} if "model_type" in value else {}
            out[key] = {**kind, **tiny_overrides(value, vocab)}
        elif value is None and key in EXPERT_KEYS + TOP_K_KEYS + ("n_shared_experts",):
            # an MoE config whose defaults leave the expert counts unset
            out[key] = {**dict.fromkeys(EXPERT_KEYS, TINY["experts"]), **dict.fromkeys(TOP_K_KEYS, TINY["top_k"]),
                        "n_shared_experts": 1}[key]
        elif value is None and key in ("head_dim", "num_key_value_heads") and any(k in defaults for k in HEAD_KEYS):
            # left unset by defaults whose model reads it as set (Ministral's head_dim, Nemotron's
            # num_key_value_heads), as every checkpoint has it: the tiny head width, no grouped-query attention
            out[key] = TINY["head_dim"] if key == "head_dim" else TINY["heads"]
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            tiny = _tiny_int(key, value, n_layers_default)
            if key in LAYER_KEYS and kept_layers is not None:
                tiny = len(kept_layers)
            if tiny is not None and tiny != value:
                out[key] = tiny
        elif key in layer_lists:
            idx = kept_layers or list(range(TINY["layers"]))
            picked = [value[i] for i in idx]
            out[key] = "".join(picked) if isinstance(value, str) else picked
        elif (isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
              and n_layers_default and max(value) < n_layers_default and ("layer" in key or "indices" in key)):
            n_new = len(kept_layers) if kept_layers else TINY["layers"]
            remapped = sorted({kept_layers.index(x) for x in value if kept_layers and x in kept_layers}
                              or {x for x in value if x < n_new})
            out[key] = remapped or [n_new - 1]
    heads = next((defaults[k] for k in HEAD_KEYS if isinstance(defaults.get(k), int)), None)
    for key in KV_HEAD_KEYS:
        if defaults.get(key) == heads and heads and key in out:
            # no grouped-query attention by default (latent attention, say): keep it that way
            out[key] = min(heads, TINY["heads"])
    if "vocab_size" in defaults:
        out.update({k: v for k, v in vocab.items() if k in defaults or k == "vocab_size"})
    return out


def tiny_config(model_type: str, vocab_size: int, bos: int = 0, eos: int = 1, pad: int = 2):
    """A tiny random-init-sized config of ``model_type`` (see :func:`tiny_overrides`)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    vocab = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                 decoder_start_token_id=bos)
    defaults = config_class().to_dict()
    overrides = tiny_overrides(defaults, vocab)
    overrides.update(EXTRA.get(model_type, {}))
    for key in derived_keys(config_class, defaults, overrides):
        del overrides[key]
    return config_class(**overrides)


def derived_keys(config_class, defaults: dict, overrides: dict) -> list[str]:
    """Keys of ``overrides`` that the config computes from the others.

    ``to_dict()`` lists derived values too (Zamba2's ``attention_hidden_size``
    is twice ``hidden_size``; LongCat's ``qk_head_dim`` the sum of its two
    parts), and shrinking each by its name breaks the relation a real checkpoint
    keeps. A key is derived when leaving it out of the tiny overrides still moves
    it off its default: the config then derives it again from the tiny sizes.
    """
    derived = []
    for key, value in overrides.items():
        if not isinstance(value, int) or isinstance(value, bool) or key not in defaults:
            continue
        rest = {k: v for k, v in overrides.items() if k != key}
        try:
            again = getattr(config_class(**rest), key, defaults[key])
        except Exception:  # noqa: BLE001 - this key is needed for a valid config: keep it
            continue
        if again != defaults[key]:
            derived.append(key)
    return derived


def build_tiny_model(model_type: str, path, tokenizer_dir=None, seed: int = 0) -> Path:
    """Save a random-init tiny ``model_type`` causal LM with the tiny tokenizer in ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or make_tiny_tokenizer(path))
    config = tiny_config(model_type, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------ checks


def random_rows(n: int, vocab: int, seed: int = 0, min_len: int = 4, max_len: int = 24):
    """Rows of random token ids (ids from 8: clear of the special tokens), the
    first two untrained (-100) as a prompt would be."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(8, vocab) for _ in range(rng.randint(min_len, max_len))]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:], "attention_mask": [1] * len(ids),
                     "length": len(ids)})
    return rows


def _keys(model_dir, out_dir, **extra) -> dict:
    return {"base_model": str(model_dir), "output_dir": str(out_dir), "sequence_len": SEQUENCE_LEN,
            "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "warmup_steps": 0, "seed": 0,
            "save_safetensors": True, **extra}


def _run_for(keys: dict):
    """A validated config and a :class:`plait.train.loop.Run` with the model
    built exactly as training builds it (``build_model``), in eval mode."""
    from plait.testing import build_run_config
    from plait.train.distributed import init_distributed
    from plait.train.loop import Run, build_model

    cfg, pm = build_run_config(keys)
    run = Run(cfg=cfg, pm=pm, output_dir=Path(cfg.output_dir), world=init_distributed())
    run.tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    run.model = build_model(run)
    run.loss_fn = pm.hook.build_loss(cfg=cfg, model=run.model)
    run.model.eval()
    return run


def _loss(run, rows) -> tuple[float, int]:
    import torch

    from plait.train.loop import loss_of

    batch = run.pm.hook.collate(cfg=run.cfg, rows=rows, tokenizer=run.tokenizer)
    with torch.no_grad():
        loss, n = loss_of(run, batch)
    return float(loss), int(n)


def _model_loss(model, batch) -> float:
    """Summed next-token cross-entropy from the model's own logits."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    logits, labels = logits[:, :-1], labels[:, 1:]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=-100, reduction="sum"))


def check_logits(model_dir, work) -> str:
    """Plait's loss on one padded batch == the loss of ``model(**inputs).logits``."""
    run = _run_for(_keys(model_dir, Path(work) / "logits"))
    rows = random_rows(3, run.model.config.get_text_config().vocab_size, seed=3)
    batch = run.pm.hook.collate(cfg=run.cfg, rows=rows, tokenizer=run.tokenizer)
    plait_loss, _ = _loss(run, rows)
    model_loss = _model_loss(run.model, batch)
    if not math.isclose(plait_loss, model_loss, rel_tol=1e-4, abs_tol=1e-4):
        raise Mismatch(f"Plait's loss {plait_loss:.6f} != the model's logits' loss {model_loss:.6f}")
    plan = _head_plan(run.model)
    path = "fused head" if plan is None or plan.fused else f"the model's own logits ({plan.reason})"
    return f"{path}; loss {plait_loss:.4f} on both paths"


def _head_plan(model):
    try:
        from plait.model.forward import head_plan
    except ImportError:  # a Plait without head plans (the sweep's "before" numbers)
        return None
    return head_plan(model)


def check_packing(model_dir, work) -> str:
    """Packed rows' summed loss == the rows' losses one by one (eval mode)."""
    run = _run_for(_keys(model_dir, Path(work) / "packing", sample_packing=True))
    vocab = run.model.config.get_text_config().vocab_size
    rows = random_rows(4, vocab, seed=5, max_len=15)
    alone = [_loss(run, [row]) for row in rows]
    packed_row = {"input_ids": sum((r["input_ids"] for r in rows), []),
                  "labels": sum((r["labels"] for r in rows), []),
                  "seq_lens": [len(r["input_ids"]) for r in rows]}
    packed_loss, packed_n = _loss(run, [packed_row])
    alone_loss, alone_n = sum(a for a, _ in alone), sum(n for _, n in alone)
    # each row's first label is masked in a packed bin, as the loss loses no trained token of a row alone
    if packed_n != alone_n or not math.isclose(packed_loss, alone_loss, rel_tol=1e-4, abs_tol=1e-4):
        raise Mismatch(f"packed loss {packed_loss:.6f} ({packed_n} tokens) != rows alone {alone_loss:.6f} "
                       f"({alone_n} tokens): packed rows leak into each other")
    try:
        from plait.model.forward import segment_mixers
    except ImportError:  # a Plait without the per-row route (the sweep's "before" numbers)
        return f"packed == unpacked ({packed_loss:.4f})"
    mixers = segment_mixers(run.model)
    if mixers:
        kinds = sorted({type(run.model.get_submodule(n)).__name__ for n in mixers})
        return f"packed == unpacked ({packed_loss:.4f}); {PER_ROW_NOTE}: {', '.join(kinds[:3])}"
    return f"packed == unpacked ({packed_loss:.4f})"


#: what a packing pass says when the model's recurrent layers run one packed row at a time (the matrix reads it)
PER_ROW_NOTE = "recurrent layers run one packed row at a time"


def _train(model_dir, out_dir, **extra):
    from datasets import Dataset

    from plait.testing import build_run_config
    from plait.train.loop import train

    cfg, pm = build_run_config(_keys(model_dir, out_dir, **extra))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    data = SimpleNamespace(train=Dataset.from_list(random_rows(8, vocab, seed=7)), eval=None)
    run = train(cfg, pm, data=data)
    losses = [r["loss"] for r in run.metrics_log.read() if "loss" in r]
    if len(losses) != 2 or not all(math.isfinite(x) for x in losses):
        raise Mismatch(f"training losses {losses}: expected two finite values")
    return run, losses, cfg


def _same_logits(expected_model, got_model, vocab: int, what: str, atol: float = 1e-4) -> None:
    import torch

    ids = torch.tensor([[8 + (i * 7) % (vocab - 8) for i in range(12)]])
    expected_model.eval()
    got_model.eval()
    with torch.no_grad():
        expected = expected_model(input_ids=ids, use_cache=False).logits.float()
        got = got_model(input_ids=ids, use_cache=False).logits.float()
    # relative to the logits' scale: merging W + BA rounds differently from x @ W + (x @ A) @ B
    atol = atol * max(1.0, float(expected.abs().max()))
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=atol):
        diff = float((expected - got).abs().max()) if expected.shape == got.shape else "shape"
        raise Mismatch(f"{what}: logits differ from the trained model's (max |diff| {diff})")


def _reload(path, **kwargs):
    """The saved model in plain transformers: ``AutoModelForCausalLM``, or the
    class a text-only checkpoint of a composite model names (see
    :func:`plait.model.loading.causal_lm_class`)."""
    import torch
    from transformers import AutoConfig

    from plait.model.loading import causal_lm_class

    return causal_lm_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32, **kwargs)


def check_lora(model_dir, work) -> str:
    """LoRA on every linear layer: trains, reloads in peft, merges with ``plait merge-lora``."""
    from peft import PeftModel

    from plait.testing import run_cli, write_config

    out = Path(work) / "lora"
    run, losses, cfg = _train(model_dir, out, adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8)
    vocab = run.model.config.get_text_config().vocab_size
    attn = run.model.config._attn_implementation
    # a BERT-style base trained as a decoder (Plait's loader sets is_decoder) is reloaded as one, as its note says
    decoder = {"is_decoder": True} if getattr(run.model.config, "is_decoder", None) else {}
    reloaded = PeftModel.from_pretrained(_reload(model_dir, attn_implementation=attn, **decoder), out)
    try:
        _same_logits(run.model, reloaded, vocab, "base + saved adapter in peft")
    except Mismatch as exc:
        raise Mismatch(f"{exc}{_tensors_lost(run.model, reloaded, out / 'adapter_model.safetensors', 'lora_')}") \
            from None
    config_path = write_config(Path(work) / "lora.yml", **_keys(model_dir, out, adapter="lora",
                                                                 lora_target_linear=True))
    result = run_cli(["merge-lora", str(config_path)])
    if result.exit_code != 0:
        raise Mismatch(f"merge-lora exited {result.exit_code}: {result.stderr.strip()[-400:]}")
    _same_logits(run.model, _reload(out / "merged", attn_implementation=attn), vocab, "merged model")
    return f"losses {losses[0]:.3f} -> {losses[1]:.3f}; peft reload and merge-lora match"


def _tensors_lost(trained, reloaded, saved_file, only: str = "") -> str:
    """Which tensors (names containing ``only``) did not load back as trained,
    as a clause to append to a mismatch ("" when all came back), saying whether
    ``saved_file`` holds them as trained: then the loss is on the loading side
    (peft 0.21 passes adapter keys through transformers' checkpoint renamings,
    whose patterns can rewrite a module path such as ``shared_experts.`` or
    ``sconv.weight_proj``; a model's ``_init_weights`` can overwrite a loaded
    row, as YouTu's zeroes the padding row of its tied embedding)."""
    import torch
    from safetensors import safe_open

    got = reloaded.state_dict()
    lost = [name for name, tensor in trained.state_dict().items()
            if only in name and name in got and not torch.equal(tensor.float().cpu(), got[name].float().cpu())]
    if not lost:
        return ""
    name = lost[0]
    where = "the saved file does not hold it under that name"
    try:
        with safe_open(str(saved_file), "pt") as f:
            keys = set(f.keys())
            for key in (name.replace(".default.", "."), name):
                if key in keys:
                    same = torch.equal(f.get_tensor(key).float(), trained.state_dict()[name].float().cpu())
                    where = ("the saved file holds it as trained, so it was lost when loading" if same
                             else "the saved file holds other values")
                    break
    except OSError:
        where = "the saved file could not be read"
    return f"; {len(lost)} tensors did not load back as trained, e.g. {name} ({where})"


def check_full(model_dir, work) -> str:
    """Full fine-tuning: trains and reloads in plain transformers."""
    out = Path(work) / "full"
    run, losses, _ = _train(model_dir, out)
    vocab = run.model.config.get_text_config().vocab_size
    reloaded = _reload(out, attn_implementation=run.model.config._attn_implementation)
    try:
        _same_logits(run.model, reloaded, vocab, "saved full model")
    except Mismatch as exc:
        raise Mismatch(f"{exc}{_tensors_lost(run.model, reloaded, out / 'model.safetensors')}") from None
    return f"losses {losses[0]:.3f} -> {losses[1]:.3f}; reload matches"


class Mismatch(Exception):
    """A check ran but its numbers disagree."""


CHECKS = {"logits": check_logits, "lora": check_lora, "full": check_full, "packing": check_packing}


def run_check(fn, *args) -> dict:
    """``{"status", "detail"}`` of one check."""
    from plait.errors import PlaitError

    try:
        return {"status": "pass", "detail": fn(*args)}
    except Mismatch as exc:
        return {"status": "mismatch", "detail": str(exc)}
    except PlaitError as exc:
        return {"status": "refused", "detail": " ".join(str(exc).split())[:500]}
    except Exception as exc:  # noqa: BLE001 - the point is to record it
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return {"status": "error", "detail": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]} "
                                             f"(at {where})"}


def check_architecture(model_type: str, work, checks=tuple(CHECKS), tokenizer_dir=None) -> dict:
    """Build a tiny ``model_type`` in ``work`` and run ``checks`` on it; returns
    ``{"model_type", "built": {...}, <check>: {...}}`` with a status and a
    detail for each."""
    import torch

    work = Path(work)
    torch.manual_seed(0)
    result: dict[str, Any] = {"model_type": model_type}
    result["built"] = run_check(lambda: _build(model_type, work / "model", tokenizer_dir))
    if result["built"]["status"] != "pass":
        return result
    for name in checks:
        result[name] = run_check(CHECKS[name], work / "model", work)
    return result


def _build(model_type, path, tokenizer_dir) -> str:
    from transformers import AutoConfig

    build_tiny_model(model_type, path, tokenizer_dir)
    config = AutoConfig.from_pretrained(path)
    return ", ".join(config.architectures or [])
