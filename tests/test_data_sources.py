"""Loading dataset entries: file types, saved directories, errors with file and line."""

import json

import pytest

from plait.config.schema import DatasetConfig
from plait.data.sources import load_source
from plait.errors import ConfigError, DataError

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
    with pytest.raises(DataError, match=r"bad\.jsonl, row 5: not valid JSON: Expecting value at column 37") as info:
        load_source(entry(tmp_path / "bad.jsonl"))
    assert info.value.row == 5 and info.value.path.endswith("bad.jsonl")


def test_malformed_json_lines_after_blank_lines_name_row_and_line(tmp_path):
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "[1, 2]", "  ", '{"instruction": ', json.dumps(ROWS[2])]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, row 3 \(line 4\): a JSON list, expected an object") as info:
        load_source(entry(tmp_path / "bad.jsonl"))
    assert (info.value.row, info.value.line) == (3, 4)


def test_skip_bad_rows_leaves_malformed_json_lines_out(tmp_path):
    lines = [json.dumps(ROWS[0]), "", '{"instruction": "broken", ', json.dumps(ROWS[1]), "7", json.dumps(ROWS[2])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = load_source(entry(path), skip_bad_rows=True)
    assert source.dataset.to_list() == ROWS[:3]
    assert source.skipped == [f"{path}, row 2 (line 3): not valid JSON: Expecting property name enclosed in "
                              f"double quotes at column 27",
                              f"{path}, row 4 (line 5): a JSON int, expected an object"]
    # the rows kept still point at their own lines
    assert [source.where(i) for i in range(3)] == [(str(path), 1, 1), (str(path), 2, 4), (str(path), 3, 6)]
    assert source.error(2, "missing field 'output'").args[0] == f"{path}, row 3 (line 6): missing field 'output'"


def test_blank_lines_do_not_shift_reported_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    source = load_source(entry(path))
    assert len(source.dataset) == 3
    assert source.where(1) == (str(path), 2, 3)
    assert str(source.error(1, "bad")) == f"{path}, row 2 (line 3): bad"
    assert str(source.error(0, "bad")) == f"{path}, row 1: bad"  # row and line agree: said once
    # a file that is not one row per line gives rows only
    (tmp_path / "one.json").write_text('{\n "instruction": "a",\n "output": "b"\n}\n')
    single = load_source(entry(tmp_path / "one.json"))
    assert single.where(0) == (str(tmp_path / "one.json"), 1, None)


def test_train_on_split_picks_the_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "validation": datasets.Dataset.from_list(ROWS[3:])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_source(entry(tmp_path / "dict", train_on_split="validation")).dataset) == 4
    with pytest.raises(ConfigError, match=r"'train_on_split' of dataset .*'test' is not in the saved dataset; "
                                          r"accepted: train, validation"):
        load_source(entry(tmp_path / "dict", train_on_split="test"))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(ConfigError, match=r"'train_on_split' .*'validation' is not accepted; local data files"):
        load_source(entry(tmp_path / "r.jsonl", train_on_split="validation"))
    assert len(load_source(entry(tmp_path / "r.jsonl", train_on_split="train")).dataset) == 7


def test_hub_datasets_get_split_and_trust_remote_code(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = load_source(entry("someone/some-dataset", train_on_split="validation", trust_remote_code=True))
    assert len(source.dataset) == 7
    assert calls == [("someone/some-dataset", {"name": None, "data_files": None, "split": "validation",
                                               "revision": None, "trust_remote_code": True})]
    load_source(entry("someone/other", split="test"))
    assert calls[-1][1]["split"] == "test" and calls[-1][1]["trust_remote_code"] is False


def test_malformed_json_array_names_the_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON: .*line 3 column"):
        load_source(entry(tmp_path / "bad.json"))


def test_row_errors_survive_pickling(tmp_path):
    # worker processes send their errors back pickled
    import pickle

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    error = pickle.loads(pickle.dumps(load_source(entry(path)).error(1, "bad")))
    assert (str(error), error.path, error.row, error.line) == (f"{path}, row 2 (line 3): bad", str(path), 2, 3)
