"""chat_template: masks follow where each message's tokens lie, for several templates."""

import pytest

from plait.errors import BadRowError

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "sort the words"},
    {"role": "assistant", "content": "the words are sorted."},
    {"role": "user", "content": "add 3 and 4"},
    {"role": "assistant", "content": "the sum is 7"},
]

# a template whose assistant turns end with the EOS token (train_on_eos applies)
EOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                "{% else %}Bot: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")


def chatml_pieces(eot_user=False, eot_assistant=True, train_first=True, train_user=False):
    return [
        ("<|begin_of_text|><|im_start|>system\nbe brief", False),
        ("<|im_end|>", eot_user),
        ("\n<|im_start|>user\n", False),
        ("sort the words", train_user),
        ("<|im_end|>", eot_user or (train_user and eot_assistant)),
        ("\n<|im_start|>assistant\n", False),
        ("the words are sorted.", train_first),
        ("<|im_end|>", eot_assistant and train_first),
        ("\n<|im_start|>user\n", False),
        ("add 3 and 4", train_user),
        ("<|im_end|>", eot_user or (train_user and eot_assistant)),
        ("\n<|im_start|>assistant\n", False),
        ("the sum is 7", True),
        ("<|im_end|>", eot_assistant),
        ("\n", False),
    ]


def test_chatml_multi_turn_mask(tokenizer, run_format, reference):
    out = run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template")
    ids, labels = reference(tokenizer, chatml_pieces())
    assert out["input_ids"][0] == ids
    assert out["labels"][0] == labels
    # the end-of-turn token of each assistant turn is trained, so the model learns to stop
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ends = [i for i, (t, label) in enumerate(zip(ids, labels)) if t == im_end and label == im_end]
    assert len(trained_ends) == 2


@pytest.mark.parametrize("template", ["tokenizer_default", "chatml", "llama3"])
def test_rendering_matches_apply_chat_template(llama3_tokenizer, template):
    # the format renders with the compiled template directly (fast); it must equal transformers' own rendering
    from plait.chat_templates import NAMED_CHAT_TEMPLATES
    from plait.testing import build_run_config
    from plait_formats.chat import ChatFormat

    cfg, _ = build_run_config({"base_model": "m", "datasets": [{"path": "x", "type": "chat_template",
                                                                 "chat_template": template}]})
    fmt = ChatFormat(cfg, cfg.datasets[0], llama3_tokenizer)
    assert fmt.compiled is not None
    jinja = NAMED_CHAT_TEMPLATES.get(template, llama3_tokenizer.chat_template)
    messages = [dict(m, train=False) for m in CONVERSATION]
    assert fmt.render(messages, None) == llama3_tokenizer.apply_chat_template(
        CONVERSATION, chat_template=jinja, tokenize=False)


def test_llama3_multi_turn_mask(llama3_tokenizer, run_format, reference):
    tok = llama3_tokenizer
    out = run_format(tok, {"messages": [CONVERSATION[1:]]}, type="chat_template")
    ids, labels = reference(tok, [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nsort the words<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("the words are sorted.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nadd 3 and 4<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("the sum is 7<|eot_id|>", True),
    ])
    assert out["input_ids"][0] == ids
    assert out["labels"][0] == labels
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert labels[-1] == eot


def test_named_template_on_the_dataset(tokenizer, run_format):
    # chatml without a BOS, chosen on the dataset entry instead of the tokenizer's own
    out = run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template", chat_template="chatml")
    assert out["input_ids"][0][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_sharegpt_conversations_with_role_mapping(tokenizer, run_format):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CONVERSATION]
    expected = run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template")
    out = run_format(tokenizer, {"conversations": [sharegpt]}, type="chat_template", field_messages="conversations",
                     message_property_mappings={"role": "from", "content": "value"},
                     roles={"user": ["human"], "assistant": ["gpt"]})
    assert out == expected
    # found without any mapping too
    assert run_format(tokenizer, {"conversations": [sharegpt]}, type="chat_template") == expected


def test_custom_role_names(tokenizer, run_format):
    rows = [[{"speaker": "asker", "text": "sort the words"}, {"speaker": "bot", "text": "sorted"}]]
    out = run_format(tokenizer, {"dialog": rows}, type="chat_template", field_messages="dialog",
                     message_property_mappings={"role": "speaker", "content": "text"},
                     roles={"user": ["asker"], "assistant": ["bot"]})
    trained = [t for t, label in zip(out["input_ids"][0], out["labels"][0]) if label != -100]
    assert tokenizer.decode(trained) == "sorted<|im_end|>"


def test_roles_to_train_includes_user(tokenizer, run_format, reference):
    out = run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template",
                     roles_to_train=["user", "assistant"])
    assert out["labels"][0] == reference(tokenizer, chatml_pieces(train_user=True))[1]


