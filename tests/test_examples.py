"""The example configs (`plait examples`): each validates, together they cover
the common cases, a few train for two steps on a CPU with tiny overrides, and
the command lists and copies them from the installed package."""

from __future__ import annotations

import pytest
import yaml

from plait.commands.examples import available, summary
from plait.testing import make_tiny_model, run_cli, write_jsonl

EXAMPLES = available()
#: examples that need several processes: validated at the world size they are written for
WORLD_SIZES = {"llama3-context-parallel": 8, "llama3-tensor-parallel": 8}


def _raw(name: str) -> dict:
    return yaml.safe_load(EXAMPLES[name].read_text())


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n != "quickstart"])
def test_every_example_is_a_valid_config(name, monkeypatch):
    from plait.config import build_config, load_raw_config
    from plait.plugins import build_plugin_manager

    monkeypatch.setenv("WORLD_SIZE", str(WORLD_SIZES.get(name, 1)))
    raw, sources = load_raw_config(EXAMPLES[name])
    build_config(build_plugin_manager(), raw, sources)  # raises ConfigError naming the key
    assert summary(EXAMPLES[name]), f"{name}: the first comment line says what it is for"


def test_the_examples_cover_the_common_cases():
    configs = {name: _raw(name) for name in EXAMPLES}
    for family in ("llama3", "qwen3", "mistral", "gemma3", "phi3", "mixtral"):
        assert any(name.startswith(family) for name in configs), family
    cases = {
        "lora": lambda c: c.get("adapter") == "lora",
        "qlora": lambda c: c.get("adapter") == "qlora" and c.get("load_in_4bit"),
        "full": lambda c: "adapter" not in c and "pretraining_dataset" not in c,
        "packing": lambda c: c.get("sample_packing"),
        "fsdp2": lambda c: c.get("fsdp") and c.get("fsdp_version") == 2,
        "tensor parallel": lambda c: c.get("tensor_parallel_size", 1) > 1,
        "context parallel": lambda c: c.get("context_parallel_size", 1) > 1,
        "streaming pretraining": lambda c: c.get("pretraining_dataset"),
        "vision-language": lambda c: c.get("processor_type"),
        "dpo": lambda c: c.get("rl") == "dpo",
    }
    for case, matches in cases.items():
        assert any(matches(c) for c in configs.values()), case


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("examples")
    rows, _ = make_split(16, 4)
    chats = [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in rows]
    return {"root": root, "model": make_tiny_model(root / "model"), "alpaca": write_jsonl(root / "alpaca.jsonl", rows),
            "chat": write_jsonl(root / "chat.jsonl", chats),
            # the stream is packed into whole sequence_len rows: enough text for a few
            "text": write_jsonl(root / "text.jsonl", [{"text": " ".join(f"{r['instruction']} {r['output']}." for r in rows)}
                                                      for _ in range(8)])}


def tiny_overrides(name: str, tiny: dict) -> list[str]:
    """What turns an example into a CPU run of two steps: a tiny local model and
    data, short sequences, no eval. Everything else is the example's own."""
    raw = _raw(name)
    out = [f"base_model={tiny['model']}", "max_steps=2", "micro_batch_size=2", "gradient_accumulation_steps=1",
           "sequence_len=256", f"output_dir={tiny['root'] / name}",
           f"dataset_prepared_path={tiny['root'] / 'prepared'}", "save_steps=null", "saves_per_epoch=null"]
    if "pretraining_dataset" in raw:
        return out + [f"pretraining_dataset.0.path={tiny['text']}", "pretraining_dataset.0.name=null"]
    kind = "chat" if raw["datasets"][0]["type"] == "chat_template" else "alpaca"
    return out + [f"datasets.0.path={tiny[kind]}", "datasets.0.split=train", "val_set_size=0", "eval_steps=null"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3-lora", "qwen3-lora", "llama3-qlora", "pretraining-streaming"])
def test_an_example_trains_two_steps_on_a_cpu_with_tiny_overrides(tiny, name):
    if name == "llama3-qlora":
        pytest.importorskip("bitsandbytes")
    result = run_cli(["train", str(EXAMPLES[name]), *tiny_overrides(name, tiny)])
    assert result.exit_code == 0, result.stderr[-3000:]
    out = tiny["root"] / name
    losses = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2
    weights = "adapter_model.safetensors" if _raw(name).get("adapter") else "model.safetensors"
    assert (out / weights).is_file()


def test_plait_examples_lists_and_copies_from_the_package(tmp_path):
    listing = run_cli(["examples"])
    assert listing.exit_code == 0
    for name in EXAMPLES:
        assert name in listing.stdout
    copied = run_cli(["examples", "qwen3-lora", "--dir", str(tmp_path)])
    assert copied.exit_code == 0, copied.stderr
    assert (tmp_path / "qwen3-lora.yml").read_text() == EXAMPLES["qwen3-lora"].read_text()
    again = run_cli(["examples", "qwen3-lora", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.stderr
    typo = run_cli(["examples", "qwen3-lorra"])
    assert typo.exit_code == 2 and "did you mean 'qwen3-lora'?" in typo.stderr
