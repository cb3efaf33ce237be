"""Read one ``datasets:`` entry into a ``datasets.Dataset``.

A ``path`` is, in this order:

1. a directory written by ``Dataset.save_to_disk`` (it holds ``dataset_info.json``
   or ``state.json``), loaded with ``load_from_disk``;
2. a local file or a directory of data files, loaded with the ``datasets``
   builder its extension names (``ds_type`` overrides): json/jsonl, parquet,
   csv, arrow, text;
3. anything else that does not exist locally: a dataset on the Hugging Face hub
   (``name``, ``data_files``, ``revision`` and ``split`` are passed on).

Local files are loaded one at a time so that a row can always be traced back
to its file and its 1-based row number (:meth:`Source.locate`); for JSON lines
that row number is the line number when the file has no blank lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import ConfigError, DataError

#: file extension -> ``datasets`` builder name
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
#: accepted ``ds_type`` values -> builder name
DS_TYPES = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow", "text": "text"}


@dataclass
class Source:
    """One loaded dataset entry, with where each row came from.

    ``parts`` lists ``(file, number of rows)`` in the order the rows appear in
    ``dataset``; a hub dataset or a saved directory is a single part.
    """

    dataset: object  # datasets.Dataset
    label: str
    parts: list[tuple[str, int]] = field(default_factory=list)
    #: rows of ``parts`` before the first row of ``dataset`` (cut off by ``shards``)
    row_offset: int = 0

    def locate(self, index: int) -> tuple[str, int]:
        """The file and 1-based row number of row ``index`` of ``dataset``."""
        index += self.row_offset
        offset = 0
        for path, count in self.parts:
            if index < offset + count:
                return path, index - offset + 1
            offset += count
        return self.label, index + 1


def load_source(entry, *, base_dir: str | Path | None = None) -> Source:
    """Load ``entry`` (a :class:`plait.config.schema.DatasetConfig`).

    Relative paths resolve against ``base_dir`` when the path exists there,
    else against the working directory. Raises :class:`DataError` naming the
    file for a missing file or an unreadable row.
    """
    path = resolve_path(entry.path, base_dir)
    if path is None:
        if _looks_local(entry.path):
            raise DataError("dataset file not found (checked relative to the working directory"
                            + (f" and {base_dir}" if base_dir else "") + ")", path=entry.path)
        return _load_hub(entry)
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved(entry, path)
    files = _data_files(entry, path)
    parts, datasets_ = [], []
    for file in files:
        ds = _load_file(entry, file)
        datasets_.append(ds)
        parts.append((str(file), len(ds)))
    if len(datasets_) == 1:
        dataset = datasets_[0]
    else:
        import datasets

        try:
            dataset = datasets.concatenate_datasets(datasets_)
        except ValueError as exc:
            raise DataError(f"the files of this dataset have different columns: {exc}", path=str(path)) from None
    return _shard(entry, Source(dataset, str(path), parts))


# ----------------------------------------------------------------- paths


def resolve_path(path: str, base_dir=None) -> Path | None:
    """The local file or directory ``path`` names, or ``None`` (a hub name)."""
    candidates = [Path(path).expanduser()]
    if base_dir is not None and not Path(path).is_absolute():
        candidates.append(Path(base_dir) / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None


def _looks_local(path: str) -> bool:
    """A path that cannot be a hub name ("org/name" or "name") is a missing file."""
    p = Path(path)
    return (path.startswith((".", "/", "~")) or p.suffix.lower() in BUILDERS or path.count("/") > 1
            or os.sep != "/" and os.sep in path)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _data_files(entry, path: Path) -> list[Path]:
    """The files an entry names: the file itself, or ``data_files`` inside a
    directory (default: every file with a known extension, sorted)."""
    if path.is_file():
        return [path]
    if entry.data_files:
        names = [entry.data_files] if isinstance(entry.data_files, str) else list(entry.data_files)
        files = [path / name for name in names]
        for file in files:
            if not file.exists():
                raise DataError("file listed in data_files not found", path=str(file))
        return files
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise DataError(f"directory has no data files (accepted extensions: {', '.join(BUILDERS)})", path=str(path))
    return files


def _builder(entry, file: Path) -> str:
    if entry.ds_type:
        if entry.ds_type not in DS_TYPES:
            raise ConfigError(f"config key 'ds_type' of dataset {entry.path!r}: {entry.ds_type!r} is not accepted; "
                              f"accepted: {', '.join(DS_TYPES)}")
        return DS_TYPES[entry.ds_type]
    suffix = file.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"cannot tell the file type from the extension {suffix!r}; set ds_type "
                        f"({', '.join(DS_TYPES)})", path=str(file))
    return BUILDERS[suffix]


# --------------------------------------------------------------- loaders


def _load_file(entry, file: Path):
    import datasets

    builder = _builder(entry, file)
    kwargs = {}
    if builder == "json":
        top_field = _json_top_level_field(entry, file)
        if top_field:
            kwargs["field"] = top_field
    try:
        loaded = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in several types
        if builder == "json":
            validate_json(file)  # raises a DataError naming the line
        raise DataError(f"could not be read as {builder}: {type(exc).__name__}: {_first_line(exc)}",
                        path=str(file)) from None
    return loaded


def _json_top_level_field(entry, file: Path) -> str | None:
    """A ``.json`` file holding ``{"<field>": [rows]}`` needs the builder's
    ``field``; ``entry.field`` names it. JSON lines and row arrays need none."""
    if file.suffix.lower() != ".json" or not entry.field:
        return None
    with file.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        return None
    try:
        with file.open() as f:
            document = json.load(f)
    except ValueError:
        return None  # JSON lines in a .json file
    return entry.field if isinstance(document, dict) and isinstance(document.get(entry.field), list) else None


def validate_json(file: Path) -> None:
    """Find the first error of a JSON array file or a JSON lines file and
    raise :class:`DataError` with its line; return when none is found."""
    with Path(file).open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        validate_json_lines(file)
        return
    try:
        with Path(file).open(encoding="utf-8") as f:
            json.load(f)
    except ValueError as exc:  # the message says "line L column C"
        raise DataError(f"not valid JSON: {exc}", path=str(file)) from None


def validate_json_lines(file: Path) -> None:
    """Parse ``file`` line by line; raise :class:`DataError` with the 1-based
    line number of the first line that is not a JSON object."""
    with Path(file).open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"line {number} is not valid JSON: {exc}", path=str(file), row=number) from None
                if not isinstance(value, dict):
                    raise DataError(f"line {number} is a JSON {type(value).__name__}, expected an object",
                                    path=str(file), row=number)
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text: {exc}", path=str(file)) from None


def _load_saved(entry, path: Path) -> Source:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if entry.split not in loaded:
            raise ConfigError(f"config key 'split' of dataset {entry.path!r}: {entry.split!r} is not in the saved "
                              f"dataset; accepted: {', '.join(loaded)}")
        loaded = loaded[entry.split]
    return _shard(entry, Source(loaded, str(path), [(str(path), len(loaded))]))


def _load_hub(entry) -> Source:
    """A dataset from the Hugging Face hub (needs a network; not used by tests)."""
    import datasets

    try:
        loaded = datasets.load_dataset(entry.path, name=entry.name, data_files=entry.data_files,
                                       split=entry.split, revision=entry.revision)
    except Exception as exc:
        raise DataError(f"not a local file or directory, and loading it from the hub failed: "
                        f"{type(exc).__name__}: {_first_line(exc)}", path=entry.path) from None
    return _shard(entry, Source(loaded, entry.path, [(entry.path, len(loaded))]))


def _shard(entry, source: Source) -> Source:
    """Keep shard ``shards_idx`` of ``shards`` (contiguous, so row numbers stay
    traceable through an offset part)."""
    if not entry.shards:
        return source
    index = entry.shards_idx or 0
    if not 0 <= index < entry.shards:
        raise ConfigError(f"config key 'shards_idx' of dataset {entry.path!r}: {index} is not accepted; "
                          f"accepted: 0 to {entry.shards - 1}")
    total = len(source.dataset)
    # datasets' contiguous sharding: the first (total % shards) shards get one extra row
    size, extra = divmod(total, entry.shards)
    start = index * size + min(index, extra)
    sharded = source.dataset.shard(num_shards=entry.shards, index=index, contiguous=True)
    return Source(sharded, source.label, source.parts, row_offset=source.row_offset + start)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