def test_training_false_masks_a_turn(tokenizer, run_format, reference):
    conversation = [dict(m) for m in CONVERSATION]
    conversation[2]["training"] = False
    out = run_format(tokenizer, {"messages": [conversation]}, type="chat_template")
    assert out["labels"][0] == reference(tokenizer, chatml_pieces(train_first=False))[1]


@pytest.mark.parametrize("mode", ["none", "all", "last", "turn"])
def test_train_on_eot_modes(tokenizer, run_format, mode):
    out = run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template", train_on_eot=mode)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = out["input_ids"][0], out["labels"][0]
    ends = [label == im_end for t, label in zip(ids, labels) if t == im_end]  # one per message
    assert ends == {"none": [False] * 5, "all": [True] * 5, "last": [False] * 4 + [True],
                    "turn": [False, False, True, False, True]}[mode]


@pytest.mark.parametrize("mode,expected", [("turn", [True, True]), ("none", [False, False]),
                                           ("last", [False, True]), ("all", [True, True])])
def test_train_on_eos_modes(tokenizer, run_format, mode, expected):
    out = run_format(tokenizer, {"messages": [CONVERSATION[1:]]}, type="chat_template",
                     chat_template_jinja=EOS_TEMPLATE, train_on_eos=mode)
    eos = tokenizer.eos_token_id
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert [label == eos for t, label in zip(ids, labels) if t == eos] == expected
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100 and t != eos])
    # "Bot: the" tokenizes as "Bot", ":", " the": the token holding the content's first
    # character is trained, space included, since the model has to produce it
    assert trained == " the words are sorted. the sum is 7"


def test_drop_system_message(tokenizer, run_format, reference):
    out = run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template", drop_system_message=True)
    ids, labels = reference(tokenizer, [("<|begin_of_text|><|im_start|>user\n", False)] + chatml_pieces()[3:])
    assert (out["input_ids"][0], out["labels"][0]) == (ids, labels)


def test_tools_and_tool_role(tokenizer, run_format):
    template = ("{{ bos_token }}{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}")
    conversation = [{"role": "user", "content": "sum 3 4"}, {"role": "assistant", "content": "call sum"},
                    {"role": "tool", "content": "7"}, {"role": "assistant", "content": "it is 7"}]
    tools = '[{"name": "sum", "description": "add numbers"}]'
    out = run_format(tokenizer, {"messages": [conversation], "tools": [tools]}, type="chat_template",
                     chat_template_jinja=template)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert '"name": "sum"' in tokenizer.decode(ids)
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained == " call sum<|im_end|> it is 7<|im_end|>"  # "assistant: call": " call" is one token


def test_unknown_role_and_empty_conversation_are_bad_rows(tokenizer, run_format):
    good = CONVERSATION[1:3]
    with pytest.raises(BadRowError, match="unknown role 'narrator'") as info:
        run_format(tokenizer, {"messages": [good, [{"role": "narrator", "content": "x"}]]}, type="chat_template")
    assert info.value.index == 1
    with pytest.raises(BadRowError, match="empty conversation") as info:
        run_format(tokenizer, {"messages": [good, good, []]}, type="chat_template")
    assert info.value.index == 2


def test_assistant_tool_calls_are_trained(tokenizer, run_format):
    # extra message keys (tool_calls) reach the template; a message made only of a tool call is trained
    # from the end of the generation prompt to its end-of-turn marker
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}call {{ c['name'] }}"
                "({{ c['arguments'] | tojson }}){% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    conversation = [{"role": "user", "content": "sum 3 4"},
                    {"role": "assistant", "content": None, "tool_calls": [{"name": "sum", "arguments": {"a": 3}}]},
                    {"role": "tool", "content": "7", "tool_calls": None},
                    {"role": "assistant", "content": "it is 7"}]
    out = run_format(tokenizer, {"messages": [conversation]}, type="chat_template", chat_template_jinja=template)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert 'call sum({"a": 3})' in tokenizer.decode(ids)
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained == 'call sum({"a": 3})<|im_end|>it is 7<|im_end|>'


def test_a_template_that_raises_is_a_bad_row_of_that_row(tokenizer, run_format):
    # e.g. a template without tool markup that refuses tool messages through raise_exception
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role here') }}"
                "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with_tool = [ok[0], {"role": "tool", "content": "42"}, ok[1]]
    with pytest.raises(BadRowError, match=r"the chat template refused this conversation \(roles: user, tool, "
                                          r"assistant\): TemplateError: no tool role here") as info:
        run_format(tokenizer, {"messages": [ok, with_tool]}, type="chat_template", chat_template_jinja=template)
    assert info.value.index == 1
    # an undefined value the template trips over is the row's fault too
    strict = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {{ m.name.upper() }}\n{% endfor %}"
    with pytest.raises(BadRowError, match="UndefinedError") as info:
        run_format(tokenizer, {"messages": [[dict(m, name="x") for m in ok], ok]}, type="chat_template",
                   chat_template_jinja=strict)
    assert info.value.index == 1


