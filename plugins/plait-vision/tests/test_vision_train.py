"""Training tiny vision-language models end to end: LoRA and full, saved and reloaded."""

from __future__ import annotations

import json

import pytest
from plait.testing import build_run_config, write_jsonl

from plait_vision.testing import color_rows, vision_keys


def losses(output_dir) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def train(keys):
    from plait.train.loop import train as run_training

    cfg, pm = build_run_config(keys)
    return run_training(cfg, pm)


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["qwen2_vl_dir", "llava_dir", "mistral3_dir"])
def test_lora_learns_a_repeated_batch_and_loads_in_plain_peft(model_fixture, tmp_path, request):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model_dir = request.getfixturevalue(model_fixture)
    # two rows, micro batch 2: every step sees the same batch
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 2))
    keys = vision_keys(model_dir, data, tmp_path, max_steps=8, learning_rate=1e-2, lr_scheduler="constant",
                       gradient_checkpointing=model_fixture == "qwen2_vl_dir")
    run = train(keys)
    seen = losses(run.output_dir)
    assert len(seen) == 8 and seen[-1] < seen[0] - 0.5, seen

    # LoRA sits on the language model only; the vision tower is untouched
    trained = [name for name, p in run.model.named_parameters() if p.requires_grad]
    assert trained and all(".language_model." in name and "lora_" in name for name in trained)

    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), run.output_dir)
    saved = {k: v for k, v in reloaded.state_dict().items() if "lora_B" in k}
    assert saved and any(v.abs().sum() > 0 for v in saved.values())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # the processor files are saved beside the adapter
    assert (run.output_dir / "chat_template.jinja").exists()


@pytest.mark.slow
def test_full_fine_tune_keeps_the_vision_tower_frozen(qwen2_vl_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    data = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 2))
    keys = vision_keys(qwen2_vl_dir, data, tmp_path, adapter=None, lora_target_linear=None, lora_r=None,
                       lora_alpha=None, max_steps=2)
    keys = {k: v for k, v in keys.items() if v is not None}
    run = train(keys)
    before = AutoModelForImageTextToText.from_pretrained(qwen2_vl_dir).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(run.output_dir).state_dict()
    vision = [k for k in before if k.startswith("model.visual.")]
    language = [k for k in before if k.startswith("model.language_model.layers.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in language)


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["llava_dir", "mistral3_dir"])
def test_inference_takes_an_image_and_the_merged_model_keeps_its_processor(model_fixture, tmp_path, monkeypatch,
                                                                          request):
    import io

    import torch
    from peft import PeftModel
    from PIL import Image
    from plait.testing import run_cli, write_config
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from plait_vision.processor import load_processor

    model_dir = request.getfixturevalue(model_fixture)
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 2))
    config = write_config(tmp_path / "c.yml", **vision_keys(model_dir, data, tmp_path, max_steps=2,
                                                             learning_rate=1e-2))
    assert run_cli(["train", str(config)]).exit_code == 0
    image = tmp_path / "img" / "0_red.png"

    monkeypatch.setattr("sys.stdin", io.StringIO("what colour is it?\n"))
    result = run_cli(["inference", str(config), "--image", str(image), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    missing = run_cli(["inference", str(config), "--image", str(tmp_path / "gone.png")])
    assert missing.exit_code == 2 and "--image" in missing.stderr and "gone.png: no such file" in missing.stderr

    # merge-lora carries the processor over: the merged model answers like base + adapter
    assert run_cli(["merge-lora", str(config), "--out", str(tmp_path / "merged")]).exit_code == 0
    # transformers builds Pixtral's processor only with torchvision; Plait's loader builds it without
    processor = (AutoProcessor.from_pretrained(tmp_path / "merged") if model_fixture == "llava_dir"
                 else load_processor(str(tmp_path / "merged"), "AutoProcessor"))
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour is it?"}]}], add_generation_prompt=True,
        tokenize=False)
    inputs = processor(text=[prompt], images=[Image.open(image)], return_tensors="pt")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter(**inputs).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_qlora_quantizes_the_language_model_only(llava_dir, tmp_path):
    import bitsandbytes as bnb
    import torch

    data = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 2))
    run = train(vision_keys(llava_dir, data, tmp_path, adapter="qlora", load_in_4bit=True, max_steps=4,
                            learning_rate=1e-2, lr_scheduler="constant"))
    base = run.model.get_base_model().model
    assert isinstance(base.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    vision_linears = [m for m in base.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert vision_linears and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision_linears)
    seen = losses(run.output_dir)
    assert seen[-1] < seen[0] - 0.3, seen


@pytest.mark.slow
def test_gemma3_masks_its_image_sequence_and_trains(tmp_path):
    from plait.data.prepare import prepare_datasets

    from plait_vision.testing import make_tiny_gemma3

    model_dir = make_tiny_gemma3(tmp_path / "gemma3")
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 2))
    keys = vision_keys(model_dir, data, tmp_path, max_steps=3, learning_rate=1e-2, lr_scheduler="constant")
    cfg, pm = build_run_config(keys)
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    row = prepare_datasets(cfg, pm, tokenizer, show_progress=False).train[0]
    soft, boi, eoi = (tokenizer.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>",
                                                                  "<end_of_image>"))
    start = row["input_ids"].index(boi)
    # the processor's image sequence: <start_of_image>, 4 soft tokens, <end_of_image>, all masked
    assert row["input_ids"][start:start + 6] == [boi, soft, soft, soft, soft, eoi]
    assert all(label == -100 for label in row["labels"][:start + 6])
    assert tokenizer.decode([t for t in row["labels"] if t != -100]).startswith("it is ")
    run = train(keys)
    seen = losses(run.output_dir)
    assert seen[-1] < seen[0], seen
