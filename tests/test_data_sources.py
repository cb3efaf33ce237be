"""Loading dataset entries: file types, saved directories, errors with file and line."""

import json

import pytest

from plait.config.schema import DatasetConfig
from plait.data.sources import load_source
from plait.errors import DataError

ROWS = [{"instruction": f"sort {i}", "output": f"out {i}"} for i in range(7)]


def entry(path, **keys):
    return DatasetConfig(path=str(path), type="alpaca", **keys)


def test_jsonl_json_parquet_csv_arrow_and_text(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "rows.json").write_text(json.dumps({"data": ROWS}))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    (tmp_path / "rows.txt").write_text("first line\nsecond line\n")
    for name in ("rows.jsonl", "rows.json", "rows.parquet", "rows.csv"):
        source = load_source(entry(tmp_path / name, field="data"))
        assert source.dataset.to_list() == ROWS, name
    text = load_source(entry(tmp_path / "rows.txt")).dataset
    assert text["text"] == ["first line", "second line"]
    # an Arrow file written by datasets, found through ds_type when the extension is odd
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "rows.data").write_bytes(arrow.read_bytes())
    assert load_source(entry(tmp_path / "rows.data", ds_type="arrow")).dataset.to_list() == ROWS


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert len(load_source(entry(tmp_path / "single")).dataset) == 7
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS[3:])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_source(entry(tmp_path / "dict", split="test")).dataset) == 4


def test_directory_of_files_locates_rows_per_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    (tmp_path / "d" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:]))
    source = load_source(entry(tmp_path / "d"))
    assert len(source.dataset) == 7
    assert source.locate(4) == (str(tmp_path / "d" / "b.jsonl"), 2)
    only_b = load_source(entry(tmp_path / "d", data_files="b.jsonl"))
    assert only_b.dataset["instruction"][0] == "sort 3"


def test_shards_keep_row_numbers(tmp_path):
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    source = load_source(entry(tmp_path / "r.jsonl", shards=3, shards_idx=1))
    assert source.dataset["instruction"] == ["sort 3", "sort 4"]
    assert source.locate(0) == (str(tmp_path / "r.jsonl"), 4)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: dataset file not found"):
        load_source(entry(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="not found"):
        load_source(entry("./data/also_missing.parquet"))


def test_malformed_json_line_names_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in ROWS[:4]] + ['{"instruction": "broken", "output": '] + [json.dumps(ROWS[5])]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, row 5: line 5 is not valid JSON") as info:
        load_source(entry(tmp_path / "bad.jsonl"))
    assert info.value.row == 5 and info.value.path.endswith("bad.jsonl")


def test_malformed_json_array_names_the_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON: .*line 3 column"):
        load_source(entry(tmp_path / "bad.json"))
