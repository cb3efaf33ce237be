"""`plait inference CONFIG`: talk to the trained model.

On a terminal it is a chat (history kept, answers streamed as they are
generated; ``/reset`` clears the history, an empty line or Ctrl-D ends).
When stdin is not a terminal, every line is one prompt and each answer is
printed on its own line, so ``echo "hi" | plait inference cfg.yml`` works in
scripts. Prompts go through the tokenizer's chat template when it has one
(``--raw`` sends the text as is).
"""

from __future__ import annotations

import sys

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", metavar="DIR", help="a saved model or adapter (default: output_dir)")
    parser.add_argument("--base", action="store_true", help="use the base model, not the trained one")
    parser.add_argument("--raw", action="store_true", help="no chat template: the prompt text is the model input")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--system", help="a system message to start each conversation with")


def model_input(tokenizer, messages: list[dict], raw: bool) -> str:
    if raw or not tokenizer.chat_template:
        return messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(model, tokenizer, text: str, args, streamer=None) -> str:
    import torch

    # the template already holds the BOS when it needs one
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=args.raw or not tokenizer.chat_template)
    enc = enc.to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, use_cache=True, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run(args, pm) -> int:
    cfg, pm = load_run_config(args, pm)
    from transformers import TextStreamer

    from plait.train.trained import load_trained

    model, tokenizer, source = load_trained(cfg, pm, cfg.base_model if args.base else args.model)
    start = [{"role": "system", "content": args.system}] if args.system else []
    if not sys.stdin.isatty():
        for line in sys.stdin:
            prompt = line.rstrip("\n")
            if prompt.strip():
                messages = start + [{"role": "user", "content": prompt}]
                answer = generate(model, tokenizer, model_input(tokenizer, messages, args.raw), args)
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
        history.append({"role": "user", "content": prompt})
        answer = generate(model, tokenizer, model_input(tokenizer, history, args.raw), args, streamer=streamer)
        history.append({"role": "assistant", "content": answer})
    return 0
