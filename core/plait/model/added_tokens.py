"""Axolotl's ``added_tokens_overrides``: give reserved added tokens new text.

Many tokenizers ship unused added tokens (Llama 3's ``<|reserved_special_token_N|>``);
renaming one (``{128011: "<|eot|>"}``) gives a marker a single token id without
growing the vocabulary or the embeddings. Only added tokens (``tokenizer.json``'s
``added_tokens``) can be renamed: a base-vocabulary id has merges and
neighbours that a new string would not keep.

The fast tokenizer's backend is rebuilt from its JSON with the new contents,
and every named or extra special token is re-pointed at its id, so the
tokenizer saved with the model lists the new strings (a stale name in
``tokenizer_config.json`` would come back as a new token on reload).
"""

from __future__ import annotations

import json

from plait.errors import ConfigError


def override_added_tokens(tokenizer, overrides: dict[int, str]) -> None:
    """Rename the added tokens of ``tokenizer`` whose ids ``overrides`` names, in place."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("config key 'added_tokens_overrides' renames tokens of a fast (tokenizers) tokenizer; "
                          "this one is not (set tokenizer_use_fast: true, or remove the key)")
    data = json.loads(backend.to_str())
    added = {entry["id"]: entry for entry in data["added_tokens"]}
    missing = sorted(set(overrides) - set(added))
    if missing:
        ids = sorted(added)
        raise ConfigError(f"config key 'added_tokens_overrides': {missing} {'is' if len(missing) == 1 else 'are'} not "
                          f"added tokens of this tokenizer (its added tokens have ids {ids[0]}..{ids[-1]}); only "
                          f"tokenizer.json's added_tokens can be renamed" if ids else
                          f"config key 'added_tokens_overrides': this tokenizer has no added tokens to rename")
    vocab = tokenizer.get_vocab()
    for token_id, text in overrides.items():
        if text in vocab and vocab[text] != token_id:
            raise ConfigError(f"config key 'added_tokens_overrides': {token_id}: {text!r} is already token "
                              f"{vocab[text]} of this tokenizer; give a string it does not have")
    # the special tokens, by id: they are pointed again at the same ids once the names change
    named = {name: getattr(tokenizer, f"{name}_id") for name in tokenizer.SPECIAL_TOKENS_ATTRIBUTES
             if getattr(tokenizer, name) is not None}
    extra = list(tokenizer.extra_special_tokens_ids)
    for token_id, text in overrides.items():
        added[token_id]["content"] = text
    # transformers keeps the backend here; no public setter rebuilds it from JSON
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    for name, token_id in named.items():
        setattr(tokenizer, f"{name}_id", token_id)
    tokenizer.extra_special_tokens_ids = extra
