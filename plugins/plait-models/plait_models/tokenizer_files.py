"""Facts about a local tokenizer read from its files, without transformers.

``validate_config`` runs before anything is loaded and must stay cheap, so it
reads ``tokenizer_config.json``, ``chat_template.jinja`` and ``tokenizer.json``
as plain JSON/text. Anything unreadable answers "unknown" (``None``), and the
caller then leaves the config alone.
"""

from __future__ import annotations

import json
from pathlib import Path


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _token_text(value) -> str | None:
    # special tokens are saved either as a string or as an AddedToken dict
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TokenizerFiles:
    """The saved tokenizer in ``directory`` (``is_local`` false when absent)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config = _json(self.directory / "tokenizer_config.json")

    @property
    def is_local(self) -> bool:
        return self.config is not None

    def has_chat_template(self) -> bool:
        return bool(self.config.get("chat_template")) or any(
            (self.directory / name).is_file() for name in ("chat_template.jinja", "chat_template.json")
        )

    def special_token(self, name: str) -> str | None:
        """``pad_token``, ``eos_token``, ... as saved, or ``None``."""
        return _token_text(self.config.get(name))

    def vocabulary(self) -> set[str] | None:
        """Every token string of ``tokenizer.json`` (model vocab and added
        tokens), or ``None`` when there is no such file."""
        data = _json(self.directory / "tokenizer.json")
        if data is None:
            return None
        vocab = (data.get("model") or {}).get("vocab") or {}
        tokens = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}  # BPE dict / Unigram list
        tokens |= {entry.get("content") for entry in data.get("added_tokens") or ()}
        return tokens
