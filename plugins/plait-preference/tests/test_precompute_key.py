"""The name of the precompute_ref_log_probs file: one for every layout that
scores alike, another wherever the scoring's arithmetic or weights differ.

Each row's values are stored at its index in the prepared dataset, whichever
rank scored it in whichever batch, so the world size and the dealing of rows
(micro_batch_size, FSDP2 or TP) stay out of the key; test_precompute.py shows
the values agree across one process, FSDP2 and TP. What a layout can change
is the precision: FSDP2 with ``bf16: true`` on fp32 weights computes in bf16
where one process computes in fp32, so the file of one must not serve the other.

The prepared rows under both are keyed the same way: KTO's rows depend on
micro_batch_size (its KL groups), so the data cache key holds it for KTO.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, so FSDP2 can shard in this process; torn down after."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_key_holds_the_scoring_precision_and_model_not_the_layout(tmp_path, tiny_model, one_rank_group):
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from plait.testing import build_run_config
    from plait_preference.precompute import cache_file

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "extras": None}]

    def key(model, **keys):
        cfg, _ = build_run_config({"base_model": str(tiny_model), "rl": "dpo", "output_dir": str(tmp_path),
                                   "datasets": [{"path": "x.json", "type": "chat_template.default"}], **keys})
        return cache_file(cfg, model, rows, None).name

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    mesh = init_device_mesh("cpu", (1,))

    def sharded(**policy):
        model = copy.deepcopy(plain)
        for layer in model:
            fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(**policy))
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(**policy))
        return model

    fp32 = key(plain)
    # the layout and the batching: one file (each row's values sit at its index)
    assert key(plain, micro_batch_size=2) == key(plain, micro_batch_size=8) == fp32
    assert key(sharded()) == fp32
    # one process with bf16: true on fp32 weights computes in fp32; FSDP2 gathers them in bf16
    assert key(plain, bf16=True, torch_dtype="float32") == fp32
    assert key(sharded(param_dtype=torch.bfloat16), bf16=True, torch_dtype="float32") != fp32
    # the precision the loop computes in, the weights' revision and config overrides
    assert key(plain, bf16=True) != fp32
    assert key(plain.to(torch.bfloat16)) != fp32
    assert key(plain, revision_of_model="v2") != fp32
    assert key(plain, overrides_of_model_config={"rope_theta": 20000.0}) != fp32


def test_prepared_rows_are_keyed_by_rl_and_the_kto_group(tmp_path, tiny_model):
    """A KTO row's KL sequence is drawn from its group of micro_batch_size rows,
    and rl decides pairs or KTO rows: the prepared data's key holds both, so a
    two-process run with 2 rows a micro-batch does not reuse one process's rows
    made with 4 (a DPO run keeps its cache across batch sizes)."""
    import json

    from transformers import AutoTokenizer

    from plait.data.cache import cache_key
    from plait.testing import build_run_config

    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}], "label": True}]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def key(**keys):
        cfg, pm = build_run_config({"base_model": str(tiny_model), "output_dir": str(tmp_path), **keys,
                                    "datasets": [{"path": str(data), "type": "chat_template.default"}]})
        return cache_key(cfg, pm, tokenizer, {str(data): data})

    assert key(rl="kto", micro_batch_size=2) != key(rl="kto", micro_batch_size=4)
    assert key(rl="dpo", micro_batch_size=2) == key(rl="dpo", micro_batch_size=4)
    assert key(rl="dpo") != key(rl="kto")
