"""Read a DCP checkpoint without running code from it.

``torch.distributed.checkpoint`` keeps its index (``.metadata``) as a pickle
and loads non-tensor entries (an optimizer's ``param_groups``) with
``torch.load(weights_only=False)``: a crafted checkpoint could run anything
on every rank. :class:`SafeFileSystemReader` unpickles the index with an
allow-list of DCP's own metadata classes, dtypes, ``torch.Size`` and paths,
and :class:`SafeLoadPlanner` loads the non-tensor entries with
``weights_only=True`` (tensors, containers and plain values only). Anything
else is refused with :class:`plait.errors.DataError` naming the checkpoint.
"""

from __future__ import annotations

import pickle

from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

METADATA_FILE = ".metadata"
PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")


def allowed_global(module: str, name: str) -> bool:
    """Whether a DCP index may name ``module.name``: data classes only, nothing callable with effects."""
    import importlib

    import torch

    if module == "torch.distributed.checkpoint.metadata":
        # the index's dataclasses and enums (Metadata, TensorStorageMetadata, ChunkStorageMetadata, ...)
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return ((module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                               ("torch.serialization", "_get_layout"),  # looks a layout up by name
                               ("collections", "OrderedDict")}
            or module == "pathlib" and name in PATH_CLASSES)


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if allowed_global(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something a checkpoint index holds")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the index read through :class:`MetadataUnpickler`;
    :attr:`refused` keeps the error (DCP wraps what a reader raises)."""

    refused: Exception | None = None

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        from plait.errors import DataError

        path = self.fs.concat_path(self.path, METADATA_FILE)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = MetadataUnpickler(stream).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as exc:
                self.refused = DataError(f"{METADATA_FILE} is refused: {exc}; a checkpoint written by plait-parallel "
                                         f"holds only DCP's own index classes (a damaged or crafted file?)",
                                         path=str(self.path))
                raise self.refused from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor entries loaded by ``torch.load(weights_only=True)``;
    :attr:`refused` keeps the error."""

    refused: Exception | None = None

    def load_bytes(self, read_item, value) -> None:
        import torch
        from torch.distributed.checkpoint._traverse import set_element

        from plait.errors import DataError

        try:
            entry = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            self.refused = DataError(f"entry {read_item.dest_index.fqn!r} is refused: it holds something other "
                                     f"than tensors and plain values ({str(exc).splitlines()[0]})")
            raise self.refused from None
        # what DefaultLoadPlanner.load_bytes does with the entry, which it reads with weights_only=False
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], entry)
        else:
            self.state_dict[read_item.dest_index.fqn] = entry


def safe_load(state: dict, path: str, **kwargs) -> None:
    """``dcp.load(state)`` from ``path`` through the safe reader and planner;
    a refused entry raises its :class:`DataError`, not DCP's wrapper.
    ``kwargs``: ``no_dist``, and ``allow_partial_load`` for the planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(path)
    planner = SafeLoadPlanner(allow_partial_load=kwargs.pop("allow_partial_load", False))
    try:
        dcp.load(state, storage_reader=reader, planner=planner, **kwargs)
    except CheckpointException:
        refused = reader.refused or planner.refused
        if refused is None:
            raise
        raise refused from None
