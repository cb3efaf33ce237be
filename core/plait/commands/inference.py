"""`plait inference CONFIG`: talk to the trained model.

On a terminal it is a chat (history kept, answers streamed as they are
generated; ``/reset`` clears the history, an empty line or Ctrl-D ends).
When stdin is not a terminal, every line is one prompt and each answer is
printed on its own line, so ``echo "hi" | plait inference cfg.yml`` works in
scripts. Prompts take the format the model was trained with: the alpaca
prompt for an alpaca-trained model, the chat template for a chat_template
one (see :func:`model_input`); ``--raw`` sends the text as is. ``--image
PATH`` (repeatable) shows images with the first prompt of a conversation
(every prompt read from stdin); a plugin turns them into model inputs
(``encode_prompt``: plait-vision, for a run with ``processor_type``).
"""

from __future__ import annotations

import sys

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", metavar="DIR", help="a saved model or adapter (default: output_dir)")
    parser.add_argument("--base", action="store_true", help="use the base model, not the trained one")
    parser.add_argument("--raw", action="store_true", help="no prompt format or chat template: the text typed is the model input")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--system", help="a system message to start each conversation with")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image shown with the first prompt (repeat for several; vision-language runs)")


def model_input(cfg, pm, tokenizer, messages: list[dict], raw: bool, template_kwargs=None) -> tuple[str, bool]:
    """The text to generate from, and whether tokenizing it adds special tokens.

    The prompt format the model was trained with: the first dataset's format
    answers :func:`plait.hookspecs.inference_prompt` (an alpaca-trained model
    gets the alpaca prompt, with its BOS, not a chat template). Otherwise the
    tokenizer's chat template, which already holds the BOS it needs; without
    one, or with ``--raw``, the message text as it is. ``template_kwargs``
    (Axolotl's ``chat_template_kwargs``: enable_thinking, ...) reach the chat
    template as in training.
    """
    if raw:
        return _text_of(messages[-1]["content"]), True
    if cfg.datasets:
        text = pm.hook.inference_prompt(cfg=cfg, dataset_cfg=cfg.datasets[0], messages=messages)
        if text is not None:
            return text, True
    if not tokenizer.chat_template:
        return _text_of(messages[-1]["content"]), True
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(template_kwargs or {})), False


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def user_message(prompt: str, images: list[str]) -> dict:
    """A user turn; with images, content parts (one image part per image, then the text)."""
    if not images:
        return {"role": "user", "content": prompt}
    return {"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": prompt}]}


def check_images(args) -> None:
    """``--image`` files must exist, and ``--raw`` cannot place them (no template)."""
    import os

    from plait.errors import ConfigError

    for path in args.image:
        if not os.path.isfile(path):
            raise ConfigError(f"--image {path}: no such file")
    if args.image and args.raw:
        raise ConfigError("--image cannot be combined with --raw: the chat template places the images")


def prompt_ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt, without the EOS some tokenizers append (a
    trained prompt never ends with one)."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if add_special_tokens and ids and ids[-1] == tokenizer.eos_token_id != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


def encode(pm, cfg, tokenizer, prompt: tuple[str, bool], images: list[str]):
    """Model inputs for ``prompt`` (from :func:`model_input`): token ids, and
    pixels when there are images."""
    import torch

    from plait.errors import ConfigError

    text, add_special_tokens = prompt
    if images:
        enc = pm.hook.encode_prompt(cfg=cfg, tokenizer=tokenizer, text=text, images=images)
        if enc is None:
            raise ConfigError("--image: no plugin encodes images for this run; train a vision-language model with "
                              "processor_type (plait-vision) to use images")
        return enc
    input_ids = torch.tensor([prompt_ids(tokenizer, text, add_special_tokens)])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def stop_token_ids(tokenizer, eot_tokens) -> list[int] | None:
    """The EOS plus the config's ``eot_tokens``: generation stops at any of
    them (``None``: the model's own generation config decides)."""
    if not eot_tokens:
        return None
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in eot_tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def generate(model, tokenizer, enc, args, streamer=None, eot_tokens=None) -> str:
    import torch

    enc = {k: v.to(next(model.parameters()).device) if hasattr(v, "to") else v for k, v in enc.items()}
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    stop = stop_token_ids(tokenizer, eot_tokens)
    if stop:
        sampling["eos_token_id"] = stop
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, use_cache=True, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run(args, pm) -> int:
    cfg, pm = load_run_config(args, pm)
    from transformers import TextStreamer

    from plait.train.trained import load_trained

    check_images(args)
    model, tokenizer, source = load_trained(cfg, pm, cfg.base_model if args.base else args.model)
    start = [{"role": "system", "content": args.system}] if args.system else []
    if not sys.stdin.isatty():
        for line in sys.stdin:
            prompt = line.rstrip("\n")
            if prompt.strip():
                messages = start + [user_message(prompt, args.image)]
                prompt_in = model_input(cfg, pm, tokenizer, messages, args.raw, cfg.chat_template_kwargs)
                answer = generate(model, tokenizer, encode(pm, cfg, tokenizer, prompt_in, args.image), args,
                                  eot_tokens=cfg.eot_tokens)
                print(answer.strip().replace("\n", "\\n"), flush=True)
        return 0

    print(f"chatting with {source or cfg.base_model} (empty line or Ctrl-D ends, /reset clears the history)")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = list(start)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        if prompt.strip() == "/reset":
            history = list(start)
            continue
        # the images go with the conversation's first prompt (and stay in its history)
        shown = args.image if not any(m["role"] == "user" for m in history) else []
        history.append(user_message(prompt, shown))
        prompt_in = model_input(cfg, pm, tokenizer, history, args.raw, cfg.chat_template_kwargs)
        answer = generate(model, tokenizer, encode(pm, cfg, tokenizer, prompt_in, args.image), args,
                          streamer=streamer, eot_tokens=cfg.eot_tokens)
        history.append({"role": "assistant", "content": answer})
    return 0
