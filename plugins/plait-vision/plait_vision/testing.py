"""Tiny vision-language models and image data, for tests without a hub.

Each builder saves a random-init model, its tokenizer (plait.testing's tiny
BPE plus the model's image tokens) and a processor with small image sizes in
one directory, so ``base_model: <dir>`` with ``processor_type:
AutoProcessor`` loads the way a real checkpoint does.
"""

from __future__ import annotations

from pathlib import Path

from plait_vision.templates import LLAVA, QWEN2_VL

#: a tiny decoder, shared by the builders
TEXT_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)


def _tokenizer(path: Path, image_tokens: list[str]):
    from plait.testing import make_tiny_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_tokenizer(path / "_tokenizer", chat_template=None))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *image_tokens]},
                                 replace_extra_special_tokens=False)
    return tokenizer


def make_tiny_qwen2_vl(path, *, seed: int = 0) -> Path:
    """A Qwen2-VL: images of 56x56 pixels become 4 tokens (min 4, max 16 per image)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLImageProcessorPil


    path = Path(path)
    tokenizer = _tokenizer(path, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                            "<|video_pad|>")}
    config = AutoConfig.for_model(
        "qwen2_vl",
        text_config=dict(vocab_size=len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TEXT_SHAPE),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    _save_processor(path, "Qwen2VLProcessor", image_processor, tokenizer, QWEN2_VL, {})
    return path


def make_tiny_llava(path, *, seed: int = 0) -> Path:
    """A LLaVA-1.5-style model (CLIP vision tower, MLP projector, Llama decoder):
    images resized to 28x28 pixels become 4 tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, CLIPImageProcessorPil

    path = Path(path)
    tokenizer = _tokenizer(path, ["<image>"])
    config = AutoConfig.for_model(
        "llava",
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_SHAPE),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    _save_processor(path, "LlavaProcessor", image_processor, tokenizer, LLAVA,
                    dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1))
    return path


#: a Gemma-3-style template: turns with <start_of_image> per image (the processor expands it)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def make_tiny_gemma3(path, *, seed: int = 0) -> Path:
    """A Gemma 3 (SigLIP tower, pooled projector, Gemma 3 decoder): images
    resized to 28x28 pixels become <start_of_image>, 4 soft tokens, <end_of_image>."""
    import json
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Gemma3ImageProcessorPil

    path = Path(path)
    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _tokenizer(path, [*image_tokens.values(), "<start_of_turn>", "<end_of_turn>"])
    # Gemma's processor reads the image tokens as named tokenizer attributes (boi_token, ...):
    # transformers sets those from tokenizer_config.json's extra_special_tokens mapping
    tokenizer.save_pretrained(path / "_named")
    settings = json.loads((path / "_named" / "tokenizer_config.json").read_text())
    settings["extra_special_tokens"] = image_tokens
    (path / "_named" / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(path / "_named")
    shutil.rmtree(path / "_named")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in image_tokens.items()}
    text = {**TEXT_SHAPE, "head_dim": 16, "sliding_window": 64}
    config = AutoConfig.for_model(
        "gemma3",
        text_config=dict(model_type="gemma3_text", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"], tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    _save_processor(path, "Gemma3Processor", Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tokenizer,
                    GEMMA3_TEMPLATE, {"image_seq_length": 4})
    return path


#: a Mistral-3-style template: [INST] turns with [IMG] per image (the processor expands it)
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '[IMG]' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[/INST]' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def make_tiny_mistral3(path, *, seed: int = 0) -> Path:
    """A Mistral 3 (Pixtral vision tower, patch merger and projector, Mistral
    decoder): an image of 56x56 pixels is 4 x 4 patches of 14, merged 2 x 2
    into 2 rows of 2 features, which the processor writes as
    ``[IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]``; larger images are scaled to
    fit 56 pixels on their longest edge."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, PixtralImageProcessorPil

    path = Path(path)
    tokenizer = _tokenizer(path, ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"])
    config = AutoConfig.for_model(
        "mistral3",
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), head_dim=16, sliding_window=None,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TEXT_SHAPE),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=16, image_size=56, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    # the processor passes patch_size x spatial_merge_size (28) to the image processor: sizes are multiples of 28
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size={"height": 14, "width": 14})
    _save_processor(path, "PixtralProcessor", image_processor, tokenizer, MISTRAL3_TEMPLATE,
                    dict(patch_size=14, spatial_merge_size=2, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                         image_end_token="[IMG_END]"))
    return path


def _save_processor(path: Path, class_name: str, image_processor, tokenizer, template: str, settings: dict) -> None:
    """Save the processor's parts the way ``processor.save_pretrained`` lays
    them out (building the processor object itself may need torchvision, for
    a video processor that these tests never use)."""
    import json
    import shutil

    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(template)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": class_name, **settings}, indent=1))
    shutil.rmtree(path / "_tokenizer")


def make_image(path, size=(56, 56), color=(200, 30, 30)) -> Path:
    """An RGB PNG of one colour with a lighter square in a corner."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle([0, 0, size[0] // 3, size[1] // 3], fill=tuple(min(255, c + 50) for c in color))
    image.save(path)
    return path


#: colour names the generated rows ask about
COLORS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 30)}


def color_rows(folder, n: int = 8, size=(56, 56)) -> list[dict]:
    """``n`` chat rows, each with an image of one colour (files under ``folder``)
    and the answer naming the colour."""
    folder = Path(folder)
    names = list(COLORS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        image = make_image(folder / f"{i}_{name}.png", size, COLORS[name])
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": str(image)},
                                         {"type": "text", "text": "what colour is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"it is {name}"}]},
        ]})
    return rows


def vision_keys(model_dir, data_path, tmp_path, **keys) -> dict:
    """A LoRA config (a dict of keys) for a tiny vision-language model and one chat dataset."""
    template = "llava" if "llava" in str(model_dir) else "qwen2_vl" if "qwen" in str(model_dir) else "tokenizer_default"
    return {"base_model": str(model_dir), "processor_type": "AutoProcessor", "chat_template": template,
            "datasets": [{"path": str(data_path), "type": "chat_template"}], "sequence_len": 256,
            "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
            "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
            "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prepared"), **keys}
