"""Axolotl's row filters and orders: min_sample_len, dataset_exact_deduplication,
curriculum_sampling and group_by_length (exact rows kept and dropped, exact order
properties), on pre-tokenized rows so every length is known."""

from __future__ import annotations

import random

import pytest

from plait.data.batching import length_grouped_order, plan_batches
from plait.data.prepare import prepare_datasets
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def row(first: int, n: int) -> dict:
    """``n`` tokens ``first, first+1, ...``; the first is the prompt."""
    ids = list(range(first, first + n))
    return {"input_ids": ids, "labels": [-100] + ids[1:]}


def prepare(tmp_path, tok_dir, datasets, **keys):
    cfg, pm = build_run_config({"base_model": str(tok_dir), "output_dir": str(tmp_path / "out"),
                                "datasets": datasets, **keys})
    return prepare_datasets(cfg, pm, pm.hook.load_tokenizer(cfg=cfg), show_progress=False)


def test_min_sample_len_drops_shorter_rows_and_counts_them(tmp_path, tok_dir):
    from plait.commands.preprocess import stats_table

    path = write_jsonl(tmp_path / "a.jsonl", [row(10, n) for n in (3, 4, 5, 6, 40)])
    data = prepare(tmp_path, tok_dir, [{"path": str(path)}], min_sample_len=5, sequence_len=32,
                   shuffle_merged_datasets=False)
    assert data.train["length"] == [5, 6]  # 3 and 4 too short, 40 too long
    s = data.stats[0]
    assert (s.rows_in, s.kept, s.dropped_too_short, s.dropped_too_long, s.tokens) == (5, 2, 2, 1, 11)
    table = stats_table(data.stats).splitlines()
    assert "too short" in table[0] and "| 2 " in table[2]
    # the length is checked before truncation, as in Axolotl
    cut = prepare(tmp_path, tok_dir, [{"path": str(path)}], min_sample_len=5, sequence_len=32,
                  excess_length_strategy="truncate", shuffle_merged_datasets=False)
    assert cut.train["length"] == [5, 6, 32] and cut.stats[0].dropped_too_short == 2


def test_exact_deduplication_keeps_first_copies_across_entries_and_the_split(tmp_path, tok_dir):
    a = [row(10, 5), row(20, 5), row(10, 5), row(30, 6), {"input_ids": [10, 11, 12, 13, 14],
                                                           "labels": [-100, -100, 12, 13, 14]}]
    b = [row(20, 5), row(40, 7), row(40, 7)]
    pa, pb = write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)
    entries = [{"path": str(pa)}, {"path": str(pb)}]
    plain = prepare(tmp_path, tok_dir, entries, shuffle_merged_datasets=False)
    assert len(plain.train) == 8
    data = prepare(tmp_path, tok_dir, entries, shuffle_merged_datasets=False, dataset_exact_deduplication=True)
    # a's third row repeats its first, b's first repeats a's second, b's third its second;
    # a's last row has the same input_ids as its first but other labels: a different row
    assert data.train["input_ids"] == [a[0]["input_ids"], a[1]["input_ids"], a[3]["input_ids"], a[4]["input_ids"],
                                       b[1]["input_ids"]]
    assert [(s.kept, s.dropped_duplicate) for s in data.stats] == [(4, 1), (1, 2)]
    assert [s.tokens for s in data.stats] == [21, 7]
    assert [s.trained_tokens for s in data.stats] == [4 + 4 + 5 + 3, 6]
    # deduplicated before the split: train and eval share no row
    split = prepare(tmp_path, tok_dir, entries, dataset_exact_deduplication=True, val_set_size=2)
    train = {tuple(r) for r in split.train["input_ids"]}
    assert len(split.train) + len(split.eval) == 5
    assert not train & {tuple(r) for r in split.eval["input_ids"]}
    # test_datasets are deduplicated among themselves
    tested = prepare(tmp_path, tok_dir, [{"path": str(pa)}], dataset_exact_deduplication=True,
                     test_datasets=[{"path": str(pb)}])
    assert tested.eval["length"] == [5, 7] and tested.stats[1].dropped_duplicate == 1


