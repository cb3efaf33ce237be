"""Preparing chat rows with images: expansion, masks, image references, bad images."""

from __future__ import annotations

import base64
import json

import pytest
from plait.errors import ConfigError, DataError
from plait.testing import build_run_config, write_jsonl

from plait_vision.testing import color_rows, make_image, vision_keys


def prepare(keys):
    from plait.data.prepare import prepare_datasets

    cfg, pm = build_run_config(keys)
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    return prepare_datasets(cfg, pm, tokenizer, show_progress=False), tokenizer, cfg, pm


def trained_text(tokenizer, row) -> str:
    # label i is the target of position i (the loop shifts); the first position has no predecessor
    return tokenizer.decode([t for t in row["labels"][1:] if t != -100])


def test_qwen2_vl_row_expanded_and_masked_exactly(qwen2_vl_dir, tmp_path):
    rows = color_rows(tmp_path / "img", 2)
    data, tokenizer, _, _ = prepare(vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path))
    row = data.train.sort("length")[0]
    ids, labels = row["input_ids"], row["labels"]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 56x56 pixels, patch 14, merge 2: (4 x 4 patches) / 2^2 = 4 image tokens, one run between the vision markers
    start = ids.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1:start + 6] == [pad] * 4 + [tokenizer.convert_tokens_to_ids("<|vision_end|>")]
    assert ids.count(pad) == 4
    # exactly the answer and its end-of-turn marker are trained; no image token, no prompt token
    extras = json.loads(row["extras"])
    answer = next(r for r in rows if r["messages"][0]["content"][0]["path"] == extras["images"][0]["path"])
    expected = answer["messages"][1]["content"][0]["text"] + "<|im_end|>"
    assert trained_text(tokenizer, row) == expected
    first_trained = next(i for i, t in enumerate(labels) if t != -100)
    assert all(t == -100 for t in labels[:first_trained])
    assert tokenizer.decode(ids[:first_trained]).endswith("<|im_start|>assistant\n")
    assert [t for t in labels[first_trained:] if t != -100] == ids[first_trained:first_trained + len(
        tokenizer(expected, add_special_tokens=False)["input_ids"])]
    # the cache keeps the rendered text and image references, no pixels
    assert set(extras) == {"text", "images"} and extras["text"].count("<|image_pad|>") == 1
    assert set(data.train.column_names) == {"input_ids", "labels", "attention_mask", "length", "extras"}


def test_llava_row_masks_image_tokens_and_prompt(llava_dir, tmp_path):
    rows = color_rows(tmp_path / "img", 2)
    data, tokenizer, _, _ = prepare(vision_keys(llava_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path))
    image = tokenizer.convert_tokens_to_ids("<image>")
    for row in data.train:
        ids, labels = row["input_ids"], row["labels"]
        assert ids.count(image) == 4  # 28x28 pixels in 14x14 patches, CLS dropped
        assert all(label == -100 for t, label in zip(ids, labels) if t == image)
        assert trained_text(tokenizer, row).strip() in {f"it is {c}" for c in ("red", "green")}
        assert tokenizer.decode(ids[:next(i for i, t in enumerate(labels) if t != -100)]).endswith("ASSISTANT:")