def test_a_trained_message_the_template_rewrites_is_a_bad_row(tokenizer, run_format):
    """A template that alters an assistant's text (here: upper-cases it) leaves
    nothing to align the labels with; an untrained message it drops is fine."""
    rewrites = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}"
                "{% elif m['role'] == 'user' %}user: {{ m['content'] }}{% endif %}\n{% endfor %}")
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]]
    with pytest.raises(BadRowError, match=r"does not render the content of message 2 \(assistant\) verbatim"):
        run_format(tokenizer, {"messages": rows}, type="chat_template", chat_template_jinja=rewrites)
    drops_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] }}: {{ m['content'] }}"
                    "{% endif %}\n{% endfor %}")
    with_system = [[{"role": "system", "content": "be nice"}, *rows[0]]]
    out = run_format(tokenizer, {"messages": with_system}, type="chat_template", chat_template_jinja=drops_system)
    trained = tokenizer.decode([t for t in out["labels"][0] if t != -100])
    assert "hello there" in trained and "be nice" not in tokenizer.decode(out["input_ids"][0])


def test_content_as_a_list_of_text_parts(tokenizer, run_format):
    """OpenAI / LLaMA-Factory content parts (``text`` or ``value``) tokenize like
    the joined string; an image part is a bad row naming the part type."""
    plain = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "value": "there"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "hello friend"}]}]
    assert run_format(tokenizer, {"messages": [parts]}, type="chat_template") == \
        run_format(tokenizer, {"messages": [plain]}, type="chat_template")
    image = [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}, plain[1]]
    with pytest.raises(BadRowError, match="message 0 has a content part of type 'image'; only text parts"):
        run_format(tokenizer, {"messages": [image]}, type="chat_template")


def test_eot_tokens_are_exactly_the_turn_ends(llama3_tokenizer, run_format):
    """Axolotl's eot_tokens: only the listed tokens (and the EOS) end a turn for
    train_on_eot; unset, every special token after a message does."""
    from plait.errors import ConfigError

    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def trained_ends(**run):
        out = run_format(llama3_tokenizer, {"messages": [CONVERSATION]}, type="chat_template", chat_template="llama3",
                         run=run)
        return sum(1 for t, label in zip(out["input_ids"][0], out["labels"][0]) if t == eot and label == eot)

    assert trained_ends() == 2  # one per assistant turn
    assert trained_ends(eot_tokens=["<|eot_id|>"]) == 2
    assert trained_ends(eot_tokens=["<|end_header_id|>"]) == 0  # <|eot_id|> no longer ends a turn
    with pytest.raises(ConfigError, match=r"'eot_tokens': 'two words' is \d+ tokens for this tokenizer, not one"):
        trained_ends(eot_tokens=["two words"])


def _trained_text(tokenizer, out) -> str:
    return tokenizer.decode([t for t, label in zip(out["input_ids"][0], out["labels"][0]) if label != -100])


def test_reasoning_is_trained_with_the_answer(tokenizer, run_format):
    """Qwen 3 renders reasoning_content as a <think> block before the answer;
    as in Axolotl the block is trained with the answer, whichever key holds it."""
    pytest.importorskip("plait_models")
    question = {"role": "user", "content": "add 3 and 4"}
    answer = {"role": "assistant", "content": "the sum is 7", "reasoning_content": "three plus four"}
    out = run_format(tokenizer, {"messages": [[question, answer]]}, type="chat_template", chat_template="qwen3")
    trained = _trained_text(tokenizer, out)
    assert "three plus four" in trained and "the sum is 7" in trained and "add 3" not in trained

    # the data names the key (field_thinking); the template reads its own (template_thinking_key)
    renamed = {"role": "assistant", "content": "the sum is 7", "thought": "three plus four"}
    out = run_format(tokenizer, {"messages": [[question, renamed]]}, type="chat_template", chat_template="qwen3",
                     field_thinking="thought", template_thinking_key="reasoning_content")
    assert "three plus four" in _trained_text(tokenizer, out)

    # split_thinking: the reasoning inline in the content becomes the template's reasoning
    inline = {"role": "assistant", "content": "<think>three plus four</think>the sum is 7"}
    split = run_format(tokenizer, {"messages": [[question, inline]]}, type="chat_template", chat_template="qwen3",
                       split_thinking=True)
    assert split["input_ids"] == run_format(tokenizer, {"messages": [[question, answer]]}, type="chat_template",
                                            chat_template="qwen3")["input_ids"]
    assert "three plus four" in _trained_text(tokenizer, split)


