"""The units a training step saw, as token ids and scores, for a completion
table (core's SwanLab tracker, ``swanlab_log_completions``).

A segment's positions (``segment_index``) hold its prompt (labels -100) then
its response; a pair is the i-th chosen and the i-th rejected segment of the
micro-batch, in the order the objective scores them.
"""

from __future__ import annotations

from plait_preference.rows import CHOSEN, DESIRABLE, IGNORE, REJECTED, UNDESIRABLE


def _segment_ids(batch: dict, segment: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of one segment."""
    where = batch["segment_index"] == segment
    ids, labels = batch["input_ids"][where], batch["labels"][where]
    return ids[labels == IGNORE].tolist(), ids[labels != IGNORE].tolist()


def pair_samples(batch: dict, reward_diffs) -> list[dict]:
    """One dict per pair: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
    ``reward_diff`` (the chosen reward minus the rejected one)."""
    roles = batch["segment_roles"]
    chosen = (roles == CHOSEN).nonzero().flatten().tolist()
    rejected = (roles == REJECTED).nonzero().flatten().tolist()
    samples = []
    for c, r, diff in zip(chosen, rejected, reward_diffs.tolist()):
        prompt, chosen_ids = _segment_ids(batch, c)
        samples.append({"prompt_ids": prompt, "chosen_ids": chosen_ids, "rejected_ids": _segment_ids(batch, r)[1],
                        "reward_diff": diff})
    return samples


def row_samples(batch: dict, rewards) -> list[dict]:
    """One dict per KTO row (its KL sequence left out): ``prompt_ids``,
    ``completion_ids``, ``label`` (desirable or not), ``reward``."""
    roles = batch["segment_roles"]
    rows = ((roles == DESIRABLE) | (roles == UNDESIRABLE)).nonzero().flatten().tolist()
    samples = []
    for segment, reward in zip(rows, rewards.tolist()):
        prompt, completion = _segment_ids(batch, segment)
        samples.append({"prompt_ids": prompt, "completion_ids": completion,
                        "label": bool(roles[segment] == DESIRABLE), "reward": reward})
    return samples
