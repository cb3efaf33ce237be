"""Packed rows train exactly as if run one by one, through real tiny models.

Reference: every row alone through the model (no padding, no mask). Packed:
the same rows bin-packed by :func:`plan_packed_batches`, laid out by core's
``collate``. The summed cross-entropy and every parameter gradient must match
in fp32 within ``rtol=1e-5, atol=1e-5`` (observed differences are <= ~2e-6,
summation order only); any leak across a row boundary changes them by far more.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from plait.data.packing import collate_packed
from plait.model.batch import pad_rows
from plait.data.packing import plan_packed_batches
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)
SEQUENCE_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("packing") / "model")


def load(model_dir, attn, *, use_cache=False, lora=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = use_cache
    if lora:
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: random A and B, so the adapter changes the output and both get gradients
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    return model


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
    """One packed row from a bin, as the data step builds it (plain row when alone)."""
    if len(bin_) == 1:
        return dict(rows[bin_[0]])
    return {"input_ids": [t for i in bin_ for t in rows[i]["input_ids"]],
            "labels": [t for i in bin_ for t in rows[i]["labels"]],
            "seq_lens": [len(rows[i]["input_ids"]) for i in bin_]}


def summed_loss(logits, labels):
    """Summed next-token cross-entropy, shifting like the loop does (labels[:, 1:])."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    n = int((labels != -100).sum())
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum"), n


def reference(model, rows):
    device = next(model.parameters()).device
    model.zero_grad()
    total, n_tokens = 0.0, 0
    for row in rows:
        loss, n = summed_loss(model(input_ids=torch.tensor([row["input_ids"]], device=device)).logits,
                              torch.tensor([row["labels"]], device=device))
        loss.backward()
        total, n_tokens = total + loss.item(), n_tokens + n
    return total, n_tokens, grads(model)


def packed(model, rows, attn, micro_batch_size=2, pad_to=None, epoch=0):
    device = next(model.parameters()).device
    model.zero_grad()
    plan = plan_packed_batches([len(r["input_ids"]) for r in rows], SEQUENCE_LEN, micro_batch_size, 0, epoch)
    assert any(len(b) > 1 for mb in plan for b in mb)  # something is actually packed
    total, n_tokens = 0.0, 0
    for micro_batch in plan:
        batch = collate_packed([materialize(rows, b) for b in micro_batch], 0, attn, pad_to=pad_to,
                               dtype=torch.float32, device=device)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        labels = batch.pop("labels")
        loss, n = summed_loss(model(**batch).logits, labels)
        loss.backward()
        total, n_tokens = total + loss.item(), n_tokens + n
    return total, n_tokens, grads(model)


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(ref, got, tol=TOL):
    (ref_loss, ref_n, ref_grads), (loss, n, got_grads) = ref, got
    assert n == ref_n
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_loss_and_grads_equal_one_by_one(model_dir, attn, lora):
    model = load(model_dir, attn, lora=lora)
    rows = random_rows(14, model.config.vocab_size, seed=1)
    assert_same(reference(model, rows), packed(model, rows, attn))


def test_use_cache_in_config_does_not_matter(model_dir):
    model = load(model_dir, "sdpa", use_cache=True)
    rows = random_rows(8, model.config.vocab_size, seed=2)
    # pad_to_sequence_len: a padding tail in every bin, with its own segment
    assert_same(reference(model, rows), packed(model, rows, "sdpa", pad_to=SEQUENCE_LEN))


def test_eager_and_sdpa_give_identical_packed_losses(model_dir):
    rows = random_rows(10, 512, seed=3)
    losses = [packed(load(model_dir, attn), rows, attn)[0] for attn in ("eager", "sdpa")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_one_row_never_changes_its_neighbour(model_dir, attn):
    model = load(model_dir, attn)
    with torch.no_grad():  # sharp attention: a leak would move the logits a lot
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    rng = random.Random(4)
    first = [rng.randrange(3, 500) for _ in range(20)]
    other_first = [rng.randrange(3, 500) for _ in range(20)]
    second = [rng.randrange(3, 500) for _ in range(15)]

    def second_row_logits(first_tokens, isolate=True):
        row = {"input_ids": first_tokens + second, "labels": first_tokens + second, "seq_lens": [20, 15]}
        batch = collate_packed([row], 0, attn, dtype=torch.float32)
        batch.pop("labels")
        if not isolate:  # control: the same tokens with plain causal attention
            batch = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                     "attention_mask": torch.ones_like(batch["input_ids"])}
        with torch.no_grad():
            return model(**batch).logits[0, 20:]

    alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(second_row_logits(first), alone, **TOL)
    torch.testing.assert_close(second_row_logits(other_first), alone, **TOL)
    # the control proves the check can fail: without isolation the first row leaks in
    assert (second_row_logits(first, isolate=False) - second_row_logits(other_first, isolate=False)).abs().max() > 1e-2


