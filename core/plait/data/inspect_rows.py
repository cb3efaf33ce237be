"""Show a tokenized row with trained and masked tokens apart.

Consecutive tokens with the same state are decoded together, so the text reads
naturally. On a terminal masked text is dim and trained text green; otherwise
masked text is wrapped in ``[[...]]`` and trained text printed as is.

A token repeated many times in a row (the image placeholders a vision
processor expands, one per image feature) is printed once with its count,
``<|image_pad|>×64``, and :func:`describe_extras` lists where such runs sit,
whether they are trained, and what a format kept beside the ids (image files).
"""

from __future__ import annotations

IGNORE = -100
#: a token repeated at least this often in a row is printed once with its count
REPEAT = 4
DIM, GREEN, RESET = "\033[2m", "\033[32m", "\033[0m"


def runs(input_ids, labels) -> list[tuple[bool, list[int]]]:
    """Split a row into runs of ``(trained, token ids)``."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


def format_row(input_ids, labels, tokenizer, *, color: bool) -> str:
    """The row's text with masked parts marked (ANSI colour or ``[[...]]``)."""
    pieces = []
    for trained, ids in runs(input_ids, labels):
        text = "".join(_decode_collapsed(ids, tokenizer))
        if color:
            pieces.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            pieces.append(text if trained else f"[[{text}]]")
    return "".join(pieces)


def _decode_collapsed(ids: list[int], tokenizer) -> list[str]:
    """``ids`` decoded, each run of one token repeated ``REPEAT`` or more times as ``token×N``."""
    pieces, plain, start = [], [], 0
    while start < len(ids):
        end = start
        while end < len(ids) and ids[end] == ids[start]:
            end += 1
        if end - start >= REPEAT:
            if plain:
                pieces.append(tokenizer.decode(plain, skip_special_tokens=False))
                plain = []
            pieces.append(f"{tokenizer.decode([ids[start]], skip_special_tokens=False)}\u00d7{end - start}")
        else:
            plain.extend(ids[start:end])
        start = end
    if plain:
        pieces.append(tokenizer.decode(plain, skip_special_tokens=False))
    return pieces


def repeated_runs(input_ids, labels) -> list[tuple[int, int, int, bool]]:
    """``(token, first position, count, any trained)`` of every run of one token
    repeated ``REPEAT`` or more times."""
    out, start = [], 0
    while start < len(input_ids):
        end = start
        while end < len(input_ids) and input_ids[end] == input_ids[start]:
            end += 1
        if end - start >= REPEAT:
            out.append((input_ids[start], start, end - start, any(l != IGNORE for l in labels[start:end])))
        start = end
    return out


def describe_extras(row: dict, tokenizer) -> list[str]:
    """Lines about a row beyond its text: where repeated-token runs (image
    placeholders) sit and whether they are trained, and the references a format
    kept in ``extras`` (image files), so a user sees images are in place and masked."""
    import json

    lines = []
    for token, first, count, trained in repeated_runs(row["input_ids"], row["labels"]):
        state = "TRAINED" if trained else "masked"
        lines.append(f"  {tokenizer.decode([token], skip_special_tokens=False)} \u00d7{count} at positions "
                     f"{first}-{first + count - 1}: {state}")
    extras = json.loads(row["extras"]) if row.get("extras") else {}
    for key, value in extras.items():
        if key == "text":
            continue
        items = value if isinstance(value, list) else [value]
        shown = [item.get("path") or f"{next(iter(item))} ({len(str(next(iter(item.values()))))} chars)"
                 if isinstance(item, dict) and item else str(item) for item in items]
        lines.append(f"  {key}: {', '.join(shown) if shown else 'none'}")
    return lines
