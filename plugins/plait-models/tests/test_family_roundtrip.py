"""Per family: a trained model survives save/reload, the default chat template
masks exactly the assistant's tokens, and a fine-tuned chat model stops at the
family's end-of-turn token.

* save/reload: one full AdamW step, ``save_pretrained``, plain
  ``AutoModelForCausalLM.from_pretrained``: identical logits (atol 1e-6, fp32).
* masking: ``type: chat_template`` with a tokenizer that has no template, so
  plait-models installs the family default; the labels ``prepare_datasets``
  writes train exactly the two assistant answers, each followed by the
  family's end-of-turn token, and mask everything else (checked per token).
* stopping: a few dozen full fine-tuning steps through ``plait train`` on one
  fixed conversation, then plain transformers ``generate`` from the saved
  output dir (eos ids from its ``generation_config``) gives exactly the answer
  followed by the family's end-of-turn token, for every family.
"""

from __future__ import annotations

import pytest
from plait_models.testing import MODEL_TYPES, build_model, fixed_batch, train_steps

from plait.families import find_family
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config, write_jsonl

IGNORE = -100

CONVERSATION = [
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": "the sum is 5."},
    {"role": "user", "content": "and the words?"},
    {"role": "assistant", "content": "reverse the letters first!"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_trained_model_saves_and_reloads_with_identical_logits(model_type, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = build_model(model_type)
    batch = fixed_batch()
    train_steps(model, list(model.parameters()), batch, steps=1, lr=1e-2)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    attn = "eager" if model_type == "gemma2" else "sdpa"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=attn).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        got = reloaded(input_ids=batch).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), float((got - expected).abs().max())


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory):
    from plait.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("plain_tok"), chat_template=None)


#: with a system message: mistral/mixtral and gemma fold it into the first user turn
WITH_SYSTEM = [{"role": "system", "content": "answer in words"}] + CONVERSATION


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_chat_template_trains_only_answers_and_end_of_turn(model_type, system, tmp_path,
                                                                   plain_tokenizer_dir):
    from plait.data.prepare import prepare_datasets

    conversation = WITH_SYSTEM if system else CONVERSATION
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    cfg, pm = build_run_config({
        "base_model": str(plain_tokenizer_dir), "model_config_type": model_type, "sequence_len": 256,
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "out")})
    family = find_family(pm, model_type)
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    assert tokenizer.chat_template == family.default_chat_template
    row = prepare_datasets(cfg, pm, tokenizer, show_progress=False).train[0]
    ids, labels = row["input_ids"], row["labels"]
    eot_id = tokenizer.convert_tokens_to_ids(family.end_of_turn_tokens[0])
    assert eot_id != tokenizer.unk_token_id

    # the row is the template's rendering of the conversation
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # trained positions form one contiguous run per answer: its text, then the end-of-turn token
    runs, current = [], []
    for position, (token, label) in enumerate(zip(ids, labels)):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, f"position {position}: label {label} is not the input token {token}"
            current.append(position)
    if current:
        runs.append(current)
    assert len(runs) == len(ANSWERS), [tokenizer.decode([ids[p] for p in r]) for r in runs]
    for run_positions, answer in zip(runs, ANSWERS):
        *content, last = (ids[p] for p in run_positions)
        assert last == eot_id, tokenizer.convert_ids_to_tokens([last])
        assert tokenizer.decode(content) == answer
        assert eot_id not in content
    # everything else masked, and the masked part holds no answer text
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert not any(answer in masked for answer in ANSWERS)
    assert "add 2 and 3" in masked and "and the words?" in masked
    assert not system or "answer in words" in masked


#: measured: at 3e-3 the tiny gemma3_text still repeats its answer after 30 steps; 1e-2 stops
LR = {"gemma2": 1e-2, "gemma3_text": 1e-2}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fine_tuned_chat_model_stops_at_end_of_turn(model_type, tmp_path, plain_tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from plait.testing import plugin_manager

    import plait_models

    from plait_models.testing import EXTRA_CONFIG

    family = find_family(plugin_manager(plait_models, entry_points=False), model_type)
    moe = family.is_moe
    model_dir = make_tiny_model(tmp_path / "base", tokenizer_path=plain_tokenizer_dir, family=model_type,
                                **EXTRA_CONFIG[model_type])
    conversation = CONVERSATION[:2]  # one question, one answer
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}] * 8)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yml", base_model=str(model_dir), sequence_len=64, bf16=False,
                       datasets=[{"path": str(data), "type": "chat_template"}], micro_batch_size=4,
                       gradient_accumulation_steps=1, max_steps=30, warmup_steps=0,
                       learning_rate=LR.get(model_type, 3e-3),
                       output_dir=str(out), **({"router_aux_loss_coef": 0} if moe else {}),
                       # gemma2's soft-capped attention has no sdpa path in transformers
                       **({"eager_attention": True} if model_type == "gemma2" else {}))
    result = run_cli(["train", str(cfg)])
    assert result.exit_code == 0, result.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(out)
    eot_id = tokenizer.convert_tokens_to_ids(family.end_of_turn_tokens[0])
    generation_config = GenerationConfig.from_pretrained(out)
    assert eot_id in generation_config.eos_token_id
    attn = "eager" if model_type == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation=attn).eval()
    # the saved tokenizer carries the installed template: render the prompt with it
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    max_new = 24
    with torch.no_grad():
        generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=max_new, eos_token_id=generation_config.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[0, input_ids.shape[1]:].tolist()
    assert len(generated) < max_new and generated[-1] == eot_id, tokenizer.decode(generated)
    assert tokenizer.decode(generated[:-1]) == conversation[1]["content"]