def test_collate_layout_matches_the_diagram():
    rows = [{"input_ids": [11, 12, 13, 21, 22, 31, 32], "labels": [11, 12, 13, 21, 22, 31, 32],
             "seq_lens": [3, 2, 2]}, {"input_ids": [41, 42], "labels": [-100, 42]}]
    batch = collate_packed(rows, 0, "sdpa", pad_to=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 0], [41, 42, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, 32, -100], [-100, 42] + [-100] * 6]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0, 7].tolist() == [False] * 7 + [True]
    assert mask[1, 0, 5].tolist() == [False, False, True, True, True, True, False, False]

    eager = collate_packed(rows, 0, "eager", pad_to=8, dtype=torch.bfloat16)["attention_mask"]
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, mask)

    flash = collate_packed(rows, 0, "flash_attention_2", pad_to=8)
    assert "attention_mask" not in flash
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8, 10, 16]
    assert flash["cu_seq_lens_q"].dtype == torch.int32
    assert flash["max_length_q"] == flash["max_length_k"] == 6


def test_hook_collate_packs_only_packed_rows(model_dir):
    cfg, pm = build_run_config({"base_model": str(model_dir), "sample_packing": True, "eager_attention": True,
                                "bf16": False})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    plain = pm.hook.collate(cfg=cfg, rows=[{"input_ids": [5, 6], "labels": [5, 6]}], tokenizer=tokenizer)
    assert plain["attention_mask"].tolist() == [[1, 1]]  # eval without packing: plain padding
    packed_batch = pm.hook.collate(cfg=cfg, rows=[{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "seq_lens": [1, 2]}],
                                   tokenizer=tokenizer)
    assert packed_batch["attention_mask"].dtype == torch.float32  # eager: additive mask in the compute dtype
    assert packed_batch["labels"].tolist() == [[-100, -100, 7]]


