"""Shared-prefix (cascade) attention: R branches of one session over its cells and their own.

Every branch r (a query, a flash query) has T tokens that attend to (a) the session's shared
cells [0, n) and (b) its private cells [0, m_r + t] (causal; its own K/V already written).
The two key sets are disjoint, so the result is exact by log-sum-exp merge:

- shared part: the R x T queries are folded into the query rows of ONE paged flash call over
  the session's pages (batch 1, non-causal, rows = R x T x G per kv-head), so the shared cells
  are read once per query block for all branches instead of once per branch; long prefixes
  are split along the sequence as in flash-decoding;
- private part: the paged flash engine with the branches as rows over their own pages;
- merge: exact by log-sum-exp. When a branch's T x G query rows fill whole query tiles the
  private kernel merges the shared splits into its own result in its epilogue (one launch,
  output in q's dtype); otherwise the private part is one more float32 partial and
  `paged_flash.combine_splits` merges them all;
- one kernel (`fuses`): with one shared split and each query tile within one branch, each
  program attends to the shared cells and then to its branch's own in one online softmax
  (`paged_flash.PrefixCells`): no partial is written, nothing merged, one launch.

The shared splits' partial outputs are written in q's dtype (their log-sum-exps in float32)
and merged in float32, as vLLM's paged attention keeps its split outputs: at long contexts the
partials are most of a query step's bytes beyond the weights and cells (docs/kernels.md). The
Mosaic GPU shared part writes float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from statejax import attention, platform
from statejax.errors import InputError

from . import decode_attention as da
from . import decode_attention_mgpu as dm
from . import mosaic_common as mc
from . import paged_flash as pf
from . import tuned

__all__ = ["BlockSizes", "cascade_attention", "cascade_attention_cells",
           "cascade_attention_reference", "fuses", "measured_backends"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the two kernel calls.

    Attributes:
      shared: tiles (with splits) of the folded shared-prefix call (`MosaicDecodeBlockSizes`
        with `backend="mosaic_gpu"`).
      private: tiles of the per-branch private call (unsplit).
    """

    shared: "pf.BlockSizes | dm.MosaicDecodeBlockSizes"
    private: pf.BlockSizes

    @classmethod
    def for_shape(cls, *, branches: int, tokens: int, group: int, k_heads: int, head_dim: int,
                  shared_page_size: int, shared_window: int, private_page_size: int,
                  itemsize: int = 2, backends: tuple[str, ...] = ("triton",)) -> "BlockSizes":
        """Tiles measured for this shape on the GPU model compiled for (`measured`, of these
        `backends`), else the Triton rule: shared: decode-style splits over one row of
        R x T x G query rows per kv-head, with full-size query tiles when the rows exceed
        one; private: append tiles for T x G rows per branch. `itemsize`: bytes per cell
        element."""
        found = cls.measured(branches=branches, tokens=tokens, group=group, k_heads=k_heads,
                             head_dim=head_dim, shared_page_size=shared_page_size,
                             shared_window=shared_window, private_page_size=private_page_size,
                             itemsize=itemsize, backends=backends)
        if found is not None:
            return found
        rows = branches * tokens * group
        shared = da.default_block_sizes(batch=1, rows=rows, k_heads=k_heads, head_dim=head_dim,
                                        page_size=shared_page_size, window=shared_window,
                                        itemsize=itemsize)
        if rows > shared.block_q:  # many rows: use full-size query tiles
            shared = dataclasses.replace(shared, block_q=min(128, pf._next_pow2(rows)),
                                         num_warps=8 if head_dim >= 128 else 4)
        private = pf.BlockSizes.for_append(rows=tokens * group, head_dim=head_dim,
                                           page_size=private_page_size)
        return cls(shared=shared, private=private)

    @classmethod
    def for_mosaic(cls, *, branches: int, tokens: int, group: int, k_heads: int,
                   head_dim: int, shared_page_size: int, shared_window: int,
                   private_page_size: int, itemsize: int = 2) -> "BlockSizes":
        """Tiles with the shared part on the Mosaic GPU decode kernel: measured ones for this
        shape on the GPU model compiled for (`measured`), else
        `MosaicDecodeBlockSizes.for_decode` of its rows and the private part as
        `for_shape`."""
        found = cls.measured(branches=branches, tokens=tokens, group=group, k_heads=k_heads,
                             head_dim=head_dim, shared_page_size=shared_page_size,
                             shared_window=shared_window, private_page_size=private_page_size,
                             itemsize=itemsize, backends=("mosaic_gpu",))
        if found is not None:
            return found
        shared = dm.MosaicDecodeBlockSizes.for_decode(
            batch=1, k_heads=k_heads, head_dim=head_dim, page_size=shared_page_size,
            window=shared_window, rows=branches * tokens * group)
        private = pf.BlockSizes.for_append(rows=tokens * group, head_dim=head_dim,
                                           page_size=private_page_size)
        return cls(shared=shared, private=private)

    @classmethod
    def for_cells(cls, *, branches: int, tokens: int, group: int, k_heads: int,
                  head_dim: int, cells: int, branch_cells: int, shared_window: int,
                  itemsize: int, backend: str | None, interpret: bool) -> "BlockSizes":
        """The default tiles of `cascade_attention_cells` over C = `cells` session cells and
        Tb = `branch_cells` branch cells (T where the branches' K/V come from q's buffer):
        chosen (measured ones included, whatever their KV block) at the finest page size
        any tile fits, as the cells are then viewed as pages of one KV block. `backend`
        "mosaic_gpu": `for_mosaic`; "triton": `for_shape` of Triton tiles; None: of the
        backends `measured_backends` allows."""
        shape = dict(branches=branches, tokens=tokens, group=group, k_heads=k_heads,
                     head_dim=head_dim, shared_page_size=pf.cells_page_size(cells, 16),
                     shared_window=shared_window,
                     private_page_size=pf.cells_page_size(branch_cells, 16), itemsize=itemsize)
        if backend == "mosaic_gpu":
            return cls.for_mosaic(**shape)
        return cls.for_shape(**shape, backends=("triton",) if backend else measured_backends(
            interpret=interpret, rows=branches * tokens * group, head_dim=head_dim,
            itemsize=itemsize, page_size=None))

    @classmethod
    def measured(cls, *, branches: int, tokens: int, group: int, k_heads: int, head_dim: int,
                 shared_page_size: int, shared_window: int, private_page_size: int,
                 itemsize: int = 2,
                 backends: tuple[str, ...] = ("triton",)) -> "BlockSizes | None":
        """The tiles `kernels/tuned/` holds for this shape on the GPU model compiled for, or
        None: of the entries of these `backends` at the nearest window, the fastest (a
        "mosaic_gpu" entry gives a `MosaicDecodeBlockSizes` shared part). Shared splits are
        the measured ones near the measured window, else the split rule of its backend
        applied to the measured tiles."""
        found = tuned.lookup(
            "cascade", dict(branches=branches, tokens=tokens, group=group, k_heads=k_heads,
                            head_dim=head_dim, itemsize=itemsize), shared_window,
            device_kind=platform.device_kind(), backends=backends,
            usable=lambda bs: (tuned.fits_pages(bs["shared"], shared_page_size)
                               and tuned.fits_pages(bs["private"], private_page_size)
                               and bs["private"]["num_splits"] == 1))
        if found is None:
            return None
        bs = cls.from_dict(found.block_sizes, found.backend)
        if found.keep_splits:
            return bs
        if found.backend == "mosaic_gpu":
            splits = dm.default_splits(batch=1, k_heads=k_heads, block_k=bs.shared.block_k,
                                       window=shared_window)
        else:
            splits = da.default_splits(batch=1, rows=branches * tokens * group,
                                       k_heads=k_heads, block_q=bs.shared.block_q,
                                       block_k=bs.shared.block_k, window=shared_window)
        return dataclasses.replace(bs, shared=dataclasses.replace(bs.shared, num_splits=splits))

    @classmethod
    def from_dict(cls, block_sizes: dict, backend: str = "triton") -> "BlockSizes":
        """Tiles as a tuned entry records them ({"shared": ..., "private": ...}, the shared
        fields those of `backend`'s tiles)."""
        shared = dm.MosaicDecodeBlockSizes if backend == "mosaic_gpu" else pf.BlockSizes
        return cls(shared=shared(**block_sizes["shared"]),
                   private=pf.BlockSizes(**block_sizes["private"]))