def test_mistral3_row_masks_image_rows_and_prompt_exactly(mistral3_dir, tmp_path):
    """Pixtral's processor writes an image as rows of [IMG] ended by [IMG_BREAK],
    the last by [IMG_END]; every one of them and the prompt are masked."""
    import torch
    from plait.data.batching import materialize

    wide = make_image(tmp_path / "img" / "wide.png", size=(84, 40))
    rows = color_rows(tmp_path / "img", 1) + [{"messages": [
        {"role": "user", "content": [{"type": "image", "path": str(wide)}, {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "wide"}]}]
    keys = vision_keys(mistral3_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, shuffle_merged_datasets=False)
    data, tokenizer, cfg, pm = prepare(keys)
    img, brk, end, inst, close = tokenizer.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]",
                                                                  "[/INST]"])

    def encoded(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # 56x56 pixels: 4 x 4 patches of 14, merged 2 x 2: two rows of two; 84x40 is scaled to 56x26, padded
    # up to whole merged patches (28): 56x28, one row of two
    expected_images = ([img, img, brk, img, img, end], [img, img, end])
    for row, image, question, answer in zip(data.train, expected_images, ("what colour is it?", "and this?"),
                                            ("it is red", "wide")):
        prompt = [tokenizer.bos_token_id, inst, *image, *encoded(question), close]
        target = encoded(answer) + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + target
        assert row["labels"] == [-100] * len(prompt) + target

    # the two images differ in size: the batch's pixels are zero-padded to the larger, image_sizes keeps each
    # one's own, and the model gives each row the logits it gives that row alone
    batch = pm.hook.collate(cfg=cfg, rows=[materialize(data.train, [0]), materialize(data.train, [1])],
                            tokenizer=tokenizer)
    assert tuple(batch["pixel_values"].shape) == (2, 3, 56, 56)
    assert batch["image_sizes"].tolist() == [[56, 56], [28, 56]]
    model = pm.hook.load_model(cfg=cfg, tokenizer=tokenizer).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    alone = pm.hook.collate(cfg=cfg, rows=[materialize(data.train, [1])], tokenizer=tokenizer)
    with torch.no_grad():
        together = model(**inputs, use_cache=False).logits[1, :data.train[1]["length"]]
        single = model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits[0]
    torch.testing.assert_close(together, single, rtol=1e-4, atol=1e-5)


def test_image_size_decides_the_number_of_image_tokens(qwen2_vl_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", color_rows(tmp_path / "img", 1))
    pad_counts = []
    for size, algorithm in ((None, None), ([112, 56], "bicubic"), (112, "lanczos")):
        keys = vision_keys(qwen2_vl_dir, path, tmp_path / str(size), image_size=size, image_resize_algorithm=algorithm)
        data, tokenizer, _, _ = prepare(keys)
        pad_counts.append(data.train[0]["input_ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    # 56x56: 4 x 4 patches / 2^2; [112, 56] (width, height): 4 x 8 / 4; 112: padded to a 112 square, 8 x 8 / 4
    assert pad_counts == [4, 8, 16]


def test_base64_image_and_images_column_match_a_path(qwen2_vl_dir, tmp_path):
    image = make_image(tmp_path / "a.png")
    question = {"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "hi"}]}
    answer = {"role": "assistant", "content": "it is red"}
    encoded = base64.b64encode(image.read_bytes()).decode()
    rows = [
        {"messages": [question, answer]},
        {"messages": [{**question, "content": [{"type": "image", "base64": encoded}, {"type": "text", "text": "hi"}]},
                      answer]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}, answer],
         "images": ["a.png"]},  # relative to the data file's folder
    ]
    keys = vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, shuffle_merged_datasets=False)
    data, _, _, _ = prepare(keys)
    assert len(data.train) == 3
    assert data.train[0]["input_ids"] == data.train[1]["input_ids"] == data.train[2]["input_ids"]
    assert json.loads(data.train[2]["extras"])["images"] == [{"path": str(image)}]


def test_missing_image_is_a_bad_row_naming_file_and_row(qwen2_vl_dir, tmp_path):
    rows = color_rows(tmp_path / "img", 3)
    rows[1]["messages"][0]["content"][0]["path"] = str(tmp_path / "img" / "gone.png")
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as caught:
        prepare(vision_keys(qwen2_vl_dir, path, tmp_path))
    message = str(caught.value)
    assert "gone.png does not exist" in message and str(path) in message and "row 2:" in message
    # skip_bad_rows drops it and counts it
    data, _, _, _ = prepare(vision_keys(qwen2_vl_dir, path, tmp_path / "skip", skip_bad_rows=True))
    assert len(data.train) == 2 and data.stats[0].dropped_bad == 1


def test_unreadable_image_is_a_bad_row(qwen2_vl_dir, tmp_path):
    rows = color_rows(tmp_path / "img", 2)
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image")
    rows[0]["messages"][0]["content"][0]["path"] = str(broken)
    with pytest.raises(DataError, match=r"broken.png cannot be read"):
        prepare(vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path))


def test_packing_and_text_formats_are_refused(qwen2_vl_dir, tmp_path):
    keys = vision_keys(qwen2_vl_dir, tmp_path / "d.jsonl", tmp_path)
    with pytest.raises(ConfigError, match=r"sample_packing.*not supported with processor_type.*set sample_packing: false"):
        build_run_config({**keys, "sample_packing": True})
    with pytest.raises(ConfigError, match=r"'datasets.0.type': 'alpaca' is not supported with processor_type"):
        build_run_config({**keys, "datasets": [{"path": "d.jsonl", "type": "alpaca"}]})


def test_collate_makes_pixels_beside_the_prepared_ids(qwen2_vl_dir, tmp_path):
    from plait.data.batching import materialize

    rows = color_rows(tmp_path / "img", 2)
    data, tokenizer, cfg, pm = prepare(vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path))
    batch = pm.hook.collate(cfg=cfg, rows=[materialize(data.train, [0]), materialize(data.train, [1])],
                            tokenizer=tokenizer)
    assert batch["input_ids"].tolist()[0][:data.train[0]["length"]] == data.train[0]["input_ids"]
    # two 56x56 images: 4 x 4 patches each of 3 x 2 x 14 x 14 values; grid (t, h, w) per image
    assert tuple(batch["pixel_values"].shape) == (32, 1176)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


