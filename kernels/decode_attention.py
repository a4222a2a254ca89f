"""Paged decode attention (flash-decoding): T = 1..a few tokens per row over ragged lengths.

Same contract as `append_attention` (token t of row b attends to cells [0, n_b + t], its own
K/V already written), tuned for few query rows and long contexts: the shared paged flash engine
(`paged_flash`) runs with a split axis, grid (row, kv-head, query block — one when
T x G <= 64 — , split), so one long session still fills the GPU. Each split reads its share of
the row's KV blocks once and writes a partial (out, lse) in float32; a split past a row's
length reads nothing and writes an empty partial (out 0, lse MASK_VALUE). `combine_splits`
merges the partials by log-sum-exp in plain JAX. The Hopper variant is `decode_attention_mgpu`,
chosen by `dispatch`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from statejax import platform
from statejax.errors import InputError

from . import paged_flash as pf
from . import tuned
from .paged_flash import BlockSizes, combine_splits

__all__ = ["BlockSizes", "combine_splits", "decode_attention", "decode_attention_cells",
           "decode_attention_reference", "default_block_sizes", "default_splits",
           "tuned_block_sizes"]

# Programs to aim for: a few waves over a Hopper GPU's SMs.
_TARGET_PROGRAMS = 512
# Bytes of one K block per KV step: the smallest steps measured fastest (docs/kernels.md).
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
    block_q = min(64, max(16, pf._next_pow2(rows)))
    cells = min(128, max(16, _KV_BLOCK_BYTES // (head_dim * itemsize)))
    block_k = pf.kv_block(1 << (cells.bit_length() - 1), page_size)
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


def decode_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                               window: int | None = None):
    """Reference of `decode_attention`: the same contract as append attention."""
    return pf.paged_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B,
                                        window=window, causal=True)


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
      block_sizes: tiles and splits; default `default_block_sizes` of this shape.
      interpret, page_offset, poison_outputs, contiguous_pages: as
        `append_attention.append_attention`.
      backend: "triton". The Hopper variant is `dispatch.decode_attention(...,
        backend="mosaic_gpu")`.

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32.
    """
    pf.check_page_offset(page_offset)
    if backend not in pf.BACKENDS:
        raise InputError(f"backend={backend!r}; allowed for decode here: {pf.BACKENDS} (the "
                         "Hopper variant: statejax.kernels.dispatch.decode_attention with "
                         "backend='mosaic_gpu')")
    pf.check_backend(backend, interpret)
    window = pf.validate_paged(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window,
                               compiled=not interpret)
    b, t, h, d = q_BxTxHxD.shape
    page_size, k_heads = k_pool.shape[1], k_pool.shape[2]
    bs = block_sizes or default_block_sizes(batch=b, rows=t * (h // k_heads), k_heads=k_heads,
                                            head_dim=d, page_size=page_size, window=window,
                                            itemsize=q_BxTxHxD.dtype.itemsize)
    pf.validate_block_sizes(bs, page_size)
    out, lse = pf.paged_attention_partials(
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
    if block_sizes is None:  # tiles first (measured ones included), then the page size
        b, t, h, d = q_BxTxHxD.shape
        k_heads = k_cells.shape[-2]
        block_sizes = default_block_sizes(
            batch=b, rows=t * (h // k_heads), k_heads=k_heads, head_dim=d,
            page_size=pf.cells_page_size(k_cells.shape[-3], 16), window=window,
            itemsize=q_BxTxHxD.dtype.itemsize)
    return pf.on_cells(decode_attention, q_BxTxHxD, k_cells, v_cells, lengths_B, layer=layer,
                       window=window, block_sizes=block_sizes, interpret=interpret,
                       backend=backend, contiguous_pages=True)