def fuses(branches: int, tokens: int, group: int, shared: "pf.BlockSizes") -> bool:
    """Whether `cascade_attention` runs as one kernel: Triton shared tiles with one split,
    and each query tile within one branch (one branch, or T x G rows a multiple of the
    tile), so every tile reads the shared cells once, as the shared call's folded tiles
    would. Each program then attends to the shared cells and its branch's own in one online
    softmax, with the shared tiles (their query rows, warps and stages, KV step over the
    shared cells) and the private part's KV step over the branch cells."""
    return (isinstance(shared, pf.BlockSizes) and shared.num_splits == 1
            and (branches == 1 or (tokens * group) % shared.block_q == 0))


def measured_backends(*, interpret: bool, rows: int, head_dim: int, itemsize: int,
                      page_size: int | None) -> tuple[str, ...]:
    """Backends a call may take from the measured tiles (`backend=None`): Triton, and the
    Mosaic GPU shared part where that kernel runs the call (compiled, R x T x G <= 128
    folded rows, `mosaic_common.runs`: 16-bit cells, D a multiple of 64 up to 256, shared
    pages of 8k cells up to 256 or contiguous cells (`page_size` None), a CUDA runtime it
    compiles correctly on). Only a GPU model's table can name it."""
    mosaic = (not interpret and rows <= dm.MAX_ROWS
              and mc.runs(itemsize=itemsize, head_dim=head_dim, page_size=page_size))
    return ("triton", "mosaic_gpu") if mosaic else ("triton",)