def test_inspect_shows_where_image_tokens_sit_and_that_they_are_masked(qwen2_vl_dir, tmp_path):
    from plait.testing import run_cli, write_config

    rows = color_rows(tmp_path / "img", 1)
    config = write_config(tmp_path / "c.yml", **vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows),
                                                             tmp_path))
    result = run_cli(["inspect", str(config), "--rows", "1", "--color", "never"])
    assert result.exit_code == 0, result.stderr
    assert "[[<|im_start|>system" in result.stdout
    assert "<|vision_start|><|image_pad|>\u00d74<|vision_end|>what colour is it?" in result.stdout
    assert "]]it is red<|im_end|>[[" in result.stdout
    line = next(line for line in result.stdout.splitlines() if "at positions" in line)
    start = int(line.split("at positions ")[1].split("-")[0])
    assert line.strip() == f"<|image_pad|> \u00d74 at positions {start}-{start + 3}: masked"
    assert f"images: {tmp_path / 'img' / '0_red.png'}" in result.stdout


def test_hook_encode_prompt(qwen2_vl_dir, tmp_path):
    from plait.errors import ConfigError as Refused

    image = make_image(tmp_path / "a.png", size=(112, 112))
    cfg, pm = build_run_config(vision_keys(qwen2_vl_dir, tmp_path / "d.jsonl", tmp_path))
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": "colour?"}]}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = pm.hook.encode_prompt(cfg=cfg, tokenizer=tokenizer, text=text, images=[str(image)])
    assert inputs["input_ids"][0].tolist().count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 16
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    with pytest.raises(Refused, match=r"--image: image file .*gone.png does not exist"):
        pm.hook.encode_prompt(cfg=cfg, tokenizer=tokenizer, text=text, images=[str(tmp_path / "gone.png")])
    # a text-only run: no plugin answers, and inference refuses --image
    plain, pm = build_run_config({**vision_keys(qwen2_vl_dir, tmp_path / "d.jsonl", tmp_path),
                                  "processor_type": None, "chat_template": "chatml"})
    assert pm.hook.encode_prompt(cfg=plain, tokenizer=tokenizer, text=text, images=[str(image)]) is None


def test_two_images_and_no_image_in_one_batch_with_train_on_inputs(qwen2_vl_dir, tmp_path):
    from plait.data.batching import materialize

    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png", size=(112, 56))
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": str(a)}, {"type": "text", "text": "and"},
                                                   {"type": "image", "path": str(b)}]},
                      {"role": "assistant", "content": "two"}]},
        {"messages": [{"role": "user", "content": "no picture"}, {"role": "assistant", "content": "fine"}]},
    ]
    keys = vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, train_on_inputs=True,
                       shuffle_merged_datasets=False)
    data, tokenizer, cfg, pm = prepare(keys)
    vision = {tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
    first = data.train[0]
    assert first["input_ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4 + 8  # 56x56, 112x56
    # train_on_inputs trains the prompt text too, but never an image token
    assert all((label == -100) == (token in vision) for token, label in zip(first["input_ids"], first["labels"]))
    batch = pm.hook.collate(cfg=cfg, rows=[materialize(data.train, [0]), materialize(data.train, [1])],
                            tokenizer=tokenizer)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert batch["pixel_values"].shape[0] == 16 + 32
    assert batch["attention_mask"][1].sum() == data.train[1]["length"]


def test_lora_names_stay_in_the_language_model_and_a_regex_reaches_the_projector(llava_dir, tmp_path):
    keys = vision_keys(llava_dir, tmp_path / "d.jsonl", tmp_path, lora_target_linear=False)

    def adapted(**extra):
        cfg, pm = build_run_config({**keys, **extra})
        tokenizer = pm.hook.load_tokenizer(cfg=cfg)
        model = pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=tokenizer))
        return sorted({name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name})

    # CLIP's attention has a q_proj too: a list of names adapts the language model's only
    by_name = adapted(lora_target_modules=["q_proj"])
    assert by_name == [f"base_model.model.model.language_model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    by_regex = adapted(lora_target_modules=r"model.language_model.layers.0.self_attn.q_proj|"
                                           r"model.multi_modal_projector.linear_1")
    assert by_regex == ["base_model.model.model.language_model.layers.0.self_attn.q_proj",
                        "base_model.model.model.multi_modal_projector.linear_1"]
    with pytest.raises(ConfigError, match=r"\['fc1'\] name no module of the language model"):
        adapted(lora_target_modules=["fc1"])


