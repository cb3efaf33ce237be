"""chat_template.argilla: chosen/rejected conversations (Argilla's layout) as preference pairs."""

import pytest

from plait.errors import BadRowError
from plait_preference.formats import row_texts


class Entry:
    type = "chat_template.argilla"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def conversation(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_the_turns_before_the_last_answer_are_the_prompt(tokenizer):
    bos = tokenizer.bos_token or ""
    row = {"system": "be brief", "chosen": conversation("hi", "hello", "2+2?", "4"),
           "rejected": conversation("hi", "hello", "2+2?", "5")}
    prompt, (chosen, rejected) = row_texts(Entry(), row, 0, tokenizer, kto=False)
    assert prompt == (f"{bos}<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert (chosen, rejected) == ("4<|im_end|>\n", "5<|im_end|>\n")
    # a row's prompt stands in for each user turn (Axolotl's reading of Argilla's prompt column)
    prompt, _ = row_texts(Entry(), {**row, "prompt": "say hi"}, 0, tokenizer, kto=False)
    assert prompt.count("say hi") == 2 and "2+2?" not in prompt


@pytest.mark.parametrize("row, message", [
    ({"chosen": conversation("q", "a", "q2"), "rejected": conversation("q", "b")}, "'chosen' must be a list of"),
    ({"chosen": conversation("q", "a"), "rejected": "b"}, "'rejected' must be a list of"),
])
def test_rows_that_are_not_conversations_are_named(tokenizer, row, message):
    with pytest.raises(BadRowError, match=message):
        row_texts(Entry(), row, 3, tokenizer, kto=False)


def test_a_dpo_run_trains_on_argilla_rows(train, write_rows):
    rows = [{"chosen": conversation(f"question {i}", f"good answer {i}"),
             "rejected": conversation(f"question {i}", f"bad {i}")} for i in range(8)]
    steps = train("argilla", rl="dpo", micro_batch_size=2, max_steps=2,
                  datasets=[{"path": str(write_rows(rows)), "type": "chat_template.argilla"}])
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy is its own reference at step 0
