"""Pickle-free storage of nested state (optimizer, schedule, RNG) as safetensors + JSON.

``torch.save``/``torch.load`` write and read pickles, and reading a pickle can
run any code it names: a checkpoint handed to ``resume_from_checkpoint`` must
never do that. :func:`save_state` splits a nested state into

- ``<name>.safetensors``: every tensor (and numpy array), under keys ``t0``, ``t1``, ...
- ``<name>.json``: the structure, with each tensor replaced by ``{"__tensor__": "t0"}``

and :func:`load_state` puts it back together. Reading either file only parses
data. JSON has no tuples, no non-string keys and no numpy arrays, so those are
tagged (``{"__tuple__": [...]}``, ``{"__items__": [[key, value], ...]}``,
``{"__ndarray__": "t3"}``) and come back as they went in: python floats
round-trip exactly through JSON (``repr``), so a resumed run stays bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class StateFormatError(ValueError):
    """A value that cannot be stored without pickle (a function, an object)."""


class _Encoder:
    """Splits a state into JSON-able structure and the tensors it holds."""

    def __init__(self):
        self.tensors: dict = {}
        self._storages: set = set()

    def _add(self, tensor) -> str:
        key = f"t{len(self.tensors)}"
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses two tensors sharing storage: copy only a tensor whose storage was seen before
        # (an optimizer's state is large; copying all of it would double the host memory a save needs)
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._storages:
            tensor = tensor.clone()
        self._storages.add(storage)
        self.tensors[key] = tensor
        return key

    def encode(self, value, where: str):
        import numpy as np
        import torch

        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._add(value)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": self._add(torch.from_numpy(np.ascontiguousarray(value).copy()))}
        if isinstance(value, np.generic):  # a numpy scalar: its python value
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in TAGS for k in value):
                return {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}
            return {"__items__": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")]
                                  for k, v in value.items()]}
        raise StateFormatError(f"{where}: a {type(value).__name__} cannot be stored without pickle")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def save_state(state, directory: Path, name: str) -> list[Path]:
    """Write ``state`` as ``directory/<name>.safetensors`` and ``<name>.json``; the paths written."""
    from safetensors.torch import save_file

    encoder = _Encoder()
    structure = encoder.encode(state, name)
    directory = Path(directory)
    tensor_file, json_file = directory / f"{name}.safetensors", directory / f"{name}.json"
    save_file(encoder.tensors, str(tensor_file))
    json_file.write_text(json.dumps(structure))
    return [tensor_file, json_file]


def load_state(directory: Path, name: str):
    """Read back what :func:`save_state` wrote; only parses data, runs nothing."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def state_files(name: str) -> tuple[str, str]:
    return f"{name}.safetensors", f"{name}.json"