@functools.partial(jax.jit, static_argnames=("shared_window", "branch_window", "block_sizes",
                                             "interpret", "backend", "shared_page_offset",
                                             "branch_page_offset", "poison_outputs", "heads",
                                             "contiguous_pages"))
def cascade_attention(q_RxTxHxD, shared_k_pool, shared_v_pool, shared_page_table_P, shared_len,
                      branch_k_pool, branch_v_pool, branch_page_table_RxPb, branch_lengths_R, *,
                      shared_window: int | None = None, branch_window: int | None = None,
                      block_sizes: BlockSizes | None = None, interpret: bool,
                      backend: str | None = "triton", shared_page_offset: int = 0,
                      branch_page_offset: int = 0, poison_outputs: bool = False,
                      heads: pf.HeadLayout | None = None, contiguous_pages: bool = False):
    """R branches of one session: shared cells read once for all, private cells per branch.

    Args:
      q_RxTxHxD: queries; branch r's token t sits at position n + m_r + t.
      shared_k_pool, shared_v_pool: [num_pages, page_size, K, D] pool of the session's cells.
      shared_page_table_P: int32 [P] the session's pages.
      shared_len: int32 scalar n: shared cells [0, n) are attended (0 is allowed).
      branch_k_pool, branch_v_pool: [num_pages_b, page_size_b, K, D] pool of branch cells,
        already holding this step's tokens; or `branch_v_pool` None and `branch_k_pool`
        [num_pages_b, page_size_b, 2K, D], each cell's K heads then its V heads in one
        buffer (as `statejax.cache.BranchView` keeps them).
      branch_page_table_RxPb: int32 pages of each branch.
      branch_lengths_R: int32 m_r, private cells of branch r in use before this step.
      shared_window: static S <= P * page_size (default P * page_size).
      branch_window: static Tb <= Pb * page_size_b (default Pb * page_size_b).
      block_sizes: default `BlockSizes.for_shape` of this shape (with `backend="mosaic_gpu"`
        its `shared` part is a `MosaicDecodeBlockSizes`).
      interpret, poison_outputs: as `append_attention.append_attention`.
      backend: "triton", or "mosaic_gpu": the shared part on the Mosaic GPU decode kernel
        (`decode_attention_mgpu.decode_partials_mgpu`, non-causal; Hopper, compiled only,
        bf16/f16, D % 64 == 0, R x T x G <= 128 rows, no poisoning), the private part and
        the merge on Triton as ever; or None: the backend of `block_sizes`, and by default
        the fastest measured for this shape on the GPU model compiled for
        (`BlockSizes.measured` over `measured_backends`; Triton where none is recorded).
      shared_page_offset, branch_page_offset: static offsets added to the entries of the
        two tables (`append_attention.append_attention`'s `page_offset`).
      heads: where q's and the branch pool's heads sit (`paged_flash.HeadLayout`;
        default `HeadLayout.of(q, branch_k_pool, branch_v_pool)`): q may hold more heads
        than its H queries, as a first-token branch's q/k/v buffer, which is then its
        branch pool too (`cascade_attention_cells` with `branch_k` None). The shared pools
        hold K heads each.
      contiguous_pages: both tables' rows are their first entry and its successors
        (`paged_flash.paged_attention_partials`; Triton parts only).

    Returns:
      out_RxTxHxD (H heads) in q's dtype, lse_RxTxH float32 over shared + private keys.
    """
    pf.check_page_offset(shared_page_offset)
    pf.check_page_offset(branch_page_offset)
    if shared_page_table_P.ndim != 1:
        raise InputError(f"shared_page_table must be [P], got {shared_page_table_P.shape}")
    if jnp.shape(shared_len) != () or jnp.asarray(shared_len).dtype != jnp.int32:
        raise InputError("shared_len must be an int32 scalar")
    if q_RxTxHxD.ndim != 4 or branch_k_pool.ndim != 4 or shared_k_pool.ndim != 4:
        raise InputError(f"q must be [R, T, H, D] and the pools [num_pages, page_size, K, D], "
                         f"got {q_RxTxHxD.shape}, {shared_k_pool.shape}, {branch_k_pool.shape}")
    heads = heads or pf.HeadLayout.of(q_RxTxHxD, branch_k_pool, branch_v_pool)
    r, t, _, d = q_RxTxHxD.shape
    h = heads.q_heads
    shared_heads = pf.HeadLayout(h, shared_k_pool.shape[2])
    shared_window = pf.validate_paged(
        q_RxTxHxD[:1], shared_k_pool, shared_v_pool, shared_page_table_P[None],
        jnp.reshape(shared_len, (1,)), shared_window, compiled=not interpret,
        heads=shared_heads)
    branch_window = pf.validate_paged(
        q_RxTxHxD, branch_k_pool, branch_v_pool, branch_page_table_RxPb, branch_lengths_R,
        branch_window, compiled=not interpret, heads=heads)
    if (heads.kv_heads, branch_k_pool.shape[3]) != shared_k_pool.shape[2:]:
        raise InputError(f"shared and branch pools differ in [K, D]: {shared_k_pool.shape[2:]} "
                         f"vs {(heads.kv_heads, branch_k_pool.shape[3])}")
    k_heads = shared_k_pool.shape[2]
    shape = dict(branches=r, tokens=t, group=h // k_heads, k_heads=k_heads, head_dim=d,
                 shared_page_size=shared_k_pool.shape[1], shared_window=shared_window,
                 private_page_size=branch_k_pool.shape[1], itemsize=q_RxTxHxD.dtype.itemsize)
    if backend is None:  # the measured choice, or the backend of the given tiles
        block_sizes = block_sizes or BlockSizes.for_shape(**shape, backends=measured_backends(
            interpret=interpret or poison_outputs, rows=r * t * (h // k_heads), head_dim=d,
            itemsize=shape["itemsize"], page_size=shape["shared_page_size"]))
        backend = ("mosaic_gpu" if isinstance(block_sizes.shared, dm.MosaicDecodeBlockSizes)
                   else "triton")
    if backend not in tuned.SHARED_TILES:
        raise InputError(f"backend={backend!r}; allowed for the cascade: "
                         f"{(*tuned.SHARED_TILES, None)} (None: the measured choice)")
    mosaic = backend == "mosaic_gpu"
    if mosaic:
        mc.check_device()  # compiled only: raises where no Hopper GPU compiles it
        if interpret or poison_outputs:
            raise InputError("backend='mosaic_gpu' runs compiled only (interpret=False) and "
                             "has no poison_outputs hook; use backend='triton' for those")
    pf.check_backend("triton" if mosaic else backend, interpret)
    if mosaic and r * t * (h // k_heads) > dm.MAX_ROWS:
        raise InputError(f"R x T x G = {r * t * (h // k_heads)} shared query rows; "
                         f"backend='mosaic_gpu' holds at most {dm.MAX_ROWS} (use 'triton')")
    bs = block_sizes or (BlockSizes.for_mosaic(**shape) if mosaic
                         else BlockSizes.for_shape(**shape))
    if mosaic != isinstance(bs.shared, dm.MosaicDecodeBlockSizes):
        raise InputError(f"backend={backend!r} takes shared tiles of type "
                         f"{'MosaicDecodeBlockSizes' if mosaic else 'BlockSizes'}, got "
                         f"{type(bs.shared).__name__}")
    if not mosaic:
        pf.validate_block_sizes(bs.shared, shared_k_pool.shape[1])
    pf.validate_block_sizes(bs.private, branch_k_pool.shape[1])
    if bs.private.num_splits != 1:
        raise InputError("the private part runs unsplit: block_sizes.private.num_splits=1")

    common = dict(interpret=interpret, poison_outputs=poison_outputs,
                  contiguous_pages=contiguous_pages)
    g = h // k_heads
    if not mosaic and fuses(r, t, g, bs.shared):
        # One kernel: each program attends to the shared cells, then to its branch's own,
        # in one online softmax (nothing written between, nothing merged after).
        tiles = dataclasses.replace(bs.shared, block_k=bs.private.block_k)
        tokens_out = pf.token_tiles(g, tiles.block_q) and q_RxTxHxD.shape[2] % g == 0
        out, lse = pf.paged_flash_folded(
            q_RxTxHxD, branch_k_pool, branch_v_pool, branch_page_table_RxPb, branch_lengths_R,
            window=branch_window, causal=True, block_sizes=tiles, out_dtype=q_RxTxHxD.dtype,
            page_offset=branch_page_offset, heads=heads, tokens_out=tokens_out,
            prefix=pf.PrefixCells(shared_k_pool, shared_v_pool, shared_page_table_P,
                                  shared_len, shared_window, bs.shared.block_k,
                                  shared_page_offset, shared_heads, contiguous_pages,
                                  bs.shared.preload_pages),
            name="statejax_cascade", **common)
        return (out if tokens_out else pf.unfold_rows(out[:, :, 0], t, h),
                pf.unfold_rows(lse[:, :, 0], t, h))
    # Shared part: all R x T queries folded into the rows of one batch row (row r's query
    # rows follow row r - 1's), partials per split in q's dtype (Mosaic GPU: float32).
    shared_args = (q_RxTxHxD.reshape(1, r * t, -1, d), shared_k_pool, shared_v_pool,
                   shared_page_table_P[None], jnp.reshape(shared_len, (1,)))
    if mosaic:
        out_s, lse_s = dm.decode_partials_mgpu(shared_args[0][:, :, :h], *shared_args[1:],
                                               window=shared_window, block_sizes=bs.shared,
                                               causal=False, page_offset=shared_page_offset)
    else:
        out_s, lse_s = pf.paged_flash_folded(
            *shared_args, window=shared_window, causal=False, block_sizes=bs.shared,
            out_dtype=q_RxTxHxD.dtype, page_offset=shared_page_offset, heads=shared_heads,
            name="statejax_cascade_shared", **common)
    private = dict(window=branch_window, causal=True, block_sizes=bs.private,
                   page_offset=branch_page_offset, heads=heads,
                   name="statejax_cascade_private", **common)
    if pf.merges_earlier(r, t, h // k_heads, bs.private.block_q, earlier_rows=out_s.shape[3]):
        # The private kernel merges the shared splits into its own result (one launch, no
        # merge kernels after it) and writes q's dtype, in q's layout where its tiles are
        # whole tokens (no transpose after it).
        tokens_out = (pf.token_tiles(h // k_heads, bs.private.block_q)
                      and q_RxTxHxD.shape[2] % (h // k_heads) == 0)
        out, lse = pf.paged_flash_folded(
            q_RxTxHxD, branch_k_pool, branch_v_pool, branch_page_table_RxPb, branch_lengths_R,
            out_dtype=q_RxTxHxD.dtype, earlier=(out_s, lse_s), tokens_out=tokens_out,
            **private)
        return (out if tokens_out else pf.unfold_rows(out[:, :, 0], t, h),
                pf.unfold_rows(lse[:, :, 0], t, h))
    # Padded query tiles (e.g. one token of a small GQA group): the private part is one more
    # float32 partial, merged with the shared splits in one log-sum-exp.
    out_p, lse_p = pf.unfold_partials(*pf.paged_flash_folded(
        q_RxTxHxD, branch_k_pool, branch_v_pool, branch_page_table_RxPb, branch_lengths_R,
        out_dtype=jnp.float32, **private), t, h)
    out_s, lse_s = pf.unfold_partials(out_s.astype(jnp.float32), lse_s, r * t, h)
    out_s, lse_s = out_s.reshape(r, t, h, -1, d), lse_s.reshape(r, t, h, -1)
    return pf.combine_splits(jnp.concatenate([out_s, out_p], axis=3),
                             jnp.concatenate([lse_s, lse_p], axis=3), q_RxTxHxD.dtype)


@functools.partial(jax.jit, static_argnames=("layer", "shared_window", "block_sizes",
                                             "interpret", "backend", "q_heads"))
def cascade_attention_cells(q_RxTxHxD, shared_k, shared_v, row, shared_len, branch_k,
                            branch_v, branch_lengths_R, *, layer: int | None,
                            shared_window: int, block_sizes: BlockSizes | None = None,
                            interpret: bool, backend: str | None = "triton",
                            q_heads: int | None = None):
    """`cascade_attention` over contiguous cells, as `statejax.cache.BranchView` holds them.

    Args:
      q_RxTxHxD: branch queries; with `q_heads`, a first-token step's q/k/v buffer
        [R, T, q_heads + 2K, D] (query heads, then K's, then V's).
      shared_k, shared_v: session cells [L, B, C, K, D] (with `layer`) or [B, C, K, D].
      row: int32 scalar, the session row the branches extend.
      shared_len: int32 scalar n.
      branch_k, branch_v: branch cells [L, R, Tb, K, D] (with `layer`) or [R, Tb, K, D];
        or `branch_v` None and `branch_k` [L, R, Tb, 2K, D] (or [R, Tb, 2K, D]): each cell's
        K heads then its V heads, as `statejax.cache.BranchView` keeps them; or both None
        with `q_heads`: branches with no private cells before this step, whose private
        keys are the step's own K and V, read from q's buffer (no cells written).
      branch_lengths_R: int32 private cells in use before this step (None with `q_heads`:
        zero).
      layer: static layer index for 5-D cells.
      shared_window: static S <= C, n <= S.
      block_sizes, interpret, backend: as `cascade_attention` (backend None: the measured
        choice).
      q_heads: H where q is a q/k/v buffer (above); None: q holds the H queries only.

    Returns:
      out_RxTxHxD (H heads), lse_RxTxH.
    """
    r, t, _, d = q_RxTxHxD.shape
    k_heads = shared_k.shape[-2]
    h = q_RxTxHxD.shape[2] if q_heads is None else q_heads
    fresh = branch_k is None
    if fresh != (q_heads is not None) or (fresh and (branch_v is not None
                                                     or branch_lengths_R is not None)):
        raise InputError("branch cells (branch_k) or q's own K and V (q_heads, with branch_v "
                         "and branch_lengths None): one of the two")
    if fresh and q_RxTxHxD.shape[2] != h + 2 * k_heads:
        raise InputError(f"a q/k/v buffer holds {h} + 2 x {k_heads} heads, got "
                         f"{q_RxTxHxD.shape}")
    c, tb = shared_k.shape[-3], t if fresh else branch_k.shape[-3]
    block_sizes = block_sizes or BlockSizes.for_cells(
        branches=r, tokens=t, group=h // k_heads, k_heads=k_heads, head_dim=d, cells=c,
        branch_cells=tb, shared_window=shared_window, itemsize=q_RxTxHxD.dtype.itemsize,
        backend=backend, interpret=interpret)
    mosaic = isinstance(block_sizes.shared, dm.MosaicDecodeBlockSizes)
    # One page per KV block, but a Mosaic page is one TMA box: at most 256 cells.
    shared_ps = pf.cells_page_size(c, min(block_sizes.shared.block_k, 256) if mosaic
                                   else block_sizes.shared.block_k)
    branch_ps = pf.cells_page_size(tb, block_sizes.private.block_k)
    rows = jnp.reshape(jnp.asarray(row, jnp.int32), (1,))
    sk_pool, s_table, s_offset = pf.cells_as_pool(shared_k, layer=layer, rows=rows,
                                                  window=shared_window, page_size=shared_ps)
    sv_pool, _, _ = pf.cells_as_pool(shared_v, layer=layer, rows=rows, window=shared_window,
                                     page_size=shared_ps)
    heads = None
    if fresh:  # q's buffer is the branch pool: K at head H + k, V at H + K + k
        heads = pf.HeadLayout(h, k_heads, h, h + k_heads)
        branch_k, branch_lengths_R = q_RxTxHxD, jnp.zeros((r,), jnp.int32)
    bk_pool, b_table, b_offset = pf.cells_as_pool(branch_k, layer=None if fresh else layer,
                                                  rows=None, window=tb, page_size=branch_ps)
    bv_pool = None if branch_v is None else pf.cells_as_pool(
        branch_v, layer=layer, rows=None, window=tb, page_size=branch_ps)[0]
    return cascade_attention(q_RxTxHxD, sk_pool, sv_pool, s_table[0], shared_len, bk_pool,
                             bv_pool, b_table, branch_lengths_R, shared_window=shared_window,
                             branch_window=tb, block_sizes=block_sizes, interpret=interpret,
                             backend=backend, shared_page_offset=s_offset,
                             branch_page_offset=b_offset, heads=heads,
                             contiguous_pages=True)


def cascade_attention_reference(q_RxTxHxD, shared_k_pool, shared_v_pool, shared_page_table_P,
                                shared_len, branch_k_pool, branch_v_pool,
                                branch_page_table_RxPb, branch_lengths_R, *,
                                shared_window: int | None = None,
                                branch_window: int | None = None):
    """Specification of `cascade_attention`: ONE `attend` per branch over the concatenation
    of the shared cells and its private cells (no merge), masked as the contract says.

    Returns:
      out_RxTxHxD in q's dtype, lse_RxTxH float32.
    """
    r, t = q_RxTxHxD.shape[:2]
    s = shared_window or shared_page_table_P.shape[0] * shared_k_pool.shape[1]
    tb = branch_window or branch_page_table_RxPb.shape[1] * branch_k_pool.shape[1]
    shared_table = jnp.broadcast_to(shared_page_table_P, (r, shared_page_table_P.shape[0]))
    k = jnp.concatenate([pf.gather_pages(shared_k_pool, shared_table, s),
                         pf.gather_pages(branch_k_pool, branch_page_table_RxPb, tb)], axis=1)
    v = jnp.concatenate([pf.gather_pages(shared_v_pool, shared_table, s),
                         pf.gather_pages(branch_v_pool, branch_page_table_RxPb, tb)], axis=1)
    shared_mask = jnp.arange(s, dtype=jnp.int32) < shared_len  # [S]
    q_idx_RxT = branch_lengths_R[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    private_mask = jnp.arange(tb, dtype=jnp.int32)[None, None, :] <= q_idx_RxT[:, :, None]
    mask = jnp.concatenate([jnp.broadcast_to(shared_mask, (r, t, s)), private_mask], axis=-1)
    return attention.attend(q_RxTxHxD, k, v, mask)

