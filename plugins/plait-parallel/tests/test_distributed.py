"""Parallel layouts train like one process (gloo, CPU, several processes).

Two ``torchrun`` jobs run every layout through
:mod:`plait_parallel.equivalence` (start-up dominates, so each job runs
several scenarios in one process group):

* 2 processes: FSDP2, TP, CP (zigzag and contiguous split, packed rows), each
  full fine-tune and LoRA, and FSDP2 with shard_grad_op + activation
  checkpointing + an explicit layer class; FSDP ones save a sharded
  checkpoint after step 2;
* 4 processes: FSDP2 x TP (2x2) full and LoRA, FSDP2 x CP, TP x CP (LoRA,
  zigzag), HSDP (2 replicas x 2 shards, LoRA), and the 2-process FSDP
  checkpoint resumed at 4.

The loop computes logits from the decoder's hidden states and the head weight
outside the model's forward, as Plait's training loop does.

The same loop in this process (no mesh) is the reference. Tolerance: 1e-5
absolute on the loss (float32; measured differences are ~1e-6, from the
order of reductions).
"""

import json
import os
import sys

import pytest

from plait.testing import launch
from plait_parallel.equivalence import SAVE_AT, STEPS, batch_loss, make_batch, train_curve

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
TWO = ["fsdp", "fsdp_lora", "fsdp_options", "tp", "tp_lora", "cp", "cp_lora"]
FOUR = ["fsdp_tp", "fsdp_tp_lora", "fsdp_cp", "tp_cp_lora", "hsdp_lora"]
#: local shape of the 64x64 q_proj weight on one rank: proof the layout was applied
#: (a no-op TP would still match the reference loss)
LOCAL_Q_SHAPE = {"fsdp_tp": [16, 64], "fsdp_tp_lora": [16, 64], "fsdp_cp": [16, 64], "tp_cp_lora": [16, 64]}


def torchrun(nproc, model_dir, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLAIT_LOAD_PLUGINS": "parallel"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "plait_parallel.equivalence", "--model", model_dir, "--out", str(out), *extra]
    proc = launch(cmd, env=env, timeout=300)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def qwen2_dir(tiny_model_dir, tmp_path_factory):
    """Another family: q/k/v biases and tied embeddings (test_qwen2_with_tied_embeddings_and_biases)."""
    from plait.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", tiny_model_dir, family="qwen2",
                               tie_word_embeddings=True))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, qwen2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = root / "ckpt"
    # the qwen2 layouts ride along in the two-process launch: each launch costs seconds of start-up
    two = torchrun(2, tiny_model_dir, root / "two.json", "--scenarios", ",".join(TWO), "--ckpt-root", str(ckpt),
                   "--other-model", f"qwen2={qwen2_dir}:tp,fsdp")
    four = torchrun(4, tiny_model_dir, root / "four.json", "--scenarios", ",".join(FOUR),
                    "--load", f"fsdp={ckpt / 'fsdp'}")
    reference, norms = {}, {}
    for lora in (False, True):
        info = {}
        reference[lora] = train_curve(tiny_model_dir, {}, lora, distributed=False, info=info)
        norms[lora] = info["grad_norms"]
    return {**two, **four, "reference": reference, "reference_norms": norms, "ckpt": ckpt}


@pytest.mark.parametrize("name", TWO + FOUR)
def test_loss_curve_matches_one_process(runs, name):
    expected = runs["reference"][name.endswith("_lora")]
    got = runs[name]
    assert len(got) == STEPS
    assert got[-1] < got[0] - 0.02  # it trains
    assert got == pytest.approx(expected, abs=TOLERANCE)
    # gradient norms (torch.nn.utils.clip_grad_norm_ at 1.0: every parameter is a DTensor) agree too
    assert runs["norms:" + name] == pytest.approx(runs["reference_norms"][name.endswith("_lora")], rel=1e-5)
    layout = runs["layout:" + name]
    assert layout["type"] == "DTensor" and layout["local_shape"] == LOCAL_Q_SHAPE.get(name, [32, 64])
    # fsdp_config.activation_checkpointing reaches core's model pipeline through gradient_checkpointing_mode
    assert runs["checkpointed:" + name] == (2 if name == "fsdp_options" else 0)


def test_checkpoint_from_two_processes_resumes_in_one(runs, tiny_model_dir):
    for name, lora in (("fsdp", False), ("fsdp_lora", True)):
        resumed = train_curve(tiny_model_dir, {}, lora, distributed=False, steps=STEPS - SAVE_AT,
                              load_dir=str(runs["ckpt"] / name))
        # step SAVE_AT+2 depends on the restored AdamW moments, not only the weights
        assert resumed == pytest.approx(runs["reference"][lora][SAVE_AT:], abs=TOLERANCE)


def test_checkpoint_from_two_processes_resumes_in_four(runs):
    assert runs["resumed:fsdp"] == pytest.approx(runs["reference"][False][SAVE_AT:], abs=TOLERANCE)


def test_merge_sharded_gives_plain_transformers_model(runs, tiny_model_dir, tmp_path, monkeypatch):
    import plait_parallel.plugin as plugin
    from plait.testing import run_cli
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "parallel")
    result = run_cli(["merge-sharded", str(runs["ckpt"] / "fsdp"), str(tmp_path / "full")], plugins=[plugin])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "full" / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    # the weights after SAVE_AT steps give the loss the reference logged at the next step
    assert batch_loss(model, make_batch(model.config.vocab_size)) == pytest.approx(
        runs["reference"][False][SAVE_AT], abs=TOLERANCE)


def test_merge_sharded_lora_gives_peft_adapter(runs, tiny_model_dir, tmp_path, monkeypatch):
    import plait_parallel.plugin as plugin
    from peft import PeftModel
    from plait.testing import run_cli
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "parallel")
    out = tmp_path / "adapter"
    result = run_cli(["merge-sharded", str(runs["ckpt"] / "fsdp_lora"), str(out), "--base-model", tiny_model_dir],
                     plugins=[plugin])
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert batch_loss(model, make_batch(model.config.vocab_size)) == pytest.approx(
        runs["reference"][True][SAVE_AT], abs=TOLERANCE)


def test_merge_sharded_rejects_incomplete_checkpoint(tmp_path, monkeypatch):
    import plait_parallel.plugin as plugin
    from plait.testing import run_cli

    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "parallel")
    result = run_cli(["merge-sharded", str(tmp_path), str(tmp_path / "out")], plugins=[plugin])
    assert result.exit_code == 2 and "plait_sharded.json" in result.stderr


def test_qwen2_with_tied_embeddings_and_biases(runs, qwen2_dir):
    """Another family: q/k/v biases split with their weights, and the tied
    embedding/head parameter stays one parameter under TP and FSDP2."""
    expected = train_curve(qwen2_dir, {}, False, distributed=False)
    for name in ("tp", "fsdp"):
        got = runs[f"qwen2/{name}"]
        assert got == pytest.approx(expected, abs=TOLERANCE)
        assert got[-1] < got[0] - 0.02
