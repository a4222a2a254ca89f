"""Tokenizers: a dependency-free byte tokenizer and an adapter over a local HF `tokenizer.json`.

Every tokenizer maps text to a 1-D int32 array of ids in `[0, vocab_size)` and back. `encode`
never adds bos/eos: callers add special ids explicitly, so the same text always gives the same ids.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from statejax.errors import InputError

# Looked up in order; the first token the vocabulary knows wins. GPT-2-style vocabularies use
# "<|endoftext|>" for both bos and eos, hence its place last in the bos list.
_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_TOKENS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What statejax needs from a tokenizer.

    Attributes:
      vocab_size: number of ids; every id is in `[0, vocab_size)`.
      bos_id, eos_id, pad_id: special ids, or -1 where the tokenizer has none.
      name: identity string that changes when the vocabulary changes, e.g. "bytes-v1" or
        "hf:<first 12 hex of sha256(tokenizer.json)>"; stored with checkpoints and caches.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    name: str

    def encode(self, text: str) -> np.ndarray:
        """Text -> ids, int32 of shape [N]; adds no special ids."""
        ...

    def decode(self, ids: Any) -> str:
        """Ids of shape [N] -> text, skipping special ids."""
        ...


def _check_vocab_size(vocab_size: Any, what: str) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer):
        raise InputError(f"{what} must be a positive int; got {vocab_size!r}")
    if vocab_size <= 0:
        raise InputError(f"{what} must be a positive int; got {vocab_size}")
    return int(vocab_size)


def _as_id_array(ids: Any, vocab_size: int, *, allow_empty: bool) -> np.ndarray:
    """Checks ids of shape [N] against `[0, vocab_size)`; returns them as int32 [N]."""
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise InputError(f"token ids must be a 1-D integer array; could not convert: {e}") from e
    if arr.ndim != 1:
        raise InputError(f"token ids must be 1-D (shape [N]); got shape {arr.shape}")
    # Checked before dtype: `np.asarray([])` is float64, which would give a misleading message.
    if arr.size == 0:
        if allow_empty:
            return np.zeros((0,), np.int32)
        raise InputError("token ids are empty; at least one id is required")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"token ids have dtype {arr.dtype}; allowed: integer dtypes (int8..int64, "
            "uint8..uint64)"
        )
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"token id {int(arr[i])} at index {i} is out of range; "
            f"allowed: 0 <= id < {vocab_size} (vocab_size)"
        )
    return arr.astype(np.int32)


def validate_token_ids(ids: Any, vocab_size: int) -> np.ndarray:
    """Checks a prompt's ids and returns them as an int32 array of shape [N], N >= 1.

    Raises InputError for: rank other than 1, a non-integer dtype, no ids, or any id outside
    `[0, vocab_size)` (naming the first offending index and value).
    """
    vocab_size = _check_vocab_size(vocab_size, "vocab_size")
    return _as_id_array(ids, vocab_size, allow_empty=False)


def check_fits_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises InputError if `tokenizer` can emit ids the model's embedding table [V, E] lacks.

    A model vocabulary larger than the tokenizer's (padded tables) is fine.
    """
    model_vocab_size = _check_vocab_size(model_vocab_size, "model_vocab_size")
    if tokenizer.vocab_size > model_vocab_size:
        raise InputError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's vocabulary "
            f"has {model_vocab_size}; allowed: tokenizer.vocab_size <= model vocab_size"
        )


def encode_checked(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """`tokenizer.encode(text)`, checked before any device work: [N] int32 ids, N >= 0.

    A tokenizer is outside code: an id it returns beyond the embedding table would turn into
    NaN cells, so every id is checked against the tokenizer's own `[0, vocab_size)` (which
    `check_fits_vocab` ties to the model's).

    Raises:
      InputError: `encode` returned something other than a 1-D integer array, or an id
        outside `[0, vocab_size)` (naming the id, its position and the range).
    """
    vocab_size = _check_vocab_size(tokenizer.vocab_size, "tokenizer.vocab_size")
    ids = tokenizer.encode(text)
    if not isinstance(ids, np.ndarray | list | tuple):
        raise InputError(f"tokenizer {tokenizer.name} encode returned a {type(ids).__name__};"
                         " allowed: a 1-D integer array of ids")
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), np.int32)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"tokenizer {tokenizer.name} encode returned shape {arr.shape}, "
                         f"dtype {arr.dtype}; allowed: a 1-D integer array of ids")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"tokenizer {tokenizer.name} encoded {text[:40]!r} to id "
                         f"{int(arr[i])} at position {i}; allowed: ids in [0, {vocab_size}) "
                         "(tokenizer.vocab_size)")
    return arr.astype(np.int32)


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InputError(f"text must be a str; got {type(text).__name__}")
    return text


class ByteTokenizer:
    """Dependency-free default: ids 0..255 are UTF-8 bytes, then pad=256, bos=257, eos=258.

    One id per UTF-8 byte, so `len(encode(s)) == len(s.encode("utf-8"))`.
    """

    vocab_size: int = 259
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    name: str = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        """Text -> its UTF-8 bytes as int32 ids of shape [N]; adds no bos/eos."""
        try:
            data = _check_text(text).encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a bad decode upstream
            raise InputError(f"text is not encodable as UTF-8: {e}") from e
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """Ids of shape [N] -> text. Special ids are skipped; invalid UTF-8 becomes U+FFFD."""
        arr = _as_id_array(ids, self.vocab_size, allow_empty=True)
        return bytes(arr[arr < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _first_known(backend: Any, candidates: tuple[str, ...]) -> int:
    for token in candidates:
        tid = backend.token_to_id(token)
        if tid is not None:
            return int(tid)
    return -1


class HFTokenizer:
    """Adapter over a Hugging Face `tokenizers.Tokenizer` loaded from a local tokenizer.json.

    Build it with `HFTokenizer.from_file`. Special ids are found from common special tokens
    ("<|begin_of_text|>", "<s>", "</s>", "<|endoftext|>", ...), else -1.
    """

    def __init__(self, backend: Any, *, name: str, bos_id: int, eos_id: int, pad_id: int):
        self._backend = backend
        self.name = name
        # Max id + 1 rather than the token count: some vocabularies leave gaps, and the model's
        # embedding table must cover the largest id.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """Loads a tokenizer.json file, or the tokenizer.json inside directory `path`.

        Needs the optional `tokenizers` package (`pip install statejax[hf]`).
        """
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                "HFTokenizer needs the `tokenizers` package: pip install statejax[hf]"
            ) from e
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise InputError(
                f"no tokenizer file at {p}; allowed: a tokenizer.json file or a directory "
                "containing one"
            )
        data = p.read_bytes()
        try:
            backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise InputError(f"{p} is not a valid Hugging Face tokenizer.json: {e}") from e
        return cls(
            backend,
            name="hf:" + hashlib.sha256(data).hexdigest()[:12],
            bos_id=_first_known(backend, _BOS_TOKENS),
            eos_id=_first_known(backend, _EOS_TOKENS),
            pad_id=_first_known(backend, _PAD_TOKENS),
        )

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids of shape [N], without the tokenizer's special tokens."""
        enc = self._backend.encode(_check_text(text), add_special_tokens=False)
        return np.asarray(enc.ids, dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """Ids of shape [N] -> text, skipping special tokens."""
        arr = _as_id_array(ids, self.vocab_size, allow_empty=True)
        return self._backend.decode(arr.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"
