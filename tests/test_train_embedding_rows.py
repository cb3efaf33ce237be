"""fix_untrained_tokens and shrink_embeddings: the embedding rows a run starts from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

USED_UNTRAINED, UNUSED_UNTRAINED, LISTED_UNUSED = 20, 21, 30


@pytest.fixture(scope="module")
def model_with_zero_rows(tmp_path_factory):
    """A tiny model whose tokens 20 and 21 have all-zero rows in the embeddings and the head."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("rows") / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[[USED_UNTRAINED, UNUSED_UNTRAINED]] = 0
    model.save_pretrained(path)
    return path


def _rows():
    from datasets import Dataset

    # token 10 occurs 8 times (the most frequent), token 20 (untrained) twice
    rows = [[10, 11, 12, 10], [10, 20, 13, 10], [10, 20, 14, 10], [10, 15, 16, 10]]
    return Dataset.from_list([{"input_ids": r, "labels": r, "attention_mask": [1] * 4, "length": 4} for r in rows])


def test_untrained_rows_in_the_data_get_the_scaled_trained_mean(model_with_zero_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    from plait.train.loop import build_model, Run
    from plait.pipeline import setup_tokenizer

    base = AutoModelForCausalLM.from_pretrained(model_with_zero_rows)
    cfg, pm = build_run_config({"base_model": str(model_with_zero_rows), "output_dir": str(tmp_path),
                                "fix_untrained_tokens": [LISTED_UNUSED]})
    from plait.train.distributed import init_distributed

    run = Run(cfg=cfg, pm=pm, output_dir=tmp_path, world=init_distributed())
    run.tokenizer, run.train_data = setup_tokenizer(cfg, pm), _rows()
    model = build_model(run)
    # untrained: the all-zero input-embedding rows (ours, and the pad token's, which llama zeroes) and the listed
    trained = base.get_input_embeddings().weight.detach().abs().amax(1) > 0
    trained[LISTED_UNUSED] = False
    assert (~trained).sum() == 4
    for name in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(base, name)().weight.detach(), getattr(model, name)().weight.detach()
        mean = before[trained].double().mean(0)
        torch.testing.assert_close(after[USED_UNTRAINED].double(), mean * 2 / 8,  # 2 occurrences of 8 at most
                                   rtol=1e-6, atol=1e-7)
        assert not after[UNUSED_UNTRAINED].any()       # untrained but not in the data: left as it was
        assert not after[LISTED_UNUSED].any()          # listed, never in the data: zeros, as in Axolotl
        others = [i for i in range(before.shape[0]) if i not in (USED_UNTRAINED, LISTED_UNUSED)]
        assert torch.equal(after[others], before[others])


def test_fix_untrained_tokens_is_checked(model_with_zero_rows):
    with pytest.raises(ConfigError, match="does not save; add them to lora_modules_to_save"):
        build_run_config({"base_model": str(model_with_zero_rows), "fix_untrained_tokens": True, "adapter": "lora",
                          "lora_target_linear": True})
    build_run_config({"base_model": str(model_with_zero_rows), "fix_untrained_tokens": True, "adapter": "lora",
                      "lora_target_linear": True, "lora_modules_to_save": ["embed_tokens", "lm_head"]})
    with pytest.raises(ConfigError, match="fix_untrained_tokens"):
        build_run_config({"base_model": str(model_with_zero_rows), "fix_untrained_tokens": "yes"})


@pytest.mark.parametrize("keys, rows", [({}, "padded"), ({"shrink_embeddings": True}, "tokenizer"),
                                        ({"shrink_embeddings": True, "resize_token_embeddings_to_32x": True},
                                         "32x")])
def test_shrink_embeddings_to_the_tokenizer(model_with_zero_rows, keys, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plait.model.loading import fit_to_tokenizer

    path = model_with_zero_rows
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer) + 100)
    cfg, _ = build_run_config({"base_model": str(path), **keys})
    fit_to_tokenizer(cfg, model, tokenizer)
    expected = {"padded": len(tokenizer) + 100, "tokenizer": len(tokenizer),
                "32x": -(-len(tokenizer) // 32) * 32}[rows]
    assert model.get_input_embeddings().num_embeddings == expected
    assert model.get_output_embeddings().weight.shape[0] == expected


@pytest.mark.parametrize("mean_resizing", [False, True])
def test_added_token_rows_start_as_axolotl_starts_them(model_with_zero_rows, mean_resizing):
    """mean_resizing_embeddings (Axolotl's default false): new rows come from the model's
    initialiser; true: from the old rows' mean (transformers' mean_resizing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plait.model.loading import fit_to_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_with_zero_rows)
    model = AutoModelForCausalLM.from_pretrained(model_with_zero_rows)
    old_rows = model.get_input_embeddings().num_embeddings
    tokenizer.add_tokens([f"<new_{i}>" for i in range(old_rows - len(tokenizer) + 4)])
    cfg, _ = build_run_config({"base_model": str(model_with_zero_rows), "mean_resizing_embeddings": mean_resizing})
    before = model.get_input_embeddings().weight.detach().clone()
    fit_to_tokenizer(cfg, model, tokenizer)
    new = model.get_input_embeddings().weight.detach()[old_rows:]
    assert new.shape[0] == 4 and torch.equal(model.get_input_embeddings().weight[:old_rows], before)
    distance = (new - before.mean(0)).norm(dim=1).max().item()
    spread = before.std(0).norm().item()  # how far a row typically sits from the mean
    assert (distance < 0.01 * spread) == mean_resizing, (distance, spread)
