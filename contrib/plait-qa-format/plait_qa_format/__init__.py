"""The ``qa`` dataset format, written the way a third party would.

Rows look like ``{"question": ..., "answer": ...}``. The prompt
``"Question: {question}\\nAnswer: "`` is masked; the answer and the EOS token
are trained. The format declares its own dataset keys (:class:`QaEntry`):
``field_question`` and ``field_answer`` rename the columns, and
``train_on_inputs`` (core's per-dataset key) trains the prompt too.
"""

from typing import Optional

from pydantic import Field

from plait import hookimpl
from plait.errors import BadRowError
from plait.registries import DatasetEntry, DatasetFormat

PROMPT = "Question: {question}\nAnswer: "


class QaEntry(DatasetEntry):
    """A ``type: qa`` entry of ``datasets:``: core's source keys plus these."""

    field_question: Optional[str] = Field(None, description="Column holding the question (default: question).")
    field_answer: Optional[str] = Field(None, description="Column holding the answer (default: answer).")


def tokenize(cfg, dataset_cfg, tokenizer, batch):
    question_key = dataset_cfg.field_question or "question"
    answer_key = dataset_cfg.field_answer or "answer"
    train_prompt = cfg.train_on_inputs if dataset_cfg.train_on_inputs is None else dataset_cfg.train_on_inputs
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
        masked = prompt_ids if train_prompt else [-100] * len(prompt_ids)
        out["labels"].append(masked + answer_ids)
    return out


@hookimpl
def dataset_formats():
    return [DatasetFormat("qa", tokenize, QaEntry, description="question masked, answer + EOS trained")]
