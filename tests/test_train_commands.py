"""`plait train`, `evaluate`, `inference` and `merge-lora` on one small LoRA run."""

from __future__ import annotations

import io
import json
import sys
import warnings

import pytest
import torch

from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("commands")
    model = make_tiny_model(root / "model")
    rows, _ = make_split(24, 4)
    data = write_jsonl(root / "train.jsonl", rows)
    config = write_config(root / "lora.yml", base_model=str(model), datasets=[{"path": str(data), "type": "alpaca"}],
                          dataset_prepared_path=str(root / "prepared"), sequence_len=256, micro_batch_size=4,
                          max_steps=6, learning_rate=5e-3, val_set_size=4, adapter="lora", lora_r=4, lora_alpha=8,
                          lora_target_linear=True, output_dir=str(root / "out"))
    show_library_bars_as_a_fresh_process_does()
    result = run_cli(["train", str(config)])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert_no_library_bars(result.stderr)
    return root, config, model


#: transformers' and huggingface_hub's own bars; a quiet run shows Plait's bars only
LIBRARY_BARS = ("Loading weights", "Writing model shards", "Loading checkpoint shards", "Fetching")


def show_library_bars_as_a_fresh_process_does():
    """An earlier in-process run may have hidden them for the whole process;
    the check below must see what a new ``plait`` process would print."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    enable_progress_bars()
    hf_logging.enable_progress_bar()


def assert_no_library_bars(stderr: str) -> None:
    shown = [bar for bar in LIBRARY_BARS if bar in stderr]
    assert not shown, f"library progress bars in a quiet run: {shown}\n{stderr[-2000:]}"


def test_train_command_writes_an_adapter_and_the_run_files(lora_run):
    root, _, _ = lora_run
    out = root / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.resolved.yaml",
                 "environment.json", "metrics.jsonl", "loss.png", "report.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["step"] == 6 and "eval_loss" in records[-1]  # the final evaluation


def test_evaluate_prints_loss_and_perplexity_of_the_trained_model(lora_run):
    root, config, _ = lora_run
    show_library_bars_as_a_fresh_process_does()
    trained = run_cli(["evaluate", str(config), "--json"])
    with warnings.catch_warnings():  # --verbose changes the process's warning filters
        base = run_cli(["evaluate", str(config), "--json", "--base", "--verbose"])
    assert trained.exit_code == 0 and base.exit_code == 0, trained.stderr[-2000:] + base.stderr[-2000:]
    assert_no_library_bars(trained.stderr)  # loading the model showed transformers' bar before
    assert "Loading weights" in base.stderr  # --verbose shows every library's bars
    trained, base = json.loads(trained.stdout), json.loads(base.stdout)
    assert trained["split"] == "eval" and trained["rows"] == 4
    report = json.loads((root / "out" / "report.json").read_text())
    assert trained["eval_loss"] == pytest.approx(report["eval_loss"], rel=1e-5)  # same model, same rows
    assert trained["eval_loss"] < base["eval_loss"]
    assert trained["eval_ppl"] == pytest.approx(2.718281828 ** trained["eval_loss"], rel=1e-6)


def test_merge_lora_equals_the_adapter_and_loads_with_plain_transformers(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, config, model_dir = lora_run
    result = run_cli(["merge-lora", str(config)])
    assert result.exit_code == 0, result.stderr[-3000:]
    merged_dir = root / "out" / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / "out").eval()
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        a, m = adapter(ids).logits, merged(ids).logits
    torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        assert (base(ids).logits - a).abs().max() > 1e-3  # the adapter changed something to merge
    assert (merged_dir / "tokenizer.json").exists()


def test_merge_lora_of_a_full_finetune_says_there_is_no_adapter(lora_run, tmp_path):
    root, config, _ = lora_run
    result = run_cli(["merge-lora", str(config), "--lora-model-dir", str(tmp_path)])
    assert result.exit_code == 2 and "holds no LoRA adapter" in result.stderr


def test_inference_reads_prompts_from_stdin(lora_run, monkeypatch):
    # in this process (a new one only adds the imports: the resume tests run `plait train` as one)
    root, config, _ = lora_run
    monkeypatch.setattr(sys, "stdin", io.StringIO("Reverse: a b c\nReverse: x y z\n"))  # not a terminal
    show_library_bars_as_a_fresh_process_does()
    result = run_cli(["inference", str(config), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert_no_library_bars(result.stderr)
    assert result.stdout.count("\n") == 2  # one answer line per prompt (a barely trained model may say little)


def test_merge_keeps_the_dtype_the_base_is_stored_in(tmp_path):
    from transformers import AutoModelForCausalLM

    from plait.commands.merge_lora import merge
    from plait.testing import build_run_config

    model_dir = make_tiny_model(tmp_path / "fp32")
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for path in model_dir.iterdir():  # the tokenizer files
        if path.name not in ("model.safetensors", "config.json", "generation_config.json"):
            (tmp_path / "bf16" / path.name).write_bytes(path.read_bytes())
    cfg, pm = build_run_config({"base_model": str(tmp_path / "bf16"), "adapter": "lora",
                                "lora_target_modules": ["q_proj"], "output_dir": str(tmp_path / "out")})
    peft_model = pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=None))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge(cfg, pm, tmp_path / "adapter", tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == reloaded.dtype == torch.bfloat16
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = peft_model.float().eval()(ids).logits
        torch.testing.assert_close(reloaded.float().eval()(ids).logits, expected, rtol=0.05, atol=0.05)
