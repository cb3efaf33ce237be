"""``varlen_attention``: packed rows through torch's ``varlen_attn`` stay isolated.

CPU: config validation, the collate fields, and the attention function's
reshaping/offsets with :func:`reference_varlen` (per-segment SDPA) injected as
the kernel -- checked against plain SDPA per row in fp32 within 1e-5, and
through a whole tiny Llama (loss and every gradient equal to one row at a time).
GPU (``-m gpu`` machines with ``torch.nn.attention.varlen``): the real kernel
in bf16 against the one-row-at-a-time SDPA reference in bf16.
"""

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

from plait.model.varlen import plait_varlen_attention, reference_varlen, register_varlen_attention
from plait.data.packing import collate_packed
from plait.data.packing import plan_packed_batches
from plait.errors import ConfigError
from plait.testing import make_tiny_model

SEQUENCE_LEN = 64
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("varlen") / "model")


# ----------------------------------------------------------------- config


def test_config_key_selects_plait_varlen(model_dir):
    from plait.config.schema import CoreConfig

    cfg = CoreConfig(base_model=str(model_dir), varlen_attention=True, sample_packing=True)
    assert cfg.attn_implementation == "plait_varlen"
    with pytest.raises(ConfigError, match="flex_attention and varlen_attention .*at most one attention backend"):
        CoreConfig(base_model=str(model_dir), varlen_attention=True, flex_attention=True)


def test_validation_refuses_varlen_without_packing_or_cuda(model_dir):
    pytest.importorskip("omegaconf")
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match=r"varlen_attention: true needs sample_packing: true"):
        build_run_config({"base_model": str(model_dir), "varlen_attention": True})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"varlen_attention: true needs a CUDA GPU"):
            build_run_config({"base_model": str(model_dir), "varlen_attention": True, "sample_packing": True})


# ---------------------------------------------------------------- collate


def test_collate_emits_offsets_and_no_mask():
    rows = [{"input_ids": [11, 12, 13, 21, 22, 31, 32], "labels": [11, 12, 13, 21, 22, 31, 32],
             "seq_lens": [3, 2, 2]}, {"input_ids": [41, 42], "labels": [-100, 42]}]
    batch = collate_packed(rows, 0, "plait_varlen", pad_to=8)
    assert "attention_mask" not in batch
    # bin 0: 3, 2, 2 + 1 padding; bin 1: 2 + 6 padding -- offsets over the flattened 2 x 8 batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8, 10, 16]
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 7, 8, 10, 16]
    assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 6
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, 32, -100], [-100, 42] + [-100] * 6]


