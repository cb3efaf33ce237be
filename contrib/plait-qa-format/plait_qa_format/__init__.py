"""The ``qa`` dataset format, written the way a third party would.

Rows look like ``{"question": ..., "answer": ...}``. The prompt
``"Question: {question}\\nAnswer: "`` is masked; the answer and the EOS token
are trained. Field names can be remapped with ``field_instruction`` (question)
and ``field_output`` (answer).
"""

from plait import hookimpl
from plait.errors import BadRowError

PROMPT = "Question: {question}\nAnswer: "


@hookimpl
def dataset_types():
    return ["qa"]


@hookimpl
def tokenize(cfg, dataset_cfg, tokenizer, batch):
    if dataset_cfg.type != "qa":
        return None
    question_key = dataset_cfg.field_instruction or "question"
    answer_key = dataset_cfg.field_output or "answer"
    for key in (question_key, answer_key):
        if key not in batch:
            raise BadRowError(0, f"the qa format needs a {key!r} field; the rows have {sorted(batch)}")
    out = {"input_ids": [], "labels": []}
    for index, (question, answer) in enumerate(zip(batch[question_key], batch[answer_key])):
        if not question or not answer:
            raise BadRowError(index, f"empty {question_key!r} or {answer_key!r}")
        prompt_ids = tokenizer(PROMPT.format(question=question), add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out["input_ids"].append(prompt_ids + answer_ids)
        masked = prompt_ids if cfg.train_on_inputs else [-100] * len(prompt_ids)
        out["labels"].append(masked + answer_ids)
    return out