@pytest.mark.parametrize("model_fixture", ["qwen2_vl_dir", "llava_dir", "mistral3_dir"])
def test_loop_forward_gives_the_models_own_logits_with_images(model_fixture, tmp_path, request):
    """The loop's forward (final hidden states of the language model, then the
    head) must see the images: it matches the model's own full logits, which
    differ when the pixels change."""
    import torch
    from plait.data.batching import materialize
    from plait.model.forward import forward_hidden

    model_dir = request.getfixturevalue(model_fixture)
    rows = color_rows(tmp_path / "img", 2)
    data, tokenizer, cfg, pm = prepare(vision_keys(model_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path))
    batch = pm.hook.collate(cfg=cfg, rows=[materialize(data.train, [0]), materialize(data.train, [1])],
                            tokenizer=tokenizer)
    model = pm.hook.load_model(cfg=cfg, tokenizer=tokenizer).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        hidden, head, _ = forward_hidden(model, inputs)
        reference = model(**inputs, use_cache=False).logits
        # mirrored pixels, not scaled ones: Pixtral's bias-free patch convolution and RMSNorm cancel a scale
        mirrored = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}, use_cache=False).logits
    torch.testing.assert_close(head(hidden), reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mirrored, reference, atol=1e-4)


def test_image_references_paths_base64_and_urls(tmp_path):
    from plait_vision.images import ImageError, open_image, reference

    image = make_image(tmp_path / "sub" / "a.jpg")
    jpeg = base64.b64encode(image.read_bytes()).decode()
    assert jpeg.startswith("/9j/")  # base64 JPEG looks like a path at first
    assert reference(jpeg, None) == {"base64": jpeg}
    assert reference("a.jpg", str(tmp_path / "sub")) == {"path": str(image)}
    assert reference(f"data:image/jpeg;base64,{jpeg}", None) == {"base64": jpeg}
    assert open_image({"base64": jpeg}).size == open_image({"path": str(image)}).size == (56, 56)
    with pytest.raises(ImageError, match="is a URL; Plait does not download images"):
        reference("https://example.com/a.png", None)


def test_rows_tokenized_as_one_batch_keep_their_own_offsets(qwen2_vl_dir, tmp_path):
    # the batch's texts are tokenized in one call (plait-formats' encode_with_offsets): every row of
    # different length must get its own answer trained, never a neighbour's offsets
    image = make_image(tmp_path / "a.png")
    answers = ["yes", "a longer answer of several words here", "no image this time", "red"]
    rows = []
    for number, answer in enumerate(answers):
        user = ([{"type": "image", "path": str(image)}] if number != 2 else []) + \
            [{"type": "text", "text": "question " * (number + 1)}]
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    keys = vision_keys(qwen2_vl_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, shuffle_merged_datasets=False)
    data, tokenizer, _, _ = prepare(keys)
    assert [trained_text(tokenizer, data.train[i]) for i in range(len(answers))] == \
        [answer + "<|im_end|>" for answer in answers]


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("torchvision") is not None,
                    reason="checks the environment without torchvision")
def test_without_torchvision_the_pil_image_processor_is_loaded_or_the_package_named(qwen2_vl_dir, tmp_path):
    import shutil

    from plait_vision.processor import image_processor_for

    # the checkpoint names the torchvision class; its PIL twin is loaded without AutoImageProcessor
    assert json.loads((qwen2_vl_dir / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "Qwen2VLImageProcessor"
    assert type(image_processor_for(str(qwen2_vl_dir))).__name__ == "Qwen2VLImageProcessorPil"
    # an image processor that exists only for torchvision: a ConfigError naming the package
    model = shutil.copytree(qwen2_vl_dir, tmp_path / "m")
    settings = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps({**settings, "image_processor_type":
                                                                "Llama4ImageProcessor"}))
    with pytest.raises(ConfigError, match=r"Llama4ImageProcessor.*pip install torchvision"):
        image_processor_for(str(model))