def test_curriculum_sampling_keeps_the_file_order_in_data_and_plans(tmp_path, tok_dir):
    rows = [row(10 + i, 4 + i % 5) for i in range(12)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare(tmp_path, tok_dir, [{"path": str(path)}], curriculum_sampling=True, val_set_size=3)
    firsts = [ids[0] for ids in data.train["input_ids"]]
    assert len(firsts) == 9 and firsts == sorted(firsts)  # not shuffled, and the split keeps the order
    # the eval rows are a seeded choice, not simply the last rows
    assert sorted(firsts + [ids[0] for ids in data.eval["input_ids"]]) == list(range(10, 22))
    assert sorted(ids[0] for ids in data.eval["input_ids"]) != [19, 20, 21]
    cfg, _ = build_run_config({"base_model": "m", "curriculum_sampling": True, "micro_batch_size": 2})
    lengths = [4, 5, 6, 7, 8, 4, 5]
    for epoch in (0, 1):
        assert plan_batches(cfg, lengths, epoch) == [[[0], [1]], [[2], [3]], [[4], [5]], [[6]]]
    # packed: next-fit in row order, the same every epoch
    packed, _ = build_run_config({"base_model": "m", "curriculum_sampling": True, "sample_packing": True,
                                  "sequence_len": 12, "micro_batch_size": 1})
    assert plan_batches(packed, lengths, 0) == plan_batches(packed, lengths, 3) == [
        [[0, 1]], [[2]], [[3]], [[4, 5]], [[6]]]  # 4 + 5, 6, 7, 8 + 4, 5: next-fit into 12


def test_sample_packing_sequentially_packs_the_shuffled_order_next_fit():
    """Axolotl's sample_packing_sequentially: each row goes into the current bin while it fits, in the
    sampler's (shuffled, per-epoch) order, and the bins stay in that order; with curriculum_sampling the
    order is the file's."""
    rng = random.Random(4)
    lengths = [rng.randint(1, 12) for _ in range(60)]
    keys = {"base_model": "m", "sample_packing": True, "sequence_len": 16, "micro_batch_size": 2}
    cfg, _ = build_run_config({**keys, "sample_packing_sequentially": True})
    best_fit, _ = build_run_config(keys)
    for epoch in (0, 1):
        bins = [b for mb in plan_batches(cfg, lengths, epoch) for b in mb]
        order = [i for b in bins for i in b]
        assert sorted(order) == list(range(60))  # every row once, in one process
        assert order != sorted(order)  # shuffled
        # next-fit: a bin was closed only because the next row in the order did not fit it
        for this, following in zip(bins, bins[1:]):
            assert sum(lengths[i] for i in this) + lengths[following[0]] > 16
            assert sum(lengths[i] for i in this) <= 16
        assert bins != [b for mb in plan_batches(best_fit, lengths, epoch) for b in mb]
    assert plan_batches(cfg, lengths, 0) != plan_batches(cfg, lengths, 1)  # a new order each epoch
    both, _ = build_run_config({**keys, "sample_packing_sequentially": True, "curriculum_sampling": True})
    assert [i for mb in plan_batches(both, lengths, 1) for b in mb for i in b] == list(range(60))


def test_group_by_length_orders_like_transformers_length_grouped_sampler(monkeypatch):
    rng = random.Random(3)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    order = length_grouped_order(lengths, 4, random.Random(0))
    assert sorted(order) == list(range(1000))
    assert lengths[order[0]] == max(lengths)  # the longest row first
    # mega-batches of 50 x 4 rows, each sorted longest first (but for the swapped first place)
    for start in range(0, 1000, 200):
        chunk = [lengths[i] for i in order[start:start + 200]][1:]
        assert chunk == sorted(chunk, reverse=True)
    # transformers' own function gives the same order from the same permutation (it draws it with torch)
    torch = pytest.importorskip("torch")
    from transformers.trainer_pt_utils import get_length_grouped_indices

    for batch_size in (4, 3, 64):
        permutation = list(range(1000))
        random.Random(5).shuffle(permutation)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "randperm", lambda n, generator=None: torch.tensor(permutation))
            theirs = get_length_grouped_indices(lengths, batch_size)
        assert length_grouped_order(lengths, batch_size, random.Random(5)) == theirs


def test_group_by_length_plans_are_per_epoch_and_ranks_get_similar_lengths():
    cfg, _ = build_run_config({"base_model": "m", "group_by_length": True, "micro_batch_size": 2,
                               "gradient_accumulation_steps": 2})
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(400)]
    plan = plan_batches(cfg, lengths, 0)
    assert plan == plan_batches(cfg, lengths, 0) and plan != plan_batches(cfg, lengths, 1)
    assert sorted(i for mb in plan for b in mb for i in b) == list(range(400))
    spread = sum(max(lengths[b[0]] for b in mb) - min(lengths[b[0]] for b in mb) for mb in plan) / len(plan)
    plain, _ = build_run_config({"base_model": "m", "micro_batch_size": 2})
    shuffled = plan_batches(plain, lengths, 0)
    random_spread = sum(max(lengths[b[0]] for b in mb) - min(lengths[b[0]] for b in mb) for mb in shuffled) / 200
    assert spread < random_spread / 10  # neighbours in a micro-batch have similar lengths
    # two ranks: each takes every other row of the grouped order, so both see the same length profile
    ranks = [plan_batches(cfg, lengths, 0, rank, 2) for rank in (0, 1)]
    for a, b in zip(*ranks):
        assert abs(lengths[a[0][0]] - lengths[b[0][0]]) <= 60


