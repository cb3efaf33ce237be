"""In a torch.distributed run only rank 0 tokenizes; the other ranks load its cache."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from plait.testing import free_port, make_tiny_tokenizer, write_jsonl

WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from plait.data.prepare import prepare_datasets
    from plait.testing import build_run_config

    tok_dir, data, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    cfg, pm = build_run_config({"base_model": tok_dir, "output_dir": out,
                                "datasets": [{"path": data, "type": "alpaca"}]})
    prepared = prepare_datasets(cfg, pm, pm.hook.load_tokenizer(cfg=cfg), show_progress=False)
    result = {"from_cache": prepared.from_cache, "path": str(prepared.cache_path),
              "ids": prepared.train["input_ids"][:]}
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


@pytest.mark.distributed
def test_rank0_tokenizes_and_the_other_rank_loads_its_cache(tmp_path):
    tok = make_tiny_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"sort {i}", "output": f"done {i}"} for i in range(20)])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tok), str(data), str(tmp_path)],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["from_cache"] is False and rank1["from_cache"] is True
    assert rank0["path"] == rank1["path"] and rank0["ids"] == rank1["ids"] and len(rank0["ids"]) == 20