def test_hook_collate_lays_out_plain_rows_as_segments(model_dir):
    """Plain (eval) rows get offsets too: the varlen kernel never sees a padding mask."""
    from types import SimpleNamespace

    from plait.builtin.collate import collate
    from transformers import AutoTokenizer

    cfg = SimpleNamespace(sequence_len=SEQUENCE_LEN, pad_to_sequence_len=False, attn_implementation="plait_varlen",
                          torch_dtype="float32", fp16=False, bf16=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = collate(cfg=cfg, rows=[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                                   {"input_ids": [8], "labels": [8]}], tokenizer=tokenizer)
    assert "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6]


# ------------------------------------------------- attention function (CPU)


def per_row_sdpa(query, key, value, seq_lens, scale):
    """Reference: each segment of each bin alone through causal SDPA; ``[B, W, H, D]``."""
    out = torch.empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for b, lens in enumerate(seq_lens):
        start = 0
        for length in lens:
            sl = slice(start, start + length)
            got = F.scaled_dot_product_attention(query[b:b + 1, :, sl], key[b:b + 1, :, sl], value[b:b + 1, :, sl],
                                                 is_causal=True, scale=scale, enable_gqa=True)
            out[b, sl] = got[0].transpose(0, 1)
            start += length
    return out


@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
def test_packed_attention_equals_per_row_sdpa(heads_kv):
    torch.manual_seed(0)
    width, heads, dim = 16, 4, 8
    seq_lens = [[5, 7, 4], [9, 3, 4]]  # two bins of 16 (padding tails counted as segments)
    query = torch.randn(2, heads, width, dim)
    key, value = torch.randn(2, heads_kv, width, dim), torch.randn(2, heads_kv, width, dim)
    fields = collate_packed([{"input_ids": [1] * width, "labels": [1] * width, "seq_lens": lens}
                             for lens in seq_lens], 0, "plait_varlen")
    out, weights = plait_varlen_attention(None, query, key, value, None, scaling=0.3, kernel=reference_varlen,
                                          **{k: v for k, v in fields.items() if k.startswith(("cu_", "max_"))})
    assert weights is None and out.shape == (2, width, heads, dim)
    torch.testing.assert_close(out, per_row_sdpa(query, key, value, seq_lens, 0.3), **FP32)
    # the control: one causal sequence per bin is not the same thing
    whole = per_row_sdpa(query, key, value, [[width], [width]], 0.3)
    assert (out - whole).abs().max() > 1e-2


def test_missing_or_mismatched_offsets_are_refused():
    q = torch.randn(2, 2, 4, 8)
    with pytest.raises(RuntimeError, match="needs cu_seq_lens_q"):
        plait_varlen_attention(None, q, q, q, None)
    cu = torch.tensor([0, 4], dtype=torch.int32)  # covers one row of 4, the batch has 2 x 4
    with pytest.raises(RuntimeError, match="must cover the flattened batch"):
        plait_varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, kernel=reference_varlen)
    whole = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="bf16/fp16 only"):  # the real kernel has no fp32
        plait_varlen_attention(None, q, q, q, None, cu_seq_lens_q=whole, cu_seq_lens_k=whole)


# ------------------------------------------------------ whole model (CPU)


def random_rows(n, vocab, seed=0, min_len=2, max_len=40):
    """Rows of random tokens; a random prompt prefix is untrained (-100)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(0, length - 1)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def materialize(rows, bin_):
    if len(bin_) == 1:
        return dict(rows[bin_[0]])
    return {"input_ids": [t for i in bin_ for t in rows[i]["input_ids"]],
            "labels": [t for i in bin_ for t in rows[i]["labels"]],
            "seq_lens": [len(rows[i]["input_ids"]) for i in bin_]}


def summed_loss(logits, labels):
    logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="sum"), int((labels != -100).sum())


def grads(model):
    return {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}


def one_by_one(model, rows):
    device = next(model.parameters()).device
    model.zero_grad()
    total, count = 0.0, 0
    for row in rows:
        loss, n = summed_loss(model(input_ids=torch.tensor([row["input_ids"]], device=device)).logits,
                              torch.tensor([row["labels"]], device=device))
        loss.backward()
        total, count = total + loss.item(), count + n
    return total, count, grads(model)


def packed(model, rows, micro_batch_size=2, pad_to=None):
    """Bins of 2 rows per micro-batch: the offsets span a flattened batch of 2."""
    device = next(model.parameters()).device
    model.zero_grad()
    plan = plan_packed_batches([len(r["input_ids"]) for r in rows], SEQUENCE_LEN, micro_batch_size, 0, 0)
    assert any(len(b) > 1 for mb in plan for b in mb) and any(len(mb) > 1 for mb in plan)
    total, count = 0.0, 0
    for micro_batch in plan:
        batch = collate_packed([materialize(rows, b) for b in micro_batch], 0, "plait_varlen", pad_to=pad_to,
                               device=device)
        assert batch["cu_seq_lens_q"].device.type == torch.device(device).type
        labels = batch.pop("labels").to(device)
        loss, n = summed_loss(model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}).logits,
                              labels)
        loss.backward()
        total, count = total + loss.item(), count + n
    return total, count, grads(model)


def load(model_dir, attn, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device)
    model.config.use_cache = False
    return model


def test_tiny_llama_with_reference_kernel_matches_one_by_one(model_dir):
    """The whole path -- collate, transformers' kwargs, no mask, GQA reshape -- on the CPU."""
    register_varlen_attention("plait_varlen_cpu_reference", kernel=reference_varlen)
    reference_model = load(model_dir, "sdpa")
    model = load(model_dir, "plait_varlen_cpu_reference")
    rows = random_rows(10, model.config.vocab_size, seed=1)
    ref_loss, ref_n, ref_grads = one_by_one(reference_model, rows)
    loss, n, got = packed(model, rows, pad_to=SEQUENCE_LEN)
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
    assert got.keys() == ref_grads.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], ref_grads[name], **FP32, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------- GPU


