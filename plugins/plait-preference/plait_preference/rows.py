"""Tokenize preference rows into Plait rows whose segments are the sequences.

A pair becomes one row of two segments, chosen then rejected, each the prompt
followed by its response; the prompt's ids are the same in both and masked::

    input_ids   p0 p1 p2 c0 c1 c2 | p0 p1 p2 r0 r1
    labels      -- -- -- c0 c1 c2 | -- -- -- r0 r1
    extras      {"seq_lens": [6, 5], "segment_names": ["chosen", "rejected"]}

``seq_lens`` in the row's extras makes core collate it like a packed bin (positions restart,
the rejected sequence cannot attend to the chosen one), so both go through
one forward and pairs can be packed together. A KTO row holds its completion
and a KL segment (the same prompt with another row's completion, rotated
within groups of ``micro_batch_size`` rows as TRL does).

Token ids follow TRL: the prompt is tokenized alone, each response as
``prompt + response`` (the tokenizer's EOS appended when the text does not end
with it) and cut where it parts from the prompt's ids, so merges across the
boundary come out as at inference.
"""

from __future__ import annotations

from plait.errors import BadRowError

IGNORE = -100
#: segment names stored with the rows (``plait inspect`` shows them); their index is
#: the role number the collator hands the objective
SEGMENT_NAMES = ("chosen", "rejected", "desirable", "kl", "undesirable")
CHOSEN, REJECTED, DESIRABLE, KL, UNDESIRABLE = range(len(SEGMENT_NAMES))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_responses(tokenizer, prompt: str, responses: list[str], index: int):
    """``(prompt_ids, [response_ids, ...])``, the prompt shared by all responses."""
    eos = tokenizer.eos_token or ""
    prompt_ids = tokenizer(prompt)["input_ids"]
    joined = [tokenizer(prompt + (text if text.endswith(eos) else text + eos))["input_ids"] for text in responses]
    shared = min(_common_prefix(prompt_ids, ids) for ids in joined)
    completions = [ids[shared:] for ids in joined]
    if any(len(ids) == 0 for ids in completions):
        raise BadRowError(index, "a response is empty after tokenization")
    return prompt_ids[:shared], completions


def segments_row(prompt_ids: list[int], completions: list[list[int]], roles: list[int]) -> dict:
    """One row of ``prompt + completion`` segments, prompt masked; ``roles`` name them."""
    input_ids, labels, seq_lens = [], [], []
    for ids in completions:
        input_ids += prompt_ids + ids
        labels += [IGNORE] * len(prompt_ids) + ids
        seq_lens.append(len(prompt_ids) + len(ids))
    return {"input_ids": input_ids, "labels": labels,
            "extras": {"seq_lens": seq_lens, "segment_names": [SEGMENT_NAMES[role] for role in roles]}}


def tokenize_pairs(entry, tokenizer, batch: dict) -> dict:
    from plait_preference.formats import row_texts

    out = {"input_ids": [], "labels": [], "extras": []}
    for index, row in enumerate(_rows(batch)):
        prompt, responses = row_texts(entry, row, index, tokenizer, kto=False)
        prompt_ids, completions = tokenize_responses(tokenizer, prompt, responses, index)
        for key, value in segments_row(prompt_ids, completions, [CHOSEN, REJECTED]).items():
            out[key].append(value)
    return out


def tokenize_kto(entry, tokenizer, batch: dict, group: int) -> dict:
    """KTO rows: the completion, then the KL segment (prompt with the previous
    row's completion in its group of ``group`` rows, the first row taking the
    group's last), as TRL builds its mismatched pairs."""
    from plait_preference.formats import row_texts

    prompts, completions, desirable = [], [], []
    for index, row in enumerate(_rows(batch)):
        prompt, responses = row_texts(entry, row, index, tokenizer, kto=True)
        label = row.get(getattr(entry, "field_label", None) or "label")
        if not isinstance(label, bool) and label not in (0, 1):
            raise BadRowError(index, f"KTO rows need a boolean 'label' (desirable or not), found {label!r}")
        prompt_ids, (completion,) = tokenize_responses(tokenizer, prompt, responses, index)
        prompts.append(prompt_ids)
        completions.append(completion)
        desirable.append(bool(label))
    out = {"input_ids": [], "labels": [], "extras": []}
    for start in range(0, len(prompts), group):
        members = list(range(start, min(start + group, len(prompts))))
        for position, i in enumerate(members):
            other = completions[members[position - 1]]  # position 0 wraps to the group's last
            roles = [DESIRABLE if desirable[i] else UNDESIRABLE, KL]
            for key, value in segments_row(prompts[i], [completions[i], other], roles).items():
                out[key].append(value)
    return out


def _rows(batch: dict):
    names = list(batch)
    for values in zip(*(batch[name] for name in names)):
        yield dict(zip(names, values))
