"""Append attention: a chunk of T new tokens attends to its row's cells through a page table.

The contract is `statejax.attention`: query token t of row b sits at position n_b + t, its own
K/V is already written at cell n_b + t, and it attends to cells [0, min(n_b + t + 1, S)) of its
row. The kernel is the shared paged flash engine (`paged_flash`), run causal and unsplit; its
Hopper variant is `append_attention_mgpu`, chosen by `dispatch`.
"""

import functools

import jax

from statejax.errors import InputError

from .paged_flash import (
    BACKENDS,
    BlockSizes,
    cells_page_size,
    check_backend,
    check_page_offset,
    gather_pages,
    on_cells,
    paged_attention_partials,
    paged_attention_reference,
    validate_block_sizes,
    validate_paged,
)

__all__ = ["BlockSizes", "append_attention", "append_attention_cells",
           "append_attention_reference", "gather_pages"]


def append_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                               window: int | None = None):
    """Plain-JAX specification of `append_attention` (same arguments, same results)."""
    return paged_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B,
                                     window=window, causal=True)


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret", "backend",
                                             "page_offset", "poison_outputs",
                                             "contiguous_pages"))
def append_attention(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                     window: int | None = None, block_sizes: BlockSizes | None = None,
                     interpret: bool, backend: str = "triton", page_offset: int = 0,
                     poison_outputs: bool = False, contiguous_pages: bool = False):
    """Causal attention of a T-token chunk over paged cells that already hold the chunk.

    Args:
      q_BxTxHxD: queries (RoPE applied) of the tokens at positions [n_b, n_b + T).
      k_pool, v_pool: [num_pages, page_size, K, D] cell pools; H % K == 0.
      page_table_BxP: int32; row b's cell c is pool[page_table[b, c // page_size] +
        page_offset, c % page_size]. Entries past a row's last page are clamped into range,
        so they may hold anything.
      lengths_B: int32 n_b, cells of row b in use before the chunk.
      window: static S <= P * page_size (default P * page_size); token t of row b attends to
        cells [0, min(n_b + t + 1, S)).
      block_sizes: tiles; default `BlockSizes.for_append` of this shape.
      interpret: run the kernel in the Pallas interpreter (CPU) instead of compiling it.
      backend: "triton" (the Pallas Triton lowering). The Hopper variant is
        `dispatch.append_attention(..., backend="mosaic_gpu")`.
      page_offset: static int >= 0 added to every table entry: the layers of a stacked pool
        share one table (`paged_flash.cells_as_pool`), computed once per step.
      poison_outputs: test hook, see `paged_flash.paged_attention_partials`.
      contiguous_pages: see `paged_flash.paged_attention_partials`.

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32 (as `statejax.attention.attend`).
    """
    check_page_offset(page_offset)
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r}; allowed for append here: {BACKENDS} (the "
                         "Hopper variant: statejax.kernels.dispatch.append_attention with "
                         "backend='mosaic_gpu')")
    check_backend(backend, interpret)
    window = validate_paged(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window,
                            compiled=not interpret)
    _, t, h, d = q_BxTxHxD.shape
    page_size, k_heads = k_pool.shape[1], k_pool.shape[2]
    bs = block_sizes or BlockSizes.for_append(rows=t * (h // k_heads), head_dim=d,
                                              page_size=page_size)
    validate_block_sizes(bs, page_size)
    if bs.num_splits != 1:
        raise InputError("append_attention runs unsplit (num_splits=1); use "
                         "decode_attention for flash-decoding")
    out, lse = paged_attention_partials(
        q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window=window, causal=True,
        block_sizes=bs, out_dtype=q_BxTxHxD.dtype, interpret=interpret, backend=backend,
        page_offset=page_offset, poison_outputs=poison_outputs,
        contiguous_pages=contiguous_pages, name="statejax_append")
    return out[..., 0, :], lse[..., 0]


@functools.partial(jax.jit, static_argnames=("layer", "window", "block_sizes", "interpret",
                                             "backend"))
def append_attention_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
                           window: int, block_sizes: BlockSizes | None = None,
                           interpret: bool, backend: str = "triton"):
    """`append_attention` over contiguous cells, as `statejax.cache.AppendView` holds them.

    Args:
      q_BxTxHxD: queries of the chunk.
      k_cells, v_cells: [L, B, C, K, D] (pass `layer`) or [B, C, K, D], chunk already written.
      lengths_B: int32 cells in use before the chunk.
      layer: static layer index for 5-D cells.
      window: static S <= C.
      block_sizes, interpret, backend: as `append_attention`; default tiles are chosen at the
        finest page size any tile fits, then the cells are viewed as pages of one KV block.

    Returns:
      out_BxTxHxD, lse_BxTxH.
    """
    if block_sizes is None:
        _, t, h, d = q_BxTxHxD.shape
        block_sizes = BlockSizes.for_append(rows=t * (h // k_cells.shape[-2]), head_dim=d,
                                            page_size=cells_page_size(k_cells.shape[-3], 16))
    return on_cells(append_attention, q_BxTxHxD, k_cells, v_cells, lengths_B, layer=layer,
                    window=window, block_sizes=block_sizes, interpret=interpret,
                    backend=backend, contiguous_pages=True)
