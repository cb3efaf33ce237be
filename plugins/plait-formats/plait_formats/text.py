"""Raw text: ``completion`` and ``pretraining``. Every token is trained.

``completion``   each row's text (column ``field``, ``text_column`` or
                 ``text``) becomes BOS + text + EOS, split into pieces of
                 ``sequence_len`` tokens; a long text gives several rows.
``pretraining``  the rows of a batch are joined into one stream (each still
                 BOS + text + EOS) and cut into ``sequence_len`` pieces, so
                 only the last piece of a batch is short.
"""

from __future__ import annotations

from plait_formats.common import encode_prompts, text_column

TYPES = ("completion", "pretraining")


def text_key(dataset_cfg) -> str:
    return dataset_cfg.field or dataset_cfg.text_column or "text"


def encode_texts(tokenizer, texts) -> list[list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids + eos for ids in encode_prompts(tokenizer, texts)]


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)] or [[]]


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    texts = text_column(batch, text_key(dataset_cfg))
    encoded = encode_texts(tokenizer, texts)
    if dataset_cfg.type.split(".")[0] == "pretraining":
        stream = [token for ids in encoded for token in ids]
        pieces = chunks(stream, cfg.sequence_len) if stream else []
    else:
        pieces = [piece for ids in encoded for piece in chunks(ids, cfg.sequence_len)]
    return {"input_ids": pieces, "labels": [list(piece) for piece in pieces]}
