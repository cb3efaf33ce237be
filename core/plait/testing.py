"""A kit for testing Plait and its plugins without a model hub.

Everything here builds real objects: a byte-level BPE tokenizer trained with
``tokenizers`` on generated text, a random-init Hugging Face model saved with
``save_pretrained``, a plugin manager with one extra plugin, and an in-process
run of the ``plait`` command line.

    from plait.testing import make_tiny_model, run_cli

    def test_my_format(tmp_path):
        model_dir = make_tiny_model(tmp_path / "model")
        result = run_cli(["preprocess", str(cfg_path)], plugins=[my_plugin])
        assert result.exit_code == 0
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

#: special tokens of the tiny tokenizer; chatml markers so chat templates work
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>"]

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use each which she do how their if "
    "will up other about out many then them these so some her would make like him into time has look two "
    "more write go see number no way could people my than first water been call who oil its now find long "
    "down day did get come made may part instruction input output response below request task answer user "
    "assistant system reverse sort sum add letters words numbers question write appropriately completes"
).split()


def sample_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Generated English-like lines with digits and punctuation, for training a tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]))
    lines.append("### Instruction:\n### Input:\n### Response:\n" + "abcdefghijklmnopqrstuvwxyz 0123456789")
    return lines


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE,
                        texts: Iterable[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer in ``path``.

    It has a BOS and an EOS token, a separate pad token, chatml markers as
    special tokens and (by default) a chatml chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) if texts is not None else sample_text(), trainer=trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path


#: tiny shapes per family: enough layers and heads to exercise GQA, rotary and the MLP
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


def make_tiny_model(path: str | Path, tokenizer_path: str | Path | None = None, *, family: str = "llama",
                    seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init causal LM of ``family`` (a transformers ``model_type``)
    with the tiny tokenizer beside it, so ``base_model: path`` just works."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else make_tiny_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    shape = {**TINY_SHAPE, **config_overrides}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=shape.pop("tie_word_embeddings", False),
        **shape,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (``MASTER_PORT`` of a test's process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``args`` (a launcher such as ``python -m torch.distributed.run ...``) to its end; return its output.

    The launcher runs in a session of its own. On ``timeout`` the whole session is
    killed, the launcher's worker processes with it (killing only the launcher
    leaves a hung gloo worker spinning on the CI machine's two cores), and the
    test fails with the last output each process wrote, which says where it
    stopped."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, args))[:300]}\nran past {timeout:g} s and was killed\n"
                                 f"--- stdout (end) ---\n{out[-2000:]}\n--- stderr (end) ---\n{err[-6000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def write_config(path: str | Path, **keys: Any) -> Path:
    """Write a YAML config with ``keys``."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def plugin_manager(*plugins, entry_points: bool = True, config_plugins: list[str] = ()):
    """A fresh plugin manager with ``plugins`` registered for one test."""
    from plait.plugins import build_plugin_manager

    return build_plugin_manager(config_plugins, entry_points=entry_points, extra=list(plugins))


def build_run_config(keys: dict, *, plugins=(), overrides: list[str] = ()):
    """Validate ``keys`` (a config dict) as ``plait train`` would. Returns ``(cfg, pm)``."""
    from omegaconf import OmegaConf

    from plait.config import build_config

    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(keys), OmegaConf.from_dotlist(list(overrides))),
                                    resolve=True)
    pm = plugin_manager(*plugins, config_plugins=merged.get("plugins") or [])
    return build_config(pm, merged, {k: "file" for k in keys}), pm


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(args: list[str], *, plugins=()) -> CliResult:
    """Run ``plait ARGS`` in this process with ``plugins`` registered; capture its output."""
    from plait import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args), extra_plugins=list(plugins))
    return CliResult(code, out.getvalue(), err.getvalue())
