"""Paged decode attention (flash-decoding): T = 1..a few tokens per row over ragged lengths.

Same contract as `append_attention` (token t of row b attends to cells [0, n_b + t], its own
K/V already written), tuned for few query rows and long contexts: the paged flash kernel of
`append_attention` runs with a split axis, grid (row, kv-head, query block — one when
T x G <= 64 — , split), so one long session still fills the GPU. Each split reads its share of
the row's KV blocks once and writes a partial (out, lse) in float32; a split past a row's
length reads nothing and writes an empty partial (out 0, lse MASK_VALUE). `combine_splits`
merges the partials by log-sum-exp in plain JAX.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from statejax import platform
from statejax.errors import InputError

from . import append_attention as aa
from . import tuned
from .append_attention import BlockSizes

__all__ = ["BlockSizes", "combine_splits", "decode_attention", "decode_attention_cells",
           "decode_attention_reference", "default_block_sizes", "default_splits",
           "tuned_block_sizes"]

# Programs to aim for: a few waves over an H100's 132 SMs.
_TARGET_PROGRAMS = 512


# Bytes of one K block per KV step. Measured on an H100 (2026-11-27, jax 0.11.2, bf16, 8 x 16k
# cells, D = 128; docs/results/kernel_bench_h100/triton_tune): 64-cell steps (16 KiB) took
# 0.22-0.28 ms over the grid's splits / warps / stages, 128 cells 0.29-0.34 ms, 256 cells
# 0.33-0.37 ms; these defaults (64 cells, 8 splits, 4 warps, 2 stages) 0.238 ms, 79% of the
# copy bandwidth measured in that run.
_KV_BLOCK_BYTES = 16 * 1024


def default_block_sizes(*, batch: int, rows: int, k_heads: int, head_dim: int,
                        page_size: int, window: int, itemsize: int = 2) -> BlockSizes:
    """Decode tiles for B rows of `rows` query rows (T x G) per kv-head over S cells.

    Tiles measured for this shape on the GPU model compiled for (`tuned`), else the rule:
    one query block holds all rows (up to 64); KV steps of `_KV_BLOCK_BYTES` per K block
    (64 cells at D = 128 in bf16, 128 at D = 64; 16..128 cells, at least a page); enough
    splits that B x K x splits reaches ~512 programs while every split keeps >= 2 KV blocks.
    """
    measured = tuned_block_sizes(batch=batch, rows=rows, k_heads=k_heads, head_dim=head_dim,
                                 page_size=page_size, window=window, itemsize=itemsize)
    if measured is not None:
        return measured
    block_q = min(64, max(16, aa._next_pow2(rows)))
    cells = min(128, max(16, _KV_BLOCK_BYTES // (head_dim * itemsize)))
    block_k = aa.kv_block(1 << (cells.bit_length() - 1), page_size)
    return BlockSizes(block_q=block_q, block_k=block_k,
                      num_splits=default_splits(batch=batch, rows=rows, k_heads=k_heads,
                                                block_q=block_q, block_k=block_k,
                                                window=window),
                      num_warps=4, num_stages=2)


def default_splits(*, batch: int, rows: int, k_heads: int, block_q: int, block_k: int,
                   window: int) -> int:
    """Splits so that B x K x query blocks x splits reaches ~512 programs, every split keeping
    >= 2 KV blocks."""
    num_blocks = pl.cdiv(window, block_k)
    programs = batch * k_heads * pl.cdiv(rows, block_q)
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, programs), num_blocks // 2))


def tuned_block_sizes(*, batch: int, rows: int, k_heads: int, head_dim: int, page_size: int,
                      window: int, itemsize: int = 2) -> BlockSizes | None:
    """The tiles `kernels/tuned/` holds for this call on the GPU model compiled for, or None
    (none recorded, or not compiling for a GPU). Splits are the measured ones near the
    measured window, else `default_splits` of the measured tiles."""
    found = tuned.lookup(
        "decode", dict(batch=batch, rows=rows, k_heads=k_heads, head_dim=head_dim,
                       itemsize=itemsize), window, device_kind=platform.device_kind(),
        usable=lambda tiles: tuned.fits_pages(tiles, page_size))
    if found is None:
        return None
    bs = BlockSizes(**found.block_sizes)
    if found.keep_splits:
        return bs
    return dataclasses.replace(bs, num_splits=default_splits(
        batch=batch, rows=rows, k_heads=k_heads, block_q=bs.block_q, block_k=bs.block_k,
        window=window))


def combine_splits(out_BxTxHxNxD, lse_BxTxHxN, dtype):
    """Log-sum-exp merge of N split partials.

    One variadic reduction over the split axis whose combiner merges two (lse, out) pairs
    exactly (an associative, commutative operation): XLA emits it as one kernel, where
    logsumexp-then-weights-then-sum took three.

    Args:
      out_BxTxHxNxD: partial outputs, each normalised over its split's keys.
      lse_BxTxHxN: their float32 log-sum-exps (MASK_VALUE for an empty split).
      dtype: dtype of the merged output.

    Returns:
      out_BxTxHxD in `dtype`, lse_BxTxH float32.
    """
    def merge(a, b):
        (lse_a, out_a), (lse_b, out_b) = a, b
        lse = jnp.logaddexp(lse_a, lse_b)
        return lse, jnp.exp(lse_a - lse) * out_a + jnp.exp(lse_b - lse) * out_b

    out = out_BxTxHxNxD.astype(jnp.float32)
    lse = jnp.broadcast_to(lse_BxTxHxN[..., None], out.shape)
    # The identity is an empty partial: finite MASK_VALUE, so two of them merge without NaN.
    identity = (jnp.float32(aa.MASK_VALUE), jnp.float32(0.0))
    lse, out = jax.lax.reduce((lse, out), identity, merge, (out.ndim - 2,))
    return out.astype(dtype), lse[..., 0]


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret", "backend",
                                             "page_offset", "poison_outputs",
                                             "contiguous_pages"))
def decode_attention(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                     window: int | None = None, block_sizes: BlockSizes | None = None,
                     interpret: bool, backend: str = "triton", page_offset: int = 0,
                     poison_outputs: bool = False, contiguous_pages: bool = False):
    """Flash-decoding over paged cells that already hold the T new tokens.

    Args:
      q_BxTxHxD: queries of the tokens at positions [n_b, n_b + T); T small (decode,
        speculative verification).
      k_pool, v_pool: [num_pages, page_size, K, D] cell pools; H % K == 0.
      page_table_BxP: int32 page of each page-sized group of row b's cells.
      lengths_B: int32 n_b, cells of row b in use before the T tokens (ragged).
      window: static S <= P * page_size (default P * page_size).
      block_sizes: tiles and splits; default `default_block_sizes` of this shape (for
        "mosaic_gpu": `decode_attention_mgpu.MosaicDecodeBlockSizes`).
      interpret, page_offset, poison_outputs, contiguous_pages: as
        `append_attention.append_attention`.
      backend: "triton" or "mosaic_gpu" (`decode_attention_mgpu`: Hopper, bf16/f16,
        T x H / K <= 128, compiled only, no poisoning).

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32.
    """
    aa.check_page_offset(page_offset)
    if backend == "mosaic_gpu":
        from . import decode_attention_mgpu as mgpu  # noqa: PLC0415 - it imports this module

        if interpret or poison_outputs:
            raise InputError("backend='mosaic_gpu' runs compiled only (interpret=False) and "
                             "has no poison_outputs hook; use backend='triton' for those")
        if block_sizes is not None and not isinstance(block_sizes,
                                                      mgpu.MosaicDecodeBlockSizes):
            raise InputError(f"backend='mosaic_gpu' takes MosaicDecodeBlockSizes, got "
                             f"{block_sizes}")
        return mgpu.decode_attention_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP,
                                          lengths_B, window=window, block_sizes=block_sizes,
                                          page_offset=page_offset)
    if backend not in aa.PAGED_BACKENDS:
        raise InputError(f"backend={backend!r}; allowed for decode: {aa.PAGED_BACKENDS}")
    aa.check_backend(backend, interpret)
    window = aa.validate_paged(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window,
                               compiled=not interpret)
    b, t, h, d = q_BxTxHxD.shape
    page_size, k_heads = k_pool.shape[1], k_pool.shape[2]
    bs = block_sizes or default_block_sizes(batch=b, rows=t * (h // k_heads), k_heads=k_heads,
                                            head_dim=d, page_size=page_size, window=window,
                                            itemsize=q_BxTxHxD.dtype.itemsize)
    aa.validate_block_sizes(bs, page_size)
    out, lse = aa.paged_attention_partials(
        q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window=window, causal=True,
        block_sizes=bs, out_dtype=jnp.float32, interpret=interpret, backend=backend,
        page_offset=page_offset, poison_outputs=poison_outputs,
        contiguous_pages=contiguous_pages, name="statejax_decode")
    return combine_splits(out, lse, q_BxTxHxD.dtype)


@functools.partial(jax.jit, static_argnames=("layer", "window", "block_sizes", "interpret",
                                             "backend"))
def decode_attention_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
                           window: int, block_sizes: BlockSizes | None = None,
                           interpret: bool, backend: str = "triton"):
    """`decode_attention` over contiguous cells [L, B, C, K, D] (with `layer`) or [B, C, K, D].

    Returns:
      out_BxTxHxD, lse_BxTxH.
    """
    c = k_cells.shape[-3]
    if block_sizes is None:
        # Tiles first (measured ones included) at the finest page size any tile fits; then
        # the cells are viewed as pages of one KV block.
        b, t, h, d = q_BxTxHxD.shape
        k_heads = k_cells.shape[-2]
        if backend == "mosaic_gpu":
            from . import decode_attention_mgpu as mgpu  # noqa: PLC0415 - it imports this

            block_sizes = mgpu.MosaicDecodeBlockSizes.for_decode(
                batch=b, k_heads=k_heads, head_dim=d, page_size=aa.cells_page_size(c, 16),
                window=window, rows=t * (h // k_heads))
        else:
            block_sizes = default_block_sizes(
                batch=b, rows=t * (h // k_heads), k_heads=k_heads, head_dim=d,
                page_size=aa.cells_page_size(c, 16), window=window,
                itemsize=q_BxTxHxD.dtype.itemsize)
    page_size = aa.cells_page_size(c, block_sizes.block_k)
    k_pool, table, offset = aa.cells_as_pool(k_cells, layer=layer, rows=None, window=window,
                                             page_size=page_size)
    v_pool, _, _ = aa.cells_as_pool(v_cells, layer=layer, rows=None, window=window,
                                    page_size=page_size)
    return decode_attention(q_BxTxHxD, k_pool, v_pool, table, lengths_B, window=window,
                            block_sizes=block_sizes, interpret=interpret, backend=backend,
                            page_offset=offset, contiguous_pages=True)


def decode_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                               window: int | None = None):
    """Reference of `decode_attention`: the same contract as append attention."""
    return aa.paged_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B,
                                        window=window, causal=True)