def test_padded_rows_unchanged():
    batch = pad_rows([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], 0, pad_to=4)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_bad_seq_lens_are_refused():
    with pytest.raises(ValueError, match="seq_lens"):
        collate_packed([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lens": [1, 1]}], 0, "sdpa")


def test_validate_config_refuses_what_cannot_be_isolated(tmp_path, model_dir):
    import importlib.util
    import json
    import shutil

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="with sample_packing needs the flash-attn package"):
            build_run_config({"base_model": str(model_dir), "sample_packing": True, "flash_attention": True})
    windowed = tmp_path / "windowed"
    shutil.copytree(model_dir, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config["layer_types"] = ["full_attention", "linear_attention"]  # recurrent state runs across packed rows
    (windowed / "config.json").write_text(json.dumps(config))
    # which modules carry the state is known once loaded (recurrent ones may run one packed row at a time):
    # a model with none of those is refused then, by the layer types its config names
    from transformers import AutoModelForCausalLM

    from plait.data.packing import check_loaded_model

    cfg, _ = build_run_config({"base_model": str(windowed), "sample_packing": True, "sequence_len": 64})
    with pytest.raises(ConfigError, match=r"sample_packing with sdpa attention: packed rows would not be kept apart "
                                          r"\(layer_types \['linear_attention'\]: .*recurrent state"):
        check_loaded_model(cfg, AutoModelForCausalLM.from_pretrained(windowed))
    # fine without packing, and for a plain causal model
    build_run_config({"base_model": str(windowed), "sequence_len": 64})
    build_run_config({"base_model": str(model_dir), "sample_packing": True})


@pytest.mark.gpu
def test_flash_varlen_isolates_packed_rows(model_dir):
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs CUDA and flash-attn")
    model = load(model_dir, "flash_attention_2").to("cuda", torch.bfloat16)
    rows = random_rows(6, model.config.vocab_size, seed=5)
    batch = collate_packed([materialize(rows, [0, 1, 2])], 0, "flash_attention_2")
    batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        got = model(**batch).logits[0, :len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]
        alone = torch.cat([model(input_ids=torch.tensor([rows[i]["input_ids"]], device="cuda")).logits[0]
                           for i in (0, 1)])
    torch.testing.assert_close(got.float(), alone.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_flex_block_mask_isolates_packed_rows(model_dir, monkeypatch):
    """Forward only: flex attention has no CPU backward. The packed rows go through flex
    attention with Plait's BlockMask; the reference is every row alone through the same
    weights under sdpa. What is tested is the mask, so flex attention runs as torch gives it
    (unfused) rather than through transformers' ``torch.compile`` of it, and the rows alone
    skip transformers' compiled flex causal mask: inductor's CPU builds of those two took
    most of this test's time (~30 s on two cores)."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    model = load(model_dir, "flex_attention")
    rows = random_rows(3, model.config.vocab_size, seed=5)
    batch = collate_packed([materialize(rows, [0, 1, 2])], 0, "flex_attention", pad_to=SEQUENCE_LEN, device="cpu")
    assert type(batch["attention_mask"]).__name__ == "BlockMask"
    batch.pop("labels")
    plain = load(model_dir, "sdpa")
    with torch.no_grad():
        got = model(**batch).logits[0]
        alone = torch.cat([plain(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in rows])
    torch.testing.assert_close(got[:len(alone)], alone, **TOL)


@pytest.mark.gpu
def test_flex_packed_loss_and_grads_on_gpu(model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (flex attention has no CPU backward)")
    model = load(model_dir, "flex_attention").to("cuda")
    rows = random_rows(10, model.config.vocab_size, seed=6)
    assert_same(reference(model, rows), packed(model, rows, "flex_attention", pad_to=SEQUENCE_LEN),
                tol=dict(rtol=1e-4, atol=1e-5))


def test_mask_checks_answered_on_the_host_keep_the_models_logits(model_dir):
    # transformers reads device tensors to decide how to mask (a host sync each on a GPU); Plait answers from the
    # host: token ids alone -> no packed rows (the model made arange positions); a padding mask with a 0 on the
    # host -> SDPA keeps the mask. The logits are the model's own, bit for bit; other calls still ask.
    import threading

    from transformers import masking_utils

    from plait.model.forward import forward_logits
    from plait.model.host_copies import keep_host_copies
    from plait.model.mask_checks import answered_on_host, host_has_padding, takes_ids_only

    model = load(model_dir, "sdpa")
    ids = torch.tensor([r["input_ids"] for r in random_rows(2, model.config.vocab_size, seed=3, min_len=12, max_len=12)])
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding in the second row
    assert takes_ids_only({"input_ids": ids, "attention_mask": None})
    assert not takes_ids_only({"input_ids": ids, "position_ids": ids})
    with torch.no_grad():
        for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask.clone()}):
            assert torch.equal(forward_logits(model, inputs).logits, model(**inputs).logits)

    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    found = masking_utils.find_packed_sequence_indices(packed_positions)
    assert found.tolist() == [[0, 0, 0, 1, 1, 2]]
    in_other_thread = []
    with answered_on_host({"input_ids": ids}):
        assert masking_utils.find_packed_sequence_indices(packed_positions) is None
        worker = threading.Thread(target=lambda: in_other_thread.append(
            masking_utils.find_packed_sequence_indices(packed_positions)))
        worker.start()
        worker.join()
    assert torch.equal(in_other_thread[0], found)  # the state is this thread's alone
    assert torch.equal(masking_utils.find_packed_sequence_indices(packed_positions), found)

    # a moved mask whose host copy has padding: the answer comes without reading the mask (on the meta device a
    # read raises)
    on_meta = {"input_ids": ids, "attention_mask": mask.to("meta").bool()}
    keep_host_copies({"attention_mask": mask}, on_meta)
    assert host_has_padding(on_meta["attention_mask"])
    assert not host_has_padding(mask.to("meta"))  # no host copy kept: not known, transformers decides
    with answered_on_host(on_meta):
        assert masking_utils._ignore_causal_mask_sdpa(on_meta["attention_mask"], 12, 12, 0, 0) is False
    with pytest.raises(RuntimeError, match="meta"):
        masking_utils._ignore_causal_mask_sdpa(on_meta["attention_mask"], 12, 12, 0, 0)
    # a mask of ones has no padding: transformers decides
    ones = {"input_ids": ids, "attention_mask": torch.ones_like(mask).bool()}
    assert not host_has_padding(ones["attention_mask"])
    with answered_on_host(ones):
        assert masking_utils._ignore_causal_mask_sdpa(ones["attention_mask"], 12, 12, 0, 0)