def test_shuffle_before_merging_shuffles_each_dataset_on_its_own(tmp_path, tok_dir):
    first = write_jsonl(tmp_path / "a.jsonl", [row(10 + i, 4) for i in range(8)])
    second = write_jsonl(tmp_path / "b.jsonl", [row(100 + i, 4) for i in range(8)])
    entries = [{"path": str(first)}, {"path": str(second)}]
    keys = dict(sequence_len=32, shuffle_merged_datasets=False, dataset_prepared_path=str(tmp_path / "prepared"))
    plain = [ids[0] for ids in prepare(tmp_path, tok_dir, entries, **keys).train["input_ids"]]
    each = [ids[0] for ids in prepare(tmp_path, tok_dir, entries, shuffle_before_merging_datasets=True,
                                      **keys).train["input_ids"]]
    assert plain == list(range(10, 18)) + list(range(100, 108))  # as they were, one after the other
    assert sorted(each[:8]) == list(range(10, 18)) and sorted(each[8:]) == list(range(100, 108))
    assert each[:8] != plain[:8] and each[8:] != plain[8:]  # each shuffled, still one after the other


def test_dataset_shard_keeps_one_contiguous_shard_of_the_shuffled_rows_before_the_eval_split(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "a.jsonl", [row(10 + i, 4) for i in range(12)])
    keys = dict(sequence_len=32, val_set_size=2, dataset_prepared_path=str(tmp_path / "prepared"))
    whole = prepare(tmp_path, tok_dir, [{"path": str(path)}], **{**keys, "val_set_size": 0})
    shard = prepare(tmp_path, tok_dir, [{"path": str(path)}], dataset_shard_num=3, dataset_shard_idx=1, **keys)
    expected = list(whole.train["input_ids"])[4:8]  # the second of three shards of the shuffled 12 rows
    assert sorted(list(shard.train["input_ids"]) + list(shard.eval["input_ids"])) == sorted(expected)
    assert len(shard.eval) == 2
    with pytest.raises(ConfigError, match="'dataset_shard_idx': 3 is not accepted; shards are numbered 0 to 2"):
        build_run_config({"base_model": "m", "dataset_shard_num": 3, "dataset_shard_idx": 3})
    with pytest.raises(ConfigError, match="'dataset_shard_num' is set without the other"):
        build_run_config({"base_model": "m", "dataset_shard_num": 3})


@pytest.mark.parametrize("packed", [False, True])
def test_dataloader_drop_last_leaves_out_a_short_last_micro_batch(packed):
    """transformers' dataloader_drop_last: 10 rows (packed: 10 one-row bins) in micro-batches
    of 4 are 4 + 4 + 2; the short one goes, on every rank alike, the full ones stay as they were."""
    keys = {"base_model": "m", "micro_batch_size": 4, "sample_packing": packed, "sequence_len": 64}
    lengths = [40] * 10  # two never share a bin of 64
    kept_cfg, _ = build_run_config(keys)
    drop_cfg, _ = build_run_config({**keys, "dataloader_drop_last": True})
    kept, dropped = plan_batches(kept_cfg, lengths, 0), plan_batches(drop_cfg, lengths, 0)
    assert [len(mb) for mb in kept] == [4, 4, 2] and dropped == kept[:2]
    # two ranks get 5 rows each: 4 + 1, and both drop their short micro-batch
    assert [[len(mb) for mb in plan_batches(drop_cfg, lengths, 0, rank, 2)] for rank in (0, 1)] == [[4], [4]]
    whole, _ = build_run_config({**keys, "dataloader_drop_last": True, "micro_batch_size": 5})
    assert [len(mb) for mb in plan_batches(whole, lengths, 0)] == [5, 5]  # nothing short: nothing dropped


def test_refusals_name_the_keys():
    with pytest.raises(ConfigError, match=r"'curriculum_sampling' .* 'group_by_length'"):
        build_run_config({"base_model": "m", "curriculum_sampling": True, "group_by_length": True})
    with pytest.raises(ConfigError, match=r"'min_sample_len': 300 is above sequence_len \(256\)"):
        build_run_config({"base_model": "m", "min_sample_len": 300, "sequence_len": 256})
    with pytest.raises(ConfigError, match=r"'min_sample_len'.*greater than or equal to 1"):
        build_run_config({"base_model": "m", "min_sample_len": 0})
    cfg, _ = build_run_config({"base_model": "m", "group_by_length": True, "sample_packing": True})
    assert any(note.startswith("group_by_length changes nothing with sample_packing") for note in cfg.notes)
