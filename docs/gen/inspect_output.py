"""Real ``plait inspect`` output for the datasets page.

Builds the test kit's tiny tokenizer (a chatml chat template, a BOS), writes a
few alpaca and chat rows, and runs ``plait inspect`` on each through the CLI;
the page shows what a user sees (masked text in ``[[...]]``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

ALPACA_ROWS = [
    {"instruction": "Reverse the letters.", "input": "c a t", "output": "t a c"},
    {"instruction": "Name a primary colour.", "output": "red"},
]
CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "You are brief."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "Rome."}]},
]


def _inspect(root: Path, name: str, rows: list[dict], dataset: dict, extra: dict) -> str:
    from plait.testing import run_cli, write_config, write_jsonl

    data = write_jsonl(root / f"{name}.jsonl", rows)
    config = write_config(root / f"{name}.yml", base_model=str(root / "tokenizer"),
                          datasets=[{"path": f"{name}.jsonl", **dataset}],
                          dataset_prepared_path=str(root / "prepared"), **extra)
    result = run_cli(["inspect", str(config), "--rows", str(len(rows)), "--color", "never"])
    if result.exit_code != 0:
        raise RuntimeError(f"plait inspect failed on {name}: {result.stderr}")
    # the paths of this temporary directory mean nothing to a reader
    text = result.stdout.replace(str(data.parent) + "/", "").replace(str(root), ".")
    command = f"$ plait inspect {name}.yml --rows {len(rows)}"
    return f"{command}\n{text.rstrip()}\n"


def generate(out_dir: Path) -> list[Path]:
    from plait.testing import make_tiny_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny_tokenizer(root / "tokenizer")
        import os

        cwd = os.getcwd()
        os.chdir(root)  # dataset paths relative to here, as a user writes them
        try:
            for name, rows, dataset, extra in (
                ("alpaca", ALPACA_ROWS, {"type": "alpaca"}, {}),
                ("chat", CHAT_ROWS, {"type": "chat_template", "chat_template": "chatml"}, {}),
                ("chat-last-turn", CHAT_ROWS, {"type": "chat_template", "chat_template": "chatml",
                                               "roles_to_train": ["assistant"], "train_on_eos": "last"}, {}),
            ):
                path = out_dir / f"inspect-{name}.txt"
                path.write_text(_inspect(root, name, rows, dataset, extra))
                written.append(path)
        finally:
            os.chdir(cwd)
    return written
