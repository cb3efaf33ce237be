"""`plait preprocess` and `plait inspect` end to end through the CLI."""

import pytest

from plait.testing import make_tiny_tokenizer, run_cli, write_config, write_jsonl


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    tok = make_tiny_tokenizer(root / "tok")
    rows = [{"instruction": f"sort the words {i}", "output": f"a it the {i}"} for i in range(10)]
    rows.append({"instruction": "no output"})
    data = write_jsonl(root / "a.jsonl", rows)
    chats = write_jsonl(root / "c.jsonl", [{"messages": [{"role": "user", "content": "add 3"},
                                                         {"role": "assistant", "content": "7"}]}] * 4)
    return write_config(root / "cfg.yml", base_model=str(tok), output_dir=str(root / "out"),
                        datasets=[{"path": str(data), "type": "alpaca"}, {"path": str(chats), "type": "chat_template"}],
                        val_set_size=2)


def test_preprocess_prints_path_and_table(config):
    failed = run_cli(["preprocess", str(config), "--no-progress"])
    assert failed.exit_code == 2
    assert "a.jsonl, row 11: missing field 'output'" in failed.stderr

    result = run_cli(["preprocess", str(config), "skip_bad_rows=true", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    assert "wrote prepared data: " in result.stdout
    assert "train rows: 12, eval rows: 2" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("| dataset"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "dataset", "split", "rows in", "kept", "too long", "too short", "bad", "nothing to train", "duplicates",
        "truncated", "tokens", "trained tokens"]
    alpaca = next(line for line in result.stdout.splitlines() if "a.jsonl" in line and line.startswith("|"))
    assert [c.strip() for c in alpaca.strip("|").split("|")][1:10] == ["train", "11", "10", "0", "0", "1", "0", "0",
                                                                     "0"]
    assert "| total" in result.stdout
    assert "skipped bad row:" in result.stdout

    again = run_cli(["preprocess", str(config), "skip_bad_rows=true", "--no-progress"])
    assert again.exit_code == 0 and "reused prepared data: " in again.stdout


def test_inspect_shows_masked_and_trained_text(config):
    result = run_cli(["inspect", str(config), "skip_bad_rows=true", "shuffle_merged_datasets=false", "--rows", "2"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("--- row ") == 2
    assert "\033[" not in result.stdout  # not a terminal: brackets, no colour
    assert "[[<|begin_of_text|>Below is an instruction that describes a task." in result.stdout
    assert "### Response:\n]]a it the" in result.stdout
    coloured = run_cli(["inspect", str(config), "skip_bad_rows=true", "--rows", "1", "--color", "always"])
    assert "\033[32m" in coloured.stdout and "[[" not in coloured.stdout


def test_preprocess_skips_and_counts_malformed_json_lines(tmp_path):
    tok = make_tiny_tokenizer(tmp_path / "tok")
    data = tmp_path / "a.jsonl"
    good = [f'{{"instruction": "sort {i}", "output": "ok {i}"}}' for i in range(4)]
    data.write_text("\n".join(good[:2] + ["", '{"instruction": "cut'] + good[2:]) + "\n")
    config = write_config(tmp_path / "cfg.yml", base_model=str(tok), output_dir=str(tmp_path / "out"),
                          datasets=[{"path": str(data), "type": "alpaca"}])
    failed = run_cli(["preprocess", str(config), "--no-progress"])
    assert failed.exit_code == 2
    assert "a.jsonl, row 3 (line 4): not valid JSON" in failed.stderr
    result = run_cli(["preprocess", str(config), "skip_bad_rows=true", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "a.jsonl" in line and line.startswith("|"))
    assert [c.strip() for c in row.strip("|").split("|")][1:7] == ["train", "5", "4", "0", "0", "1"]
    assert "skipped bad row: " in result.stdout and "row 3 (line 4): not valid JSON" in result.stdout


def test_unknown_type_variant_fails_before_the_model_is_loaded(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    config = write_config(tmp_path / "cfg.yml", base_model=str(tmp_path / "no-such-model"),
                          output_dir=str(tmp_path / "out"),
                          datasets=[{"path": str(data), "type": "alpaca_chat.load_concize"}])
    result = run_cli(["preprocess", str(config), "--no-progress"])
    assert result.exit_code == 2
    assert "config key 'datasets.0.type'" in result.stderr and "'alpaca_chat.load_concize'" in result.stderr
    assert "did you mean 'alpaca_chat.load_concise'?" in result.stderr
    # every problem in one message: the missing model is named by the config check, never loaded
    assert "'base_model': " in result.stderr and "does not exist (a local path" in result.stderr
    assert "Traceback" not in result.stderr
