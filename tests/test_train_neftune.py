"""NEFTune (neftune_noise_alpha, Axolotl's older noisy_embedding_alpha):
uniform noise of alpha / sqrt(L x d) on the input embeddings in training
forwards, L the row's real length; none in evaluation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from plait import hookimpl
from plait.errors import ConfigError
from plait.model.neftune import attach_neftune, token_row_lengths
from plait.testing import build_run_config, make_tiny_model

ALPHA = 5.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("neftune") / "model")


def test_row_lengths_of_padded_and_packed_batches():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert token_row_lengths((2, 5), attention_mask=mask).tolist() == [[3] * 5, [5] * 5]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert token_row_lengths((2, 9), position_ids=packed).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4],
                                                                      [6] * 6 + [3] * 3]
    assert token_row_lengths((1, 4)).tolist() == [[4] * 4]
    # a packed batch's 4-D (or flex BlockMask) attention input: the position ids decide
    four_d = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    assert token_row_lengths((2, 9), attention_mask=four_d, position_ids=packed).tolist()[0] == [3, 3, 3, 2, 2, 4, 4,
                                                                                               4, 4]
    assert token_row_lengths((1, 3), attention_mask=object(), position_ids=None).tolist() == [[3] * 3]


def _noise(model, embedding, **inputs):
    """What the hooks added to the embeddings of one forward of ``model``."""
    captured = {}
    handle = embedding.register_forward_hook(lambda m, a, out: captured.setdefault("out", out.detach()))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured["out"] - torch.nn.functional.embedding(inputs["input_ids"], embedding.weight).detach()


def _check_scale(noise, length: int, width: int):
    bound = ALPHA / math.sqrt(length * width)
    assert noise.abs().max() <= bound * (1 + 1e-6)
    assert noise.abs().max() > 0.95 * bound  # uniform over [-bound, bound]: some sample near the edge
    # the standard deviation of uniform(-b, b) is b / sqrt(3)
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_noise_scale_follows_each_rows_real_length(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    embedding, width = model.get_input_embeddings(), model.config.hidden_size
    handles = attach_neftune(model, ALPHA)
    ids = torch.arange(10, 90).reshape(2, 40)
    model.train()
    # padded: row 0 holds 10 real tokens, row 1 all 40
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 10:] = 0
    noise = _noise(model, embedding, input_ids=ids, attention_mask=mask)
    _check_scale(noise[0], 10, width)
    _check_scale(noise[1], 40, width)
    # packed: row 0 holds rows of 16 and 24 tokens, position ids restarting at each
    positions = torch.cat([torch.arange(16), torch.arange(24)]).repeat(2, 1)
    noise = _noise(model, embedding, input_ids=ids, position_ids=positions)
    _check_scale(noise[:, :16], 16, width)
    _check_scale(noise[:, 16:], 24, width)
    # evaluation: none at all
    model.eval()
    assert torch.equal(_noise(model, embedding, input_ids=ids, attention_mask=mask), torch.zeros(2, 40, width))
    for handle in handles:
        handle.remove()
    model.train()
    assert torch.equal(_noise(model, embedding, input_ids=ids), torch.zeros(2, 40, width))


class EmbeddingNoiseRecorder:
    """Records, for every forward of the run's model, whether it was training
    and the largest noise it saw relative to the bound of its rows."""

    def __init__(self):
        self.seen, self.widths = [], set()

    @hookimpl
    def on_train_start(self, run):
        embedding = run.model.get_input_embeddings()
        width = embedding.weight.shape[-1]

        def record(module, args, output):
            noise = output.detach() - torch.nn.functional.embedding(args[0], module.weight).detach()
            bound = ALPHA / math.sqrt(ROW_LENGTH * width)  # every row is ROW_LENGTH long, packed or not
            self.seen.append((module.training, float(noise.abs().max() / bound)))
            self.widths.add(args[0].shape[1])
        embedding.register_forward_hook(record)


ROW_LENGTH = 12


def _rows(n: int):
    from datasets import Dataset

    ids = [list(range(10 + i, 10 + ROW_LENGTH + i)) for i in range(n)]
    return Dataset.from_list([{"input_ids": row, "labels": row, "attention_mask": [1] * ROW_LENGTH,
                               "length": ROW_LENGTH} for row in ids])


@pytest.mark.parametrize("packing", [False, True])
def test_training_forwards_get_noise_and_eval_forwards_none(tiny_model, tmp_path, packing):
    """Packed, two rows share a sequence of 24 tokens: the noise still follows
    each row's 12 (the width would make it sqrt(2) times smaller)."""
    from plait.train.loop import train

    recorder = EmbeddingNoiseRecorder()
    # Axolotl's older name
    cfg, pm = build_run_config({"base_model": str(tiny_model), "output_dir": str(tmp_path), "max_steps": 2,
                                "micro_batch_size": 1 if packing else 2, "noisy_embedding_alpha": ALPHA,
                                "eval_steps": 1, "val_set_size": 0.1, "sample_packing": packing,
                                "sequence_len": 2 * ROW_LENGTH}, plugins=[recorder])
    assert cfg.neftune_noise_alpha == ALPHA
    train(cfg, pm, data=SimpleNamespace(train=_rows(4), eval=_rows(2)))
    trained = [ratio for training, ratio in recorder.seen if training]
    evaluated = [ratio for training, ratio in recorder.seen if not training]
    assert len(trained) == 2 and len(evaluated) == 2
    assert all(0.9 < ratio <= 1 + 1e-6 for ratio in trained), trained
    assert evaluated == [0.0, 0.0]
    assert recorder.widths == {2 * ROW_LENGTH if packing else ROW_LENGTH}


def test_bad_alpha_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        build_run_config({"base_model": str(tiny_model), "neftune_noise_alpha": 0})
    with pytest.raises(ConfigError, match="noisy_embedding_alpha .* and neftune_noise_alpha are both set"):
        build_run_config({"base_model": str(tiny_model), "neftune_noise_alpha": 5, "noisy_embedding_alpha": 3})
