"""Import a llama.cpp GGUF file (llama, qwen2, qwen3 architectures) into statejax params.

A `.gguf` holds metadata (`general.architecture`, `<arch>.block_count`, ..., `tokenizer.ggml.*`,
`tokenizer.chat_template`) and tensors named `token_embd`, `blk.N.attn_q`, ..., `output_norm`,
`output` (absent: tied embeddings), each stored as F32, F16, BF16 or a block-quantized type.
The file is read with the `gguf` package (`pip install statejax[gguf]`) and every tensor is
dequantized with `gguf.quants.dequantize` to float32, then cast to the requested dtype.

Layout notes:
- GGUF dims are listed fastest-first; the numpy view the reader gives is the HF `[out, in]`
  layout, so each tensor maps onto the same `TensorSpec` as its HF counterpart
  (`statejax.checkpoint.hf_import.tensor_specs`).
- llama.cpp's converter permutes the llama Q and K projections for its interleaved RoPE; that
  permutation is undone here, so statejax's half-split RoPE applies. qwen2/qwen3 files use
  llama.cpp's NeoX RoPE and are stored unpermuted.
"""

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from statejax.checkpoint.hf_import import Checkpoint, TensorSpec, check_dtype, tensor_specs
from statejax.errors import InputError
from statejax.model.config import ModelConfig
from statejax.tokenizer import HFTokenizer, check_fits_vocab

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# HF tensor name pattern -> GGUF tensor name (`{i}`: the layer index).
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# GPT-2 byte-level BPE split regexes by `tokenizer.ggml.pre`, as transformers' GGUF loader
# reads them; any other value keeps the GPT-2 split of `ByteLevel(use_regex=True)`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType
_REQUIRED = object()


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF import needs the `gguf` package: pip install statejax[gguf]") from e
    return gguf


def _supported_types(gguf) -> dict[str, Any]:
    """Tensor type name -> type, for every type `gguf.quants.dequantize` handles."""
    # The package's own table of dequantizers is private; without it, every type it sizes.
    quantized = getattr(gguf.quants, "_type_traits", None) or gguf.GGML_QUANT_SIZES
    types = [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *quantized]
    return {t.name: t for t in types}


# ------------------------------------------------------------------ file and metadata


def _open(path: Path, gguf):
    if not path.is_file():
        raise InputError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise InputError(f"{path} is a corrupt or truncated GGUF file: {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise InputError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                             f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def _meta(reader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise InputError(f"GGUF metadata lacks {key!r}; it is required")
        return default
    return field.contents()


def _positive(reader, key: str, kind: type, default: Any = _REQUIRED):
    value = _meta(reader, key, default)
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and value > 0
          and (kind is float or value == int(value)) and np.isfinite(value))
    if not ok:
        raise InputError(f"GGUF metadata {key}={value!r}; allowed: a positive "
                         f"{'int' if kind is int else 'number'}")
    return kind(value)