def test_per_part_train_flags(tokenizer, run_format):
    """Content parts with train flags (Axolotl's per-part training): only the
    tokens wholly inside a trained part are trained."""
    parts = [{"type": "text", "text": "Let me think.", "train": False},
             {"type": "text", "text": " The answer is 7.", "train": True}]
    conversation = [{"role": "user", "content": "add 3 and 4"}, {"role": "assistant", "content": parts}]
    trained = _trained_text(tokenizer, run_format(tokenizer, {"messages": [conversation]}, type="chat_template"))
    assert "answer is 7" in trained and "think" not in trained
    # the same with Axolotl's character ranges (end inclusive)
    text = "Let me think. The answer is 7."
    detail = [{"begin_offset": 0, "end_offset": 12, "train": False}, {"begin_offset": 13, "end_offset": 29,
                                                                      "train": True}]
    conversation[1] = {"role": "assistant", "content": text, "detail": detail}
    trained = _trained_text(tokenizer, run_format(tokenizer, {"messages": [conversation]}, type="chat_template",
                                                  message_field_training_detail="detail"))
    assert "answer is 7" in trained and "think" not in trained


def test_chat_template_kwargs_reach_the_template(tokenizer, run_format):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and "
                "style is defined %}[{{ style }}] {% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = run_format(tokenizer, {"messages": [conversation]}, type="chat_template", chat_template_jinja=template,
                     run={"chat_template_kwargs": {"style": "brief"}})
    assert "[brief] hello" in tokenizer.decode(out["input_ids"][0])


def test_spans_before_equals_a_binary_search_per_token():
    """The labels place sorted token starts among the span ends by counting;
    it must give what a binary search per token gives, sorted or not."""
    import numpy as np
    from plait_formats.chat import spans_before

    rng = np.random.default_rng(0)
    for _ in range(200):
        ends = np.sort(rng.integers(0, 60, rng.integers(1, 8)))
        for starts in (np.sort(rng.integers(0, 50, rng.integers(0, 30))), rng.integers(0, 50, 10)):
            counts, ascending = spans_before(ends, starts)
            assert np.array_equal(counts, np.searchsorted(ends, starts, side="right"))
            assert ascending == bool(np.all(np.diff(starts) >= 0))


def test_labels_from_mask_equals_masking_each_row():
    """Rows' labels are their ids where the flat mask is set: copied run by run,
    never across a row's end, empty rows included."""
    import numpy as np
    from plait_formats.chat import IGNORE, labels_from_mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(0, 12, rng.integers(1, 6)).tolist()
        flat = rng.integers(0, 50, sum(lengths))
        cuts = np.cumsum([0] + lengths)
        ids = [flat[cuts[r]:cuts[r + 1]].tolist() for r in range(len(lengths))]
        mask = rng.random(len(flat)) < rng.random()
        want = [[t if m else IGNORE for t, m in zip(row, mask[cuts[r]:cuts[r + 1]])] for r, row in enumerate(ids)]
        assert labels_from_mask(ids, mask, lengths) == want


def test_collector_paused_restores_the_collector(tokenizer):
    """The collector is off inside the block and on again after it (left off
    when it was off; what the block made goes to the oldest generation unless
    someone else froze objects), and a batch of conversations makes no reference cycles,
    which is what makes pausing it safe: nothing waits for a collection."""
    import gc

    from plait.testing import build_run_config
    from plait_formats.collector import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        made = [[n] for n in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.get_count()[0] < 100  # what the block made is not counted toward a young collection
    assert any(made is obj for obj in gc.get_objects(generation=2))
    gc.freeze()  # someone else's frozen objects (plait's training loop freezes its setup) stay frozen
    try:
        frozen = gc.get_freeze_count()
        with collector_paused():
            pass
        # an unfreeze would have emptied the permanent generation; frozen objects freed by reference
        # counting meanwhile (a full suite has such temporaries) only lower the count by a few
        assert frozen - 1000 < gc.get_freeze_count() <= frozen and gc.isenabled()
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
        cfg, pm = build_run_config({"base_model": "unused", "datasets": [{"path": "x", "type": "chat_template"}]})
        rows = {"messages": [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2] + [
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]]}
        for _ in range(3):  # the first batches also fill the caches (compiled template, shapes' skeletons)
            gc.collect()
            out = pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer, batch=rows)
        assert len(out["labels"]) == 3
        assert gc.collect() == 0  # unreachable objects the last batch left
    finally:
        gc.enable()
