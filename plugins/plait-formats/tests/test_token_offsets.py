"""Token spans read from the ids equal the tokenizer's own, or are not used."""

import numpy as np
import pytest

from plait_formats import token_offsets
from plait_formats.token_offsets import SpanReader, TokenBatch, encode_with_spans

TEXTS = ["<|im_start|>user\nsort the words<|im_end|>\n", "  add 3 and 4\n\n\tplease  ",
         "<|im_start|>assistant\nthe sum is 7<|im_end|>\n<|end_of_text|>", ""]
#: rows the ids cannot place (a character of several bytes): tokenized with the tokenizer's spans
NOT_ASCII = ["caf\u00e9 cr\u00e8me", "emoji \U0001F600 here"]


@pytest.fixture(autouse=True)
def fresh_readers(monkeypatch):
    monkeypatch.setattr(token_offsets, "_READERS", {})


def own_spans(backend, texts) -> TokenBatch:
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return TokenBatch.from_lists([e.ids for e in encodings], [e.offsets for e in encodings])


def assert_same(a: TokenBatch, b: TokenBatch):
    assert a.ids == b.ids and a.lengths == b.lengths
    assert np.array_equal(a.flat_ids, b.flat_ids)
    assert np.array_equal(a.starts, b.starts) and np.array_equal(a.ends, b.ends)


def copy_of(tokenizer):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())


def test_byte_level_spans_come_from_the_ids(tokenizer):
    backend = tokenizer.backend_tokenizer
    first = encode_with_spans(tokenizer, TEXTS)  # the first batch: the tokenizer's spans, and the check
    reader = token_offsets._READERS[id(backend)]
    assert reader.trusted is True
    assert_same(first, own_spans(backend, TEXTS))
    assert first.offsets() == [e.offsets for e in backend.encode_batch(TEXTS, add_special_tokens=False)]
    # later batches read the spans from the ids; rows that are not ASCII keep the tokenizer's, in place
    mixed = [NOT_ASCII[0], *TEXTS, NOT_ASCII[1]]
    assert_same(encode_with_spans(tokenizer, mixed), own_spans(backend, mixed))
    assert_same(encode_with_spans(tokenizer, TEXTS[:2]), own_spans(backend, TEXTS[:2]))


@pytest.mark.parametrize("change", ["trimmed offsets", "normalizer"])
def test_a_tokenizer_whose_spans_differ_keeps_its_own(tokenizer, change):
    from tokenizers import normalizers, processors

    backend = copy_of(tokenizer)
    if change == "trimmed offsets":
        backend.post_processor = processors.ByteLevel(trim_offsets=True)  # spans without their spaces
    else:
        backend.normalizer = normalizers.Replace("\n", "\n\n")  # each newline two bytes' worth of tokens
    reader = SpanReader(backend)
    assert_same(reader.encode(TEXTS), own_spans(backend, TEXTS))
    assert reader.trusted is False
    assert_same(reader.encode(TEXTS + NOT_ASCII), own_spans(backend, TEXTS + NOT_ASCII))


def test_a_row_the_ids_do_not_cover_is_tokenized_again(tokenizer):
    backend = copy_of(tokenizer)
    reader = SpanReader(backend)
    reader.encode(TEXTS)
    assert reader.trusted is True
    # a wrong width (as a tokenizer whose tokens are not one character per byte would have) is caught per row
    reader.widths = reader.widths.copy()
    newline = backend.token_to_id("\u010a")  # byte-level's newline
    reader.widths[newline] += 1
    assert_same(reader.encode(TEXTS), own_spans(backend, TEXTS))


def test_added_tokens_start_a_new_reader(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    encode_with_spans(tok, TEXTS)
    tok.add_tokens(["<|tool|>"], special_tokens=True)
    texts = [t + "<|tool|>" for t in TEXTS]
    assert_same(encode_with_spans(tok, texts), own_spans(tok.backend_tokenizer, texts))
