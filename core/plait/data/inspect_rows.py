"""Show a tokenized row with trained and masked tokens apart.

Consecutive tokens with the same state are decoded together, so the text reads
naturally. On a terminal masked text is dim and trained text green; otherwise
masked text is wrapped in ``[[...]]`` and trained text printed as is.
"""

from __future__ import annotations

IGNORE = -100
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
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if color:
            pieces.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            pieces.append(text if trained else f"[[{text}]]")
    return "".join(pieces)
