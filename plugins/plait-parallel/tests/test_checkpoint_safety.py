"""A sharded (DCP) checkpoint loads without running code from it.

DCP's own loader unpickles ``.metadata`` and non-tensor entries freely; each
test plants a payload that would write a marker file when unpickled, and
checks that loading refuses it and the marker never appears.
"""

import pickle
import warnings

import pytest
import torch

from plait.errors import DataError


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer


def trained_checkpoint(tiny_model_dir, path):
    from plait_parallel.checkpoint import save_sharded

    model, optimizer = tiny(tiny_model_dir)
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        save_sharded(path, model, optimizer, {"step": 1})
    return model


def test_a_sharded_checkpoint_still_loads_through_the_safe_reader(tiny_model_dir, tmp_path):
    from plait_parallel.checkpoint import load_sharded

    saved = trained_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    model, optimizer = tiny(tiny_model_dir)
    assert load_sharded(tmp_path / "ckpt", model, optimizer) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
    assert optimizer.state_dict()["state"] and optimizer.param_groups[0]["lr"] == 1e-3


def test_a_crafted_metadata_pickle_is_refused_and_never_runs(tiny_model_dir, tmp_path):
    from plait_parallel.checkpoint import load_sharded

    trained_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DataError, match=r"\.metadata is refused: (io|builtins)\.open is not something a checkpoint "
                                        r"index holds"):
        load_sharded(tmp_path / "ckpt", *tiny(tiny_model_dir))
    assert not marker.exists()


def test_a_crafted_non_tensor_entry_is_refused_and_never_runs(tiny_model_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    from plait_parallel.checkpoint import _state, load_sharded

    trained_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    model, optimizer = tiny(tiny_model_dir)
    state = _state(model, optimizer)
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)  # DCP stores a non-tensor entry as a pickle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    assert not marker.exists()
    with pytest.raises(DataError, match=r"entry 'optim.param_groups.*lr' is refused"):
        load_sharded(tmp_path / "ckpt", *tiny(tiny_model_dir))
    assert not marker.exists()