def config_from_gguf(reader, *, dtype="float32", name: str | None = None) -> ModelConfig:
    """Maps a GGUF file's metadata (and its embedding's shape) to a `ModelConfig`.

    Args:
      reader: a `gguf.GGUFReader` over the file.
      dtype: "float32" or "bfloat16".
      name: `ModelConfig.name`; default "gguf-<architecture>".

    Raises InputError for an unsupported architecture or RoPE scaling, or a missing or
    ill-typed metadata field.
    """
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"GGUF general.architecture={arch!r}; allowed: "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    embed_dim = _positive(reader, f"{arch}.embedding_length", int)
    num_heads = _positive(reader, f"{arch}.attention.head_count", int)
    head_dim = _meta(reader, f"{arch}.attention.key_length", None)
    if head_dim is None:
        if embed_dim % num_heads:
            raise InputError(f"GGUF has no {arch}.attention.key_length and embedding_length="
                             f"{embed_dim} is not a multiple of head_count={num_heads}")
        head_dim = embed_dim // num_heads
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise InputError(f"GGUF {arch}.rope.scaling.type={scaling!r}; allowed: 'none' "
                         "(absent)")
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise InputError("GGUF has a 'rope_freqs.weight' tensor (Llama-3 RoPE frequency "
                         "factors); allowed: files without RoPE scaling")
    if "token_embd.weight" not in names:
        raise InputError("GGUF lacks tensor 'token_embd.weight'; it is required")
    vocab_size = int(names["token_embd.weight"].shape[-1])
    stated = _meta(reader, f"{arch}.vocab_size", vocab_size)
    if stated != vocab_size:
        raise InputError(f"GGUF {arch}.vocab_size={stated!r} but token_embd.weight has "
                         f"{vocab_size} rows; they must match")
    _positive(reader, f"{arch}.context_length", int, 1)  # checked; statejax's cells bound it
    return ModelConfig(
        name=name or f"gguf-{arch}",
        vocab_size=vocab_size,
        num_layers=_positive(reader, f"{arch}.block_count", int),
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=_positive(reader, f"{arch}.attention.head_count_kv", int, num_heads),
        head_dim=_positive(reader, f"{arch}.attention.key_length", int, head_dim),
        mlp_dim=_positive(reader, f"{arch}.feed_forward_length", int),
        rope_theta=_positive(reader, f"{arch}.rope.freq_base", float, 10_000.0),
        rope_scaling=None,
        rms_eps=_positive(reader, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-5),
        tie_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        dtype=check_dtype(dtype),
    )


# ------------------------------------------------------------------ tensors


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of an HF tensor name, e.g. `model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`."""
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}"


def _unpermute(w_NxR: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(n, 2, D//2, *rest).swapaxes(1, 2).reshape(w.shape)`
    on a Q or K weight [n*D, ...] (interleaved RoPE pairs -> half-split)."""
    half = w_NxR.shape[0] // n_head // 2
    return (w_NxR.reshape(n_head, half, 2, *w_NxR.shape[1:]).swapaxes(1, 2)
            .reshape(w_NxR.shape))


def _listing(names: list[str]) -> str:
    return f"{len(names)} tensors: {names[:5]}" + (" ..." if len(names) > 5 else "")


def _check_tensors(cfg: ModelConfig, specs: list[TensorSpec], tensors: dict, path: Path, gguf):
    expected = [gguf_name(s.hf_name) for s in specs]
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise InputError(f"GGUF {path} lacks {_listing(missing)}, which its metadata "
                         f"({cfg.name}) requires")
    unexpected = [n for n in tensors if n not in set(expected)]
    if unexpected:
        raise InputError(f"GGUF {path} has {_listing(unexpected)} that its metadata "
                         f"({cfg.name}) does not describe; is it for another architecture?")
    supported = _supported_types(gguf)
    for s, n in zip(specs, expected, strict=True):
        t = tensors[n]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != s.hf_shape:
            raise InputError(f"GGUF tensor {n!r} has shape {list(shape)}; its metadata "
                             f"requires {list(s.hf_shape)}")
        if t.tensor_type.name not in supported:
            raise InputError(f"GGUF tensor {n!r} has type {t.tensor_type.name}; allowed: "
                             f"{', '.join(supported)}")


