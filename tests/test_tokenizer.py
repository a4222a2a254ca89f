"""Tokenizers: byte round trips, id validation, and the HF adapter on a tiny trained vocabulary."""

import hashlib
import re

import numpy as np
import pytest

from statejax.errors import InputError
from statejax.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    check_fits_vocab,
    encode_checked,
    validate_token_ids,
)


def test_byte_tokenizer_constants():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.name == "bytes-v1"
    assert isinstance(tok, Tokenizer)


def test_byte_round_trip_ascii_and_non_ascii():
    tok = ByteTokenizer()
    text = "price 101.5 → €, naïve 日本 🚀"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("AB").tolist() == [65, 66]  # no bos/eos added
    assert tok.encode("").shape == (0,)
    assert tok.decode([]) == ""


def test_byte_decode_skips_specials_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id, 104, 105, tok.pad_id, 33, tok.eos_id]
    assert tok.decode(ids) == "hi!"
    assert tok.decode(np.array([0xE2, 0x82], np.int64)) == "\ufffd"  # truncated 3-byte char


def test_byte_decode_rejects_out_of_range():
    with pytest.raises(InputError, match="token id 259 at index 1"):
        ByteTokenizer().decode([1, 259])


def test_byte_encode_rejects_non_str():
    with pytest.raises(InputError, match="text must be a str; got bytes"):
        ByteTokenizer().encode(b"abc")
    with pytest.raises(InputError, match="not encodable as UTF-8"):  # a lone surrogate
        ByteTokenizer().encode("ok \ud800")


def test_validate_token_ids_accepts_and_casts():
    out = validate_token_ids([0, 5, 9], vocab_size=10)
    assert out.dtype == np.int32 and out.tolist() == [0, 5, 9]
    out = validate_token_ids(np.array([3], np.uint8), vocab_size=4)
    assert out.dtype == np.int32 and out.tolist() == [3]


@pytest.mark.parametrize(
    "ids, pattern",
    [
        (np.zeros((2, 3), np.int32), r"must be 1-D \(shape \[N\]\); got shape \(2, 3\)"),
        (np.int32(4), r"must be 1-D .*got shape \(\)"),
        (np.array([1.0, 2.0]), r"dtype float64; allowed: integer dtypes"),
        (np.array([True]), r"dtype bool; allowed: integer dtypes"),
        ([], r"empty; at least one id"),
        (np.zeros((0,), np.int32), r"empty"),
        ([3, -1, 2], r"token id -1 at index 1 is out of range; allowed: 0 <= id < 10"),
        ([0, 1, 10, 11], r"token id 10 at index 2 is out of range; allowed: 0 <= id < 10"),
    ],
)
def test_validate_token_ids_errors(ids, pattern):
    with pytest.raises(InputError, match=pattern):
        validate_token_ids(ids, vocab_size=10)


def test_validate_token_ids_bad_vocab_size():
    with pytest.raises(InputError, match="vocab_size must be a positive int; got 0"):
        validate_token_ids([0], vocab_size=0)


def test_check_fits_vocab():
    tok = ByteTokenizer()
    check_fits_vocab(tok, 259)
    check_fits_vocab(tok, 512)  # padded embedding tables are fine
    msg = "tokenizer bytes-v1 has 259 ids but the model's vocabulary has 258"
    with pytest.raises(InputError, match=re.escape(msg)):
        check_fits_vocab(tok, 258)


# --- HFTokenizer ---------------------------------------------------------------------------


def _train_tiny_bpe(path):
    """A byte-level BPE trained on a few strings, with <s>, </s>, <pad> specials; saved to path."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["0 100.5 101.2 99.8 100.9 12000", "the open high low close volume"] * 20
    tk.train_from_iterator(corpus, trainer)
    tk.save(str(path))
    return tk


def test_hf_tokenizer_round_trip_and_ids(tmp_path):
    path = tmp_path / "tokenizer.json"
    backend = _train_tiny_bpe(path)
    tok = HFTokenizer.from_file(path)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == backend.get_vocab_size(with_added_tokens=True)
    assert 256 + 3 < tok.vocab_size <= 300  # byte alphabet + specials + some merges
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # specials are added first
    assert tok.name == "hf:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    text = "0 100.5 101.2 close → 日本"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tok.bos_id not in ids.tolist()  # no special tokens added
    assert len(tok.encode("0 100.5 101.2 99.8 100.9 12000")) < len("0 100.5 101.2 99.8 100.9 12000")
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id]) == text  # specials skipped

    check_fits_vocab(tok, tok.vocab_size)
    with pytest.raises(InputError, match=f"tokenizer {tok.name} has {tok.vocab_size} ids"):
        check_fits_vocab(tok, tok.vocab_size - 1)


def test_hf_tokenizer_from_directory_and_missing_specials(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))

    tok = HFTokenizer.from_file(str(tmp_path))  # a directory holding tokenizer.json
    assert tok.vocab_size == 3
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (-1, -1, -1)
    assert tok.encode("hello world nope").tolist() == [1, 2, 0]


def test_hf_tokenizer_missing_and_malformed_files(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(InputError, match="no tokenizer file at .*tokenizer.json"):
        HFTokenizer.from_file(tmp_path)
    with pytest.raises(InputError, match="no tokenizer file at .*nope.json"):
        HFTokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a valid Hugging Face tokenizer.json"):
        HFTokenizer.from_file(bad)


class _Returns(ByteTokenizer):
    """A tokenizer whose encode returns a fixed value, whatever the text."""

    def __init__(self, value):
        self.value = value

    def encode(self, text):
        return self.value


@pytest.mark.parametrize("value, match", [
    (np.array([3, 259, 4]), r"id 259 at position 1; allowed: ids in \[0, 259\)"),
    (np.array([-1]), r"id -1 at position 0; allowed: ids in \[0, 259\)"),
    ([1, 2, 10**6], r"id 1000000 at position 2"),
    (np.array([[1, 2]]), r"shape \(1, 2\).*allowed: a 1-D integer array"),
    (np.array([1.0, 2.0]), r"dtype float64; allowed: a 1-D integer array"),
    ("12", "encode returned a str; allowed: a 1-D integer array"),
    (None, "encode returned a NoneType"),
])
def test_encode_checked_names_the_bad_output(value, match):
    with pytest.raises(InputError, match=match):
        encode_checked(_Returns(value), "some text")


def test_encode_checked_passes_good_ids_as_int32():
    tok = ByteTokenizer()
    ids = encode_checked(tok, "ab")
    assert ids.dtype == np.int32 and ids.tolist() == [97, 98]
    assert encode_checked(_Returns([]), "x").shape == (0,)
    assert encode_checked(_Returns(np.array([0, 258], np.int64)), "x").dtype == np.int32