def _has_varlen():
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False


#: bf16 vs bf16 through different kernels and summation orders: loss within 1%
#: relative; every gradient with cosine >= 0.999 and relative norm error < 5%
#: (a leak across rows moves gradients by ~90%: see bench/packing_bench.py's
#: leaky control). The same bounds the bench applies to flash-attn varlen.
BF16_LOSS_REL = 1e-2
BF16_GRAD_COSINE = 0.999
BF16_GRAD_REL_NORM = 5e-2


@pytest.mark.gpu
def test_varlen_kernel_packed_loss_and_grads_on_gpu(model_dir):
    if not torch.cuda.is_available() or not _has_varlen():
        pytest.skip("needs CUDA and torch.nn.attention.varlen")
    register_varlen_attention()
    reference_model = load(model_dir, "sdpa", torch.bfloat16, "cuda")
    model = load(model_dir, "plait_varlen", torch.bfloat16, "cuda")
    rows = random_rows(12, model.config.vocab_size, seed=2)
    ref_loss, ref_n, ref_grads = one_by_one(reference_model, rows)
    for pad_to in (None, SEQUENCE_LEN):  # without and with a padding tail per bin
        loss, n, got = packed(model, rows, pad_to=pad_to)
        assert n == ref_n and loss == pytest.approx(ref_loss, rel=BF16_LOSS_REL)
        assert got.keys() == ref_grads.keys() and got
        rel = {name: ((got[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)).item()
               for name in got}
        cos = {name: F.cosine_similarity(got[name].flatten(), ref_grads[name].flatten(), dim=0).item()
               for name in got}
        worst = max(rel, key=rel.get)
        print(f"pad_to={pad_to}: loss rel {abs(loss - ref_loss) / ref_loss:.2e}, worst grad rel {rel[worst]:.2e} "
              f"({worst}), min cosine {min(cos.values()):.6f}")
        assert rel[worst] < BF16_GRAD_REL_NORM, f"{worst}: relative gradient error {rel[worst]:.3g}"
        assert min(cos.values()) >= BF16_GRAD_COSINE, cos


@pytest.mark.gpu
def test_varlen_kernel_matches_reference_kernel_on_gpu():
    """The real kernel against the per-segment SDPA reference, GQA, bf16 (is it causal? isolated?)."""
    if not torch.cuda.is_available() or not _has_varlen():
        pytest.skip("needs CUDA and torch.nn.attention.varlen")
    torch.manual_seed(0)
    seq_lens = [[50, 30, 48], [128]]
    q = torch.randn(2, 8, 128, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 128, 64, device="cuda", dtype=torch.bfloat16), torch.randn(
        2, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    fields = collate_packed([{"input_ids": [1] * 128, "labels": [1] * 128, "seq_lens": lens} for lens in seq_lens],
                            0, "plait_varlen", device="cuda")
    kwargs = {k_: v_ for k_, v_ in fields.items() if k_.startswith(("cu_", "max_"))}
    got, _ = plait_varlen_attention(None, q, k, v, None, **kwargs)
    want, _ = plait_varlen_attention(None, q.float(), k.float(), v.float(), None, kernel=reference_varlen, **kwargs)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------ sdpa_varlen


def _text_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **overrides)


@pytest.mark.parametrize("keys, config, reason", [
    ({"bf16": True}, {}, None),
    ({"bf16": False}, {}, "computes in float32"),
    ({"bf16": True}, {"head_dim": 512}, "head_dim 512 is above the kernel's 256"),
    ({"bf16": True}, {"attention_dropout": 0.1}, "attention_dropout is 0.1"),
    ({"bf16": True}, {"model_type": "gpt_oss"}, "sink logits"),
])
def test_sdpa_varlen_is_refused_where_the_kernel_cannot_serve_the_model(model_dir, keys, config, reason):
    from plait.model.choice import varlen_refusal
    from plait.testing import build_run_config

    cfg, _ = build_run_config({"base_model": str(model_dir), "sample_packing": True, "sdpa_varlen": True, **keys})
    model_type = config.pop("model_type", None)
    model_config = _text_config(**config)
    if model_type:
        model_config.model_type = model_type
    got = varlen_refusal(cfg, model_config, cuda=True)
    assert got is None if reason is None else reason in got
    assert "no CUDA GPU" in varlen_refusal(cfg, model_config, cuda=False)


def test_sdpa_varlen_keeps_sdpa_on_the_cpu_and_says_why(model_dir, caplog):
    import logging

    from plait.model.loading import pretrained_kwargs
    from plait.testing import build_run_config

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU test below covers it")
    cfg, _ = build_run_config({"base_model": str(model_dir), "sample_packing": True, "sdpa_varlen": True,
                               "bf16": True})
    with caplog.at_level(logging.INFO, logger="plait.model"):
        assert pretrained_kwargs(cfg)["attn_implementation"] == "sdpa"
    assert "sdpa_varlen: packed rows keep SDPA with the block mask: there is no CUDA GPU" in caplog.text


def test_sdpa_varlen_without_packing_or_sdpa_is_a_note(model_dir):
    from plait.testing import build_run_config

    cfg, _ = build_run_config({"base_model": str(model_dir), "sdpa_varlen": True})
    assert any("sdpa_varlen changes nothing without sample_packing" in note for note in cfg.notes)
    cfg, _ = build_run_config({"base_model": str(model_dir), "sdpa_varlen": True, "sample_packing": True,
                               "attn_implementation": "eager"})
    assert any("sdpa_varlen changes nothing with attn_implementation 'eager'" in note for note in cfg.notes)


@pytest.mark.gpu
def test_sdpa_varlen_routes_packed_training_through_the_kernel_on_gpu(model_dir, tmp_path):
    """On CUDA in bf16, sdpa_varlen: true trains through plait_varlen, with the losses of SDPA's block mask."""
    if not torch.cuda.is_available() or not _has_varlen():
        pytest.skip("needs CUDA and torch.nn.attention.varlen")
    from datasets import Dataset
    from types import SimpleNamespace

    from plait.testing import build_run_config
    from plait.train.loop import train

    rows = Dataset.from_list([{**row, "attention_mask": [1] * len(row["input_ids"]), "length": len(row["input_ids"])}
                              for row in random_rows(32, 500, seed=3)])
    curves = {}
    for sdpa_varlen in (False, True):
        cfg, pm = build_run_config({"base_model": str(model_dir), "output_dir": str(tmp_path / str(sdpa_varlen)),
                                    "sample_packing": True, "sequence_len": SEQUENCE_LEN, "micro_batch_size": 2,
                                    "bf16": True, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1,
                                    "sdpa_varlen": sdpa_varlen, "save_strategy": "no"})
        run = train(cfg, pm, data=SimpleNamespace(train=rows, eval=None))
        assert cfg.attn_implementation == ("plait_varlen" if sdpa_varlen else "sdpa")
        curves[sdpa_varlen] = [r["loss"] for r in run.metrics_log.read() if "loss" in r]
    assert curves[True] == pytest.approx(curves[False], rel=BF16_LOSS_REL)
