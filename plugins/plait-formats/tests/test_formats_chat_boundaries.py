"""chat_template with one render per row: a conversation shape's skeleton gives
the same message ends, masks and errors as rendering every prefix."""

import pytest

from plait.errors import BadRowError
from plait_formats import chat_boundaries
from plait_formats.chat_boundaries import SENTINEL, Skeleton

SHAPES = [
    ["system", "user", "assistant", "user", "assistant"],
    ["user", "assistant"],
    ["user", "assistant", "user", "assistant", "user", "assistant"],
    ["system", "user", "assistant"],
]

#: contents a template may treat differently: as they are, padded with whitespace (Llama 3 trims), a
#: reasoning block inline (Qwen 3 splits it off), a tool result (Qwen 3 does not count it as a query)
CONTENTS = [
    lambda role, k: f"{role} says {k} words",
    lambda role, k: f"  {role} says {k}\n\n" if role != "system" else f"be brief {k} ",
    lambda role, k: f"<think>step {k}</think>\n\nthe answer is {k}" if role == "assistant" else f"ask {k}",
    lambda role, k: f"<tool_response>\n{k}\n</tool_response>" if role == "user" else f"done {k}",
]


@pytest.fixture(autouse=True)
def fresh_skeletons(monkeypatch):
    """Each test starts with no skeletons (they are kept per process)."""
    monkeypatch.setattr(chat_boundaries, "_CACHES", {})


def conversations():
    """Every shape with every kind of content, twice: the second pass meets built skeletons."""
    rows = [[{"role": role, "content": make(role, k)} for k, role in enumerate(shape)]
            for make in CONTENTS for shape in SHAPES]
    return rows + rows


def chat_format(tokenizer, **entry):
    from plait.testing import build_run_config
    from plait_formats.chat import ChatFormat

    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "x", "type": "chat_template", **entry}]})
    return ChatFormat(cfg, cfg.datasets[0], tokenizer), pm


def outcome(call):
    """What ``call()`` returns, or the error it raises, so errors compare too."""
    try:
        return call()
    except BadRowError as exc:
        return f"BadRowError: {exc}"


def test_skeleton_reads_contents_as_they_are_or_trimmed():
    text = f"<s>U: {SENTINEL.format(0)}\nA: {SENTINEL.format(1)}</s>\n"
    ends = [text.index("\nA:") + 1, len(text)]
    skeleton = Skeleton.from_rendering(text, ends, 2)
    assert skeleton.literals == ("<s>U: ", "\nA: ", "</s>\n")
    assert skeleton.ends_in("<s>U: hi\nA: yo</s>\n", ["hi", "yo"]) == [9, 19]
    # a template that trims every content, and one that trims the answer only
    assert skeleton.ends_in("<s>U: hi\nA: yo</s>\n", [" hi ", "yo\n"]) == [9, 19]
    assert skeleton.ends_in("<s>U:  hi \nA: yo</s>\n", [" hi ", "yo\n"]) == [11, 21]
    # text that is not the literals with the contents between them: no ends, the caller renders prefixes
    assert skeleton.ends_in("<s>U: hi\nA: yo!</s>\n", ["hi", "yo"]) is None
    assert skeleton.ends_in("<s>U: hi\nA: yo</s>\n", ["hi", "no"]) is None
    # a sentinel the template dropped or copied cannot give a skeleton
    assert Skeleton.from_rendering(text.replace(SENTINEL.format(1), ""), ends, 2) is None
    assert Skeleton.from_rendering(text + SENTINEL.format(0), ends, 2) is None


def test_every_named_template_gives_the_exact_ends(llama3_tokenizer):
    """For each named chat template (core's and the plugins'), on conversations
    of repeated shapes with contents a template may branch on, the ends from
    one render equal the ends from rendering every prefix -- or both refuse
    the row with the same error."""
    from plait.chat_templates import named_chat_templates

    _, pm = chat_format(llama3_tokenizer)
    skeleton_templates = set()
    for name in sorted(named_chat_templates(pm)):
        fmt, _ = chat_format(llama3_tokenizer, chat_template=name)
        for index, raw in enumerate(conversations()):
            messages = fmt.normalise(index, raw)
            plain = fmt.template_messages(messages)
            rendered = outcome(lambda: fmt.render_with_ends(index, messages, None))
            exact = outcome(lambda: (lambda full: (full, fmt.prefix_ends(index, messages, None, plain, full), {}))(
                fmt.render(messages, None, index=index, last_index=len(messages) - 1, plain=plain)))
            assert rendered == exact, (name, raw)
        if any(isinstance(state, Skeleton) for state in fmt.boundaries.shapes.values()):
            skeleton_templates.add(name)
    # the one-render path is taken where templates allow it, not refused everywhere
    assert {"chatml", "llama3", "qwen3", "qwen_25", "gemma", "phi_3", "mistral_v1"} <= skeleton_templates


def test_one_render_per_row_once_a_shape_repeats(tokenizer, run_format, monkeypatch):
    from plait_formats.chat import ChatFormat

    rows = [[{"role": "user", "content": f"add {k} and 4"}, {"role": "assistant", "content": f"it is {k + 4}"},
             {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome"}]
            for k in range(12)]
    run_format(tokenizer, {"messages": rows[:2]}, type="chat_template")  # the shape seen twice: skeleton built
    renders = []
    original = ChatFormat.render
    monkeypatch.setattr(ChatFormat, "render", lambda self, *a, **k: renders.append(1) or original(self, *a, **k))
    fast = run_format(tokenizer, {"messages": rows[2:]}, type="chat_template")
    assert len(renders) == 10

    # and the masks are the ones rendering every prefix gives
    monkeypatch.setattr(chat_boundaries, "shape_of", lambda messages, tools: None)
    monkeypatch.setattr("plait_formats.chat.shape_of", lambda messages, tools: None)
    renders.clear()
    exact = run_format(tokenizer, {"messages": rows[2:]}, type="chat_template")
    assert len(renders) == 40
    assert fast == exact