# ------------------------------------------------------------------ tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tokenizer_from_gguf(reader) -> HFTokenizer | None:
    """A byte-level BPE `HFTokenizer` from the file's `tokenizer.ggml.*` metadata, or None if it
    has none.

    Built as transformers' GGUF loader builds it: vocabulary `tokenizer.ggml.tokens` (id = list
    index), merges `tokenizer.ggml.merges`, the split regex `tokenizer.ggml.pre` names, tokens
    of type CONTROL added as special tokens, USER_DEFINED ones as whole tokens; bos/eos/pad
    ids from `tokenizer.ggml.{bos,eos,padding}_token_id` (-1 where absent).

    Raises InputError for a tokenizer model other than "gpt2".
    """
    model = _meta(reader, "tokenizer.ggml.model", None)
    if model is None:
        return None
    if model != "gpt2":
        raise InputError(f"GGUF tokenizer.ggml.model={model!r}; allowed: 'gpt2' (byte-level "
                         "BPE)")
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("GGUF tokenizers need the `tokenizers` package: "
                          "pip install statejax[hf]") from e
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    merges = _meta(reader, "tokenizer.ggml.merges")
    types = _meta(reader, "tokenizer.ggml.token_type", [])
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    pt = tokenizers.pre_tokenizers
    split = _PRE_SPLITS.get(_meta(reader, "tokenizer.ggml.pre", None))
    backend.pre_tokenizer = (pt.ByteLevel(add_prefix_space=False) if split is None else
                             pt.Sequence([pt.Split(tokenizers.Regex(split), behavior="isolated"),
                                          pt.ByteLevel(add_prefix_space=False,
                                                       use_regex=False)]))
    backend.decoder = tokenizers.decoders.ByteLevel()
    # A CONTROL token outside the byte alphabet is a mislabel (not a real vocabulary entry).
    control = [t for t, k in zip(tokens, types, strict=False)
               if k == _CONTROL and set(t) <= alphabet]
    user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED and t in vocab]
    backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                                for t in control])
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                        for t in user])
    digest = hashlib.sha256("\n".join([*tokens, "", *merges]).encode("utf-8")).hexdigest()
    ids = [_meta(reader, f"tokenizer.ggml.{k}_token_id", -1) for k in ("bos", "eos", "padding")]
    for key, tid in zip(("bos", "eos", "padding"), ids, strict=True):
        if not (isinstance(tid, int) and -1 <= tid < len(tokens)):
            raise InputError(f"GGUF tokenizer.ggml.{key}_token_id={tid!r}; allowed: an id in "
                             f"[0, {len(tokens)})")
    return HFTokenizer(backend, name="gguf:" + digest[:12], bos_id=ids[0], eos_id=ids[1],
                       pad_id=ids[2])


# ------------------------------------------------------------------ load


def load_gguf_checkpoint(path: str | os.PathLike, *, dtype="float32") -> Checkpoint:
    """Loads a GGUF file (llama, qwen2 or qwen3 architecture) into statejax params.

    Args:
      path: the `.gguf` file.
      dtype: "float32" (default: dequantized values exactly, as transformers loads them) or
        "bfloat16"; every tensor is dequantized to float32, then cast.

    Returns:
      A `Checkpoint` (as `load_hf_checkpoint`'s): `params` leaves have the
      `statejax.model.llama` shapes, e.g. `layer_0/attn/q_proj/weight` [H, D, E];
      `tokenizer` from the file's metadata (or None); `chat_template` from
      `tokenizer.chat_template` (or None); `path` the file.

    Raises InputError for: a missing, truncated or non-GGUF file, an unsupported architecture,
    RoPE scaling or tokenizer model, missing or unexpected tensors, a tensor whose shape does not
    match the metadata or whose type `gguf` cannot dequantize (the message lists those it can),
    or a vocabulary larger than the embedding table.
    """
    gguf = _gguf()
    path = Path(path)
    reader = _open(path, gguf)
    cfg = config_from_gguf(reader, dtype=dtype, name=f"gguf:{path.stem}")
    tokenizer = tokenizer_from_gguf(reader)
    if tokenizer is not None:
        check_fits_vocab(tokenizer, cfg.vocab_size)
    chat_template = _meta(reader, "tokenizer.chat_template", None)
    specs = tensor_specs(cfg)
    tensors = {t.name: t for t in reader.tensors}
    _check_tensors(cfg, specs, tensors, path, gguf)  # before dequantizing anything
    arch = _meta(reader, "general.architecture")
    params: dict = {}
    for s in specs:
        t = tensors[gguf_name(s.hf_name)]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(s.hf_shape)
        if arch == "llama" and s.path[-2] in ("q_proj", "k_proj"):
            w = _unpermute(w, cfg.num_heads if s.path[-2] == "q_proj" else cfg.num_kv_heads)
        # jnp.array copies: no leaf aliases the file's mapping.
        leaf = jnp.array(w.reshape(s.shape), dtype=cfg.jnp_dtype)
        node = params
        for key in s.path[:-1]:
            node = node.setdefault(key, {})
        node[s.path[-1]] = leaf
    return Checkpoint(cfg=cfg, params=params, tokenizer=tokenizer,
                      chat_template=chat_template, path=path)
