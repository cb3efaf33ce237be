"""Tokenizer fixes users otherwise make by hand, per family.

Two traps this removes:

* **No pad token, or pad = EOS / end-of-turn.** Core falls back to ``pad =
  EOS``; a collator or a later step that masks labels by pad id then masks the
  very token that teaches the model to stop. A family's dedicated pad token
  (``<|finetune_right_pad_id|>``, ``<|endoftext|>``, ``<pad>``) is used instead
  when the vocabulary has it.
* **EOS is not what ends a turn.** Chat models end an assistant turn with an
  end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``) while
  ``eos_token`` may be ``<|end_of_text|>``; generation that stops only on EOS
  runs past the answer. :func:`apply_family_tokenizer_fixes` makes sure the
  end-of-turn tokens exist as single tokens and returns every id generation
  must stop on; :func:`set_generation_stop_tokens` writes them into the
  model's ``generation_config`` so the saved model stops by itself.

Call order in a run: ``load_tokenizer`` → :func:`apply_family_tokenizer_fixes`
(before tokenizing data, since it may install a chat template and add tokens)
→ ``load_model`` (resizes embeddings to ``len(tokenizer)``) →
:func:`set_generation_stop_tokens` before saving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: end-of-turn markers of common templates, recognised in any tokenizer's own template
KNOWN_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


@dataclass
class TokenizerFixes:
    """What :func:`apply_family_tokenizer_fixes` changed and found."""

    #: one line per change, for the run log
    changes: list[str] = field(default_factory=list)
    #: tokens that end an assistant turn under the tokenizer's (final) template
    end_of_turn_tokens: list[str] = field(default_factory=list)
    #: ids generation must stop on: EOS plus the end-of-turn tokens
    stop_token_ids: list[int] = field(default_factory=list)


def _in_vocab(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def _is_special(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def _template_text(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: {"default": ..., "tool_use": ...}
        return "\n".join(str(t) for t in template.values())
    return template or ""


def end_of_turn_tokens(family, tokenizer) -> list[str]:
    """End-of-turn markers the tokenizer's chat template emits: the family's
    own first, then any well-known marker found in the template text."""
    template = _template_text(tokenizer)
    candidates = tuple(family.end_of_turn_tokens) if family is not None else ()
    candidates += tuple(t for t in KNOWN_END_OF_TURN if t not in candidates)
    return [t for t in candidates if t in template]


def stop_token_ids(family, tokenizer) -> list[int]:
    """EOS plus every end-of-turn token the vocabulary has, without changing
    the tokenizer."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in end_of_turn_tokens(family, tokenizer) if t in vocab]
    return list(dict.fromkeys(ids))


def apply_family_tokenizer_fixes(family, tokenizer, cfg=None) -> TokenizerFixes:
    """Fix ``tokenizer`` in place for ``family`` (a ``ModelFamily`` or ``None``).

    * installs the family's default chat template when the tokenizer has none
      and the run renders chats (a ``type: chat_template`` dataset; always
      when ``cfg`` is ``None``);
    * adds the template's special tokens and end-of-turn tokens that are not
      in the vocabulary yet (the model's embeddings must then be resized, which
      core's ``load_model`` does when ``len(tokenizer)`` grew);
    * picks a pad token that is neither EOS nor an end-of-turn token when the
      family has one in the vocabulary, unless the config's
      ``special_tokens.pad_token`` chose one;
    * returns the end-of-turn tokens and the ids to stop generation on.
    """
    fixes = TokenizerFixes()
    name = family.name if family is not None else "generic"

    from plait_models.config import uses_chat_template

    installed_default = False
    renders_chats = cfg is None or uses_chat_template(cfg)
    if not tokenizer.chat_template and family is not None and family.default_chat_template and renders_chats:
        tokenizer.chat_template = family.default_chat_template
        installed_default = True
        fixes.changes.append(f"chat template: the tokenizer has none; using the {name} family's default")

    fixes.end_of_turn_tokens = end_of_turn_tokens(family, tokenizer)

    needed = list(fixes.end_of_turn_tokens)
    if installed_default:
        needed += [t for t in family.chat_special_tokens if t not in needed]
    missing = [t for t in needed if not _in_vocab(tokenizer, t)]
    if missing:
        # special, so they are never split and the model learns one id per marker
        tokenizer.add_tokens(missing, special_tokens=True)
        fixes.changes.append(
            f"added special tokens {missing} used by the chat template (model embeddings grow to {len(tokenizer)})"
        )

    # a marker already in the vocabulary as a plain added token (core's ``tokens:`` key, which
    # validate_config fills with the template's markers, adds them that way) is not special:
    # chat_template masking then does not see the end-of-turn token as the turn's end and never
    # trains it, so the model never learns to stop. Mark such markers special.
    if family is not None and family.default_chat_template and tokenizer.chat_template == family.default_chat_template:
        needed += [t for t in family.chat_special_tokens if t not in needed]
    plain = [t for t in needed if t not in missing and _in_vocab(tokenizer, t) and not _is_special(tokenizer, t)]
    if plain:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in plain], special_tokens=True)
        fixes.changes.append(f"marked {plain} special: chat template markers must be single, special tokens")

    _fix_pad_token(family, tokenizer, cfg, fixes)

    fixes.stop_token_ids = stop_token_ids(family, tokenizer)
    if len(fixes.stop_token_ids) > 1:
        fixes.changes.append(
            f"generation stops on EOS {tokenizer.eos_token!r} and end-of-turn {fixes.end_of_turn_tokens} "
            f"(ids {fixes.stop_token_ids})"
        )
    return fixes


def _fix_pad_token(family, tokenizer, cfg, fixes: TokenizerFixes) -> None:
    chosen_by_user = cfg is not None and "pad_token" in (getattr(cfg, "special_tokens", None) or {})
    if chosen_by_user:
        return
    reserved = {tokenizer.eos_token, *fixes.end_of_turn_tokens}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in reserved:
        return
    for candidate in (family.pad_token_candidates if family is not None else ()):
        if candidate not in reserved and _in_vocab(tokenizer, candidate):
            old = tokenizer.pad_token
            tokenizer.pad_token = candidate
            fixes.changes.append(
                f"pad token: {candidate!r} instead of {old!r}, so padding is never confused with "
                "the token that ends a turn"
            )
            return
    if tokenizer.pad_token is not None:
        fixes.changes.append(
            f"pad token {tokenizer.pad_token!r} also ends text or a turn and the vocabulary has no dedicated "
            "pad token: padded positions must be masked by the attention mask, never by token id"
        )
        return
    if tokenizer.pad_token is None:
        # no dedicated token: EOS is safe as long as padding is masked by the attention mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        fixes.changes.append(f"pad token: none; using {tokenizer.pad_token!r} (padded positions are masked)")


def set_generation_stop_tokens(model, stop_token_ids, pad_token_id=None) -> None:
    """Make ``model.generate`` (and the saved ``generation_config.json``) stop
    on every id in ``stop_token_ids``, EOS and end-of-turn alike."""
    ids = list(dict.fromkeys(stop_token_ids))
    if not ids:
        return
    config = model.generation_config
    config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
