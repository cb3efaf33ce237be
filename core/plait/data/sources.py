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
to its file and its 1-based row number (:meth:`Source.locate`); for a JSON
lines file whose rows are not on the lines of the same number (blank lines,
skipped lines) errors also give the line (:meth:`Source.error`: "row 2
(line 3)").

A malformed JSON line is an error naming the file and line; with
``skip_bad_rows`` it is left out, and :attr:`Source.skipped` says which.

``split`` (or ``train_on_split``, which wins, as in Axolotl) picks the split of
a hub dataset or a saved ``DatasetDict``; ``trust_remote_code`` is passed to
``datasets.load_dataset`` for hub datasets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import ConfigError, DataError, PlaitError

log = logging.getLogger("plait.data")

#: file extension -> ``datasets`` builder name
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
#: the characters JSON counts as whitespace: a line of only these is blank
JSON_SPACE = " \t\r\n"
#: accepted ``ds_type`` values -> builder name
DS_TYPES = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow", "text": "text"}


class RowError(DataError):
    """A :class:`DataError` for one row, naming its line too when that
    differs from the row number: ``"a.jsonl, row 2 (line 3): ..."``."""

    def __init__(self, message: str, *, path: str, row: int, line: int | None = None):
        where = f"{path}, row {row}" + (f" (line {line})" if line is not None and line != row else "")
        PlaitError.__init__(self, f"{where}: {message}")
        self.path, self.row, self.line, self.message = path, row, line, message

    def __reduce__(self):  # keyword-only arguments: rebuilt from them (errors cross worker processes)
        return _row_error, (self.message, self.path, self.row, self.line)


def _row_error(message, path, row, line) -> RowError:
    return RowError(message, path=path, row=row, line=line)


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
    #: JSON lines files -> the line of each of their rows (``None``: not read yet, found on first use)
    lines: dict[str, list[int] | None] = field(default_factory=dict)
    #: one message per line left out by ``skip_bad_rows`` (malformed JSON)
    skipped: list[str] = field(default_factory=list)

    def locate(self, index: int) -> tuple[str, int]:
        """The file and 1-based row number of row ``index`` of ``dataset``."""
        path, row, _ = self.where(index)
        return path, row

    def where(self, index: int) -> tuple[str, int, int | None]:
        """The file, 1-based row number and, for JSON lines, the 1-based line
        number (``None`` when not known) of row ``index`` of ``dataset``."""
        index += self.row_offset
        offset = 0
        for path, count in self.parts:
            if index < offset + count:
                row = index - offset + 1
                return path, row, self._line(path, row, count)
            offset += count
        return self.label, index + 1, None

    def error(self, index: int, message: str) -> DataError:
        """A :class:`DataError` for row ``index``, naming file, row and line."""
        path, row, line = self.where(index)
        return RowError(message, path=path, row=row, line=line)

    def _line(self, path: str, row: int, count: int) -> int | None:
        if path not in self.lines:
            return None
        if self.lines[path] is None:
            numbers = json_line_numbers(Path(path))
            # a file that is not one row per line (a single pretty-printed object): no line numbers
            self.lines[path] = numbers if len(numbers) == count else []
        numbers = self.lines[path]
        return numbers[row - 1] if len(numbers) == count else None


def load_source(entry, *, base_dir: str | Path | None = None, skip_bad_rows: bool = False) -> Source:
    """Load ``entry`` (a :class:`plait.config.schema.DatasetConfig`).

    Relative paths resolve against ``base_dir`` when the path exists there,
    else against the working directory. Raises :class:`DataError` naming the
    file for a missing file or an unreadable row; with ``skip_bad_rows``
    malformed JSON lines are left out and listed in :attr:`Source.skipped`.
    """
    path = resolve_path(entry.path, base_dir)
    if path is None:
        if _looks_local(entry.path):
            raise DataError("dataset file not found (checked relative to the working directory"
                            + (f" and {base_dir}" if base_dir else "") + ")", path=entry.path)
        return _load_hub(entry)
    if entry.trust_remote_code:
        log.warning("dataset %s: trust_remote_code only applies to hub datasets; %s is local", entry.path, path)
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved(entry, path)
    if entry.train_on_split and entry.train_on_split != "train":
        raise ConfigError(f"config key 'train_on_split' of dataset {entry.path!r}: {entry.train_on_split!r} is not "
                          f"accepted; local data files have the one split 'train' (train_on_split picks a split of a "
                          f"hub dataset or a saved DatasetDict; for local files name the file in path or data_files)")
    files = local_data_files(entry, path)
    parts, datasets_, lines, skipped = [], [], {}, []
    for file in files:
        ds, file_lines, file_skipped = _load_file(entry, file, skip_bad_rows)
        datasets_.append(ds)
        parts.append((str(file), len(ds)))
        if file_lines is not _NOT_LINES:
            lines[str(file)] = file_lines
        skipped += file_skipped
    if len(datasets_) == 1:
        dataset = datasets_[0]
    else:
        import datasets

        try:
            dataset = datasets.concatenate_datasets(datasets_)
        except ValueError as exc:
            raise DataError(f"the files of this dataset have different columns: {exc}", path=str(path)) from None
    return _shard(entry, Source(dataset, str(path), parts, lines=lines, skipped=skipped))


def _split_name(entry) -> str:
    """The split to use: ``train_on_split`` when set (Axolotl's key), else ``split``."""
    return entry.train_on_split or entry.split


def _split_key(entry) -> str:
    return "train_on_split" if entry.train_on_split else "split"


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


def local_data_files(entry, path: Path) -> list[Path]:
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


def builder_for(entry, file: Path) -> str:
    """The ``datasets`` builder reading ``file``: from ``ds_type``, else the extension."""
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


#: ``_load_file``'s answer for a file that is not JSON lines
_NOT_LINES = object()


def _load_file(entry, file: Path, skip_bad_rows: bool = False):
    """``(dataset, lines, skipped)``: the rows of one file; for JSON lines,
    the line of each row (``None``: found when first needed) else
    :data:`_NOT_LINES`; the messages of malformed lines left out."""
    import datasets

    builder = builder_for(entry, file)
    kwargs = {}
    top_field = None
    if builder == "json":
        top_field = _json_top_level_field(entry, file)
        if top_field:
            kwargs["field"] = top_field
    json_lines = builder == "json" and not top_field and not _starts_with(file, b"[")
    try:
        loaded = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in several types
        if json_lines:
            good, bad = scan_json_lines(file)  # raises for a file that is not UTF-8
            if bad and skip_bad_rows:
                return _load_good_lines(file, good, bad)
            if bad:
                raise bad[0] from None
            if good and _line_count(file) > len(good):
                # every non-blank line is an object, so the blank lines stopped it: datasets 4.8 (our floor)
                # fails on a blank line ("Expected object or value") where later releases skip it
                return _load_good_lines(file, good, [])
        elif builder == "json":
            validate_json(file)  # raises a DataError naming the line
        raise DataError(f"could not be read as {builder}: {type(exc).__name__}: {_first_line(exc)}",
                        path=str(file)) from None
    return loaded, (None if json_lines else _NOT_LINES), []


def _load_good_lines(file: Path, good: list[int], bad: list[DataError]):
    """Load the valid lines of a JSON lines file (``good``: their numbers)
    through the same builder, from a copy without the bad ones."""
    import datasets

    wanted = set(good)
    tmp = Path(tempfile.mkdtemp(prefix="plait-lines-"))
    try:
        copy = tmp / (file.stem + ".jsonl")
        with Path(file).open("rb") as src, copy.open("wb") as dst:
            for number, line in enumerate(src, start=1):
                if number in wanted:
                    dst.write(line.rstrip(b"\r\n") + b"\n")
        try:
            loaded = (datasets.load_dataset("json", data_files=str(copy), split="train") if good
                      else datasets.Dataset.from_dict({}))
        except Exception as exc:
            raise DataError(f"could not be read as json even without its {len(bad)} malformed lines: "
                            f"{type(exc).__name__}: {_first_line(exc)}", path=str(file)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(loaded) != len(good):
        raise DataError(f"after leaving out {len(bad)} malformed lines, {len(loaded)} rows were read from "
                        f"{len(good)} lines", path=str(file))
    return loaded, good, [str(error) for error in bad]


def _line_count(file: Path) -> int:
    with Path(file).open("rb") as f:
        return sum(1 for _ in f)


def _starts_with(file: Path, prefix: bytes) -> bool:
    with Path(file).open("rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


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
    """Parse ``file`` line by line; raise :class:`DataError` naming the row
    and line of the first line that is not a JSON object."""
    _, bad = scan_json_lines(file, stop_at_first=True)
    if bad:
        raise bad[0]


def scan_json_lines(file: Path, *, stop_at_first: bool = False) -> tuple[list[int], list[DataError]]:
    """``(good, bad)``: the 1-based numbers of the lines of ``file`` holding a
    JSON object, and an error for each other non-blank line. A line's row
    number counts the non-blank lines up to it (blank lines are not rows)."""
    good, bad, row = [], [], 0
    # lines end at "\n" only, as for the loader and json_line_numbers; blank means JSON whitespace only
    with Path(file).open(encoding="utf-8", errors="strict", newline="\n") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip(JSON_SPACE):
                    continue
                row += 1
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except ValueError as exc:
                    what = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                    bad.append(RowError(f"not valid JSON: {what}", path=str(file), row=row, line=number))
                else:
                    if isinstance(value, dict):
                        good.append(number)
                        continue
                    bad.append(RowError(f"a JSON {type(value).__name__}, expected an object", path=str(file),
                                        row=row, line=number))
                if stop_at_first:
                    break
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text: {exc}", path=str(file)) from None
    return good, bad


def json_line_numbers(file: Path) -> list[int]:
    """The 1-based numbers of the non-blank lines of ``file`` (the loader
    skips blank lines, so row *n* is on the *n*-th of these)."""
    numbers = []
    with Path(file).open("rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip(JSON_SPACE.encode()):
                numbers.append(number)
    return numbers


def _load_saved(entry, path: Path) -> Source:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    split = _split_name(entry)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"config key '{_split_key(entry)}' of dataset {entry.path!r}: {split!r} is not in the "
                              f"saved dataset; accepted: {', '.join(loaded)}")
        loaded = loaded[split]
    elif entry.train_on_split and entry.train_on_split != "train":
        raise ConfigError(f"config key 'train_on_split' of dataset {entry.path!r}: {entry.train_on_split!r} is not "
                          f"accepted; the saved dataset at {path} is a single Dataset, not a DatasetDict with splits")
    return _shard(entry, Source(loaded, str(path), [(str(path), len(loaded))]))


def _load_hub(entry) -> Source:
    """A dataset from the Hugging Face hub (needs a network; not used by tests)."""
    import datasets

    try:
        loaded = datasets.load_dataset(entry.path, name=entry.name, data_files=entry.data_files,
                                       split=_split_name(entry), revision=entry.revision,
                                       trust_remote_code=entry.trust_remote_code)
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
    return Source(sharded, source.label, source.parts, row_offset=source.row_offset + start, lines=source.lines,
                  skipped=source.skipped)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
