"""Paged decode attention for Hopper on the Pallas Mosaic GPU backend (TMA-fed, split sequence).

Same contract and results as `decode_attention.decode_attention` (T = 1 .. a few tokens per row
over ragged lengths; token t of row b sees cells [0, min(n_b + t + 1, S))), built to stream
K/V at the copy bandwidth (docs/kernels.md). `dispatch` chooses it; the portable kernels never
import it (the cascade's shared part takes it by `backend="mosaic_gpu"`).

- Grid (kv-head, split, row); the T x G query rows that share a kv-head (GQA folded into rows,
  as in the Triton kernel) are one 64-row wgmma tile, or two (up to 128 rows: a 32-token
  question at G = 4), so each K/V block is read once for the whole group.
- A memory warpgroup keeps `max_concurrent_steps` K/V blocks in flight with TMA (pages gathered
  through the page table, one copy per page); one compute warpgroup per 64-row tile runs
  q @ k^T and p @ v on the tensor cores with an online softmax, and a slot is refilled once
  every compute warpgroup has released it. Decode is memory-bound: the 64-row tile wastes
  tensor-core work, not bytes.
- `decode_partials_mgpu(causal=False)`: every row sees the row's n cells, the shared part of
  `cascade_attention` (`backend="mosaic_gpu"`).
- Split s covers KV blocks [s * bps, (s + 1) * bps) of the row's visible blocks and writes a
  float32 partial (out, lse); a split with nothing to read writes out 0, lse MASK_VALUE.
  `decode_attention.combine_splits` merges them, as for the Triton kernel.

Compiled for Hopper through the public wrappers; on CPU, tests run it in jax's GPU interpreter
as `append_attention_mgpu` describes (same finite-cells requirement).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from statejax.errors import InputError

from . import append_attention_mgpu as amg
from . import mosaic_common as mc
from . import paged_flash as pf
from .paged_flash import combine_splits

_ROWS = 64  # query rows (T x G, padded) per compute warpgroup: one wgmma M tile
MAX_ROWS = 2 * _ROWS  # rows of one program: two compute warpgroups share its K/V stream
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_TARGET_PROGRAMS = 512  # a few waves over a Hopper GPU's SMs


@dataclasses.dataclass(frozen=True)
class MosaicDecodeBlockSizes:
    """Tiles of the Mosaic GPU decode kernel.

    Attributes:
      block_k: cells per KV step; a multiple of 64 and of the page size.
      max_concurrent_steps: K/V blocks in flight (shared-memory slots), >= 2.
      num_splits: splits of each row's sequence (grid axis).
    """

    block_k: int = 64
    max_concurrent_steps: int = 4
    num_splits: int = 1

    @classmethod
    def for_decode(cls, *, batch: int, k_heads: int, head_dim: int, page_size: int,
                   window: int, rows: int = _ROWS) -> "MosaicDecodeBlockSizes":
        """64-cell steps (128 at D = 64), as many in flight (<= 4) as shared memory holds
        for `rows` (<= 128) query rows; enough splits that B x K x splits reaches ~512
        programs while every split keeps >= 4 KV blocks."""
        block_k = max(128 if head_dim <= 64 else 64, page_size)
        splits = default_splits(batch=batch, k_heads=k_heads, block_k=block_k, window=window)
        for steps in (4, 3, 2):
            bs = cls(block_k=block_k, max_concurrent_steps=steps, num_splits=splits)
            if bs.smem_bytes(head_dim, 2, _padded_rows(rows)) <= mc.SMEM_LIMIT:
                break
        return bs

    def smem_bytes(self, head_dim: int, itemsize: int, rows: int = _ROWS) -> int:
        """Shared memory the kernel allocates for `rows` query rows (64 or 128), as
        `_entry` lays it out and the lowering aligns it (`mosaic_common.smem_bytes`): Q
        tiles, float32 out tiles, K and V slots, lse; ready and free barriers."""
        slots, wgs = self.max_concurrent_steps, rows // _ROWS
        kv = slots * self.block_k * head_dim * itemsize
        buffers = [rows * head_dim * itemsize, rows * head_dim * 4, kv, kv, rows * 4]
        return mc.smem_bytes(buffers, barriers=4 * slots + wgs)


def default_splits(*, batch: int, k_heads: int, block_k: int, window: int) -> int:
    """Splits so that B x K x splits reaches ~512 programs, every split keeping >= 4 KV
    blocks of `block_k` cells."""
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, batch * k_heads), pl.cdiv(window, block_k) // 4))


def _padded_rows(rows: int) -> int:
    """Query rows of a program: one 64-row warpgroup tile, or two."""
    return _ROWS if rows <= _ROWS else MAX_ROWS


def row_limit(n, query_row, *, group: int, num_tokens: int, window: int,
              causal: bool = True):
    """Cells [0, limit) visible to folded query row `query_row` (= token * group + head):
    causal, the row's token sees n + token + 1 cells; otherwise every row sees n."""
    if not causal:
        return jnp.minimum(n + 0 * query_row, window)
    token = lax.div(query_row, jnp.int32(group))
    return amg.key_limit(n, token, num_tokens=num_tokens, window=window)


def split_plan(n, split, *, blocks_per_split: int, group: int, num_tokens: int, window: int,
               block_k: int, causal: bool = True):
    """(first, steps): split `split` of a row reads KV blocks [first, first + steps), its
    share of the blocks any of the row's query tokens sees (steps 0: nothing to read)."""
    limit = row_limit(n, jnp.int32((num_tokens - 1) * group), group=group,
                      num_tokens=num_tokens, window=window, causal=causal)
    row_blocks = pl.cdiv(limit, jnp.int32(block_k))
    first = split * blocks_per_split
    return first, jnp.maximum(jnp.minimum(first + blocks_per_split, row_blocks) - first, 0)


def _kernel(len_ref, pt_ref, off_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped, *, bs,
            num_tokens, group, window, page_size, blocks_per_split, causal, num_wgs,
            ops: mc.KernelOps):
    """One (kv-head, split, row) program; refs are whole GMEM arrays.

    len_ref [B]; pt_ref [B, P] (padded); off_ref [1] page offset; q_ref [B, K, M, D] (folded
    rows, M = 64 x num_wgs); k_ref, v_ref [num_pages, page_size, K, D]; out_ref [B, K, N, M, D]
    float32; lse_ref [B, K, N, M] float32. Compute warpgroup w owns rows [64 w, 64 w + 64); the last
    warpgroup streams K/V for all of them, a slot freed once every compute warpgroup has
    consumed it.
    """
    block_k, steps_in_flight = bs.block_k, bs.max_concurrent_steps
    pages_per_block = block_k // page_size
    head_dim, dtype = q_ref.shape[-1], q_ref.dtype
    row = lax.axis_index("rows")
    kv_head = lax.axis_index("heads")
    split = lax.axis_index("splits")
    wg = lax.axis_index("wg")
    (q_smem2, o_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), \
        (k_free, v_free) = scoped
    n = len_ref[row]
    limits = functools.partial(row_limit, group=group, num_tokens=num_tokens, window=window,
                               causal=causal)
    first, steps = split_plan(n, split, blocks_per_split=blocks_per_split, group=group,
                              num_tokens=num_tokens, window=window, block_k=block_k,
                              causal=causal)

    @pl.when(wg < num_wgs)
    def _compute():
        q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]
        row0 = wg * _ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[row, kv_head, pl.ds(row0, _ROWS)], q_smem,
                                q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        mask = jnp.float32(pf.MASK_VALUE)  # finite: a row may see nothing in this split
        m_i = ops.layout(jnp.full((_ROWS,), mask, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = ops.layout(jnp.full((_ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = ops.layout(jnp.full((_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
        score_scale = head_dim**-0.5 * _LOG2E  # base-2 scores: exp2 of an FMA

        def kv_step(i, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(i, jnp.int32(steps_in_flight))
            plgpu.barrier_wait(k_ready.at[slot])

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            qk = pl.run_scoped(qk_scope, plgpu.ACC((_ROWS, block_k), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            rows = ops.iota((_ROWS, block_k), 0) + row0
            cells = ops.iota((_ROWS, block_k), 1) + (first + i) * block_k
            visible = cells < limits(n, rows)
            s = jnp.where(visible, qk * score_scale, mask)
            m_next = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_next)
            # A row with nothing visible yet has m_next == mask: its p must be 0, not 1.
            p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0])),
                          0.0)
            l_i = l_i * alpha + p.sum(axis=1)
            acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_ready.at[slot])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

            acc = ops.accumulate(acc, pv)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_next, l_i

        acc, m_i, l_i = lax.fori_loop(0, steps, kv_step, (acc, m_i, l_i))
        empty = l_i == 0.0
        denom = jnp.where(empty, 1.0, l_i)
        o_smem[...] = acc / lax.broadcast_in_dim(denom, acc.shape, [0])
        lse_smem[...] = jnp.where(empty, mask, m_i * _LN2 + jnp.log(denom))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[row, kv_head, split, pl.ds(row0, _ROWS)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[row, kv_head, split, pl.ds(row0, _ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == num_wgs)
    def _memory():
        def fetch(i, slot, src_ref, dst_smem, barrier):
            mc.fetch_block(pt_ref, off_ref, row, first + i, src_ref, dst_smem.at[slot],
                           barrier.at[slot], kv_head=kv_head, page_size=page_size,
                           pages_per_block=pages_per_block)

        def prefetch(i):  # fills slot i before any slot is released
            fetch(i, i, k_ref, k_smem, k_ready)
            fetch(i, i, v_ref, v_smem, v_ready)

        for i in range(steps_in_flight):
            pl.when(i < steps)(functools.partial(prefetch, i))

        @pl.loop(0, steps - steps_in_flight)
        def _(i):
            slot = lax.rem(i, jnp.int32(steps_in_flight))
            plgpu.barrier_wait(k_free.at[slot])
            fetch(i + steps_in_flight, slot, k_ref, k_smem, k_ready)
            plgpu.barrier_wait(v_free.at[slot])
            fetch(i + steps_in_flight, slot, v_ref, v_smem, v_ready)

        mc.drain_releases((k_free, v_free), steps, steps_in_flight)


def _entry(len_ref, pt_ref, off_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *, bs, page_size,
           num_wgs, **static):
    head_dim, dtype = q_ref.shape[-1], q_ref.dtype
    slots = bs.max_concurrent_steps
    smem = (
        plgpu.SMEM((num_wgs, _ROWS, head_dim), dtype, transforms=mc.TILES),
        plgpu.SMEM((num_wgs, _ROWS, head_dim), jnp.float32),
        plgpu.SMEM((slots, bs.block_k, head_dim), dtype, transforms=mc.TILES),
        plgpu.SMEM((slots, bs.block_k, head_dim), dtype, transforms=mc.TILES),
        plgpu.SMEM((num_wgs, _ROWS), jnp.float32),
    )
    pages_per_block = bs.block_k // page_size
    ready = (plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=slots),
             plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=slots),
             plgpu.Barrier(num_barriers=num_wgs))
    free = (plgpu.Barrier(num_arrivals=num_wgs, num_barriers=slots),) * 2
    kernel = functools.partial(_kernel, len_ref, pt_ref, off_ref, q_ref, k_ref, v_ref, out_ref,
                               lse_ref, bs=bs, page_size=page_size, num_wgs=num_wgs, **static)
    pl.run_scoped(lambda *scoped: kernel(scoped), smem, ready, free, collective_axes="wg")


@functools.partial(jax.jit, static_argnames=("window", "block_sizes"))
def decode_attention_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                          window: int | None = None,
                          block_sizes: MosaicDecodeBlockSizes | None = None,
                          page_offset: int = 0):
    """`decode_attention` (same arguments and results) on the Mosaic GPU backend; compiled.

    Args:
      q_BxTxHxD: bf16/f16 queries of the tokens at positions [n_b, n_b + T); T x H / K <= 128.
      k_pool, v_pool: [num_pages, page_size, K, D] cell pools, q's dtype; D % 64 == 0,
        page_size % 8 == 0. Cells a row cannot see must be finite.
      page_table_BxP: int32 page of each page-sized group of row b's cells.
      lengths_B: int32 n_b, cells of row b in use before the T tokens (ragged).
      window: static S <= P * page_size (default P * page_size).
      block_sizes: tiles and splits; default `MosaicDecodeBlockSizes.for_decode`.
      page_offset: static int >= 0 added to every table entry (a layer's first page).

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32.
    """
    if block_sizes is not None and not isinstance(block_sizes, MosaicDecodeBlockSizes):
        raise InputError(f"backend='mosaic_gpu' takes MosaicDecodeBlockSizes, got "
                         f"{block_sizes}")
    mc.check_device()
    return _decode_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window=window,
                        block_sizes=block_sizes, page_offset=page_offset)


def _decode_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *, window,
                 block_sizes, interpret=False, page_offset: int = 0):
    """Validates and builds the kernel call (no device check: tests lower it on CPU, and run
    it with `interpret=True` in jax's GPU interpreter, patched by
    tests/kernels/mgpu_interpreter.py)."""
    t, h = q_BxTxHxD.shape[1:3]
    out, lse = decode_partials_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B,
                                    window=window, block_sizes=block_sizes, causal=True,
                                    interpret=interpret, page_offset=page_offset)
    return combine_splits(*pf.unfold_partials(out, lse, t, h), q_BxTxHxD.dtype)


def decode_partials_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *, window,
                         block_sizes, causal: bool, interpret=False, page_offset: int = 0):
    """The kernel's per-split partials in the folded layout of
    `paged_flash.paged_flash_folded` (no device check; callers check).

    Args:
      q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window: as
        `decode_attention_mgpu`; T x H / K <= 128 (two warpgroup tiles).
      block_sizes: `MosaicDecodeBlockSizes`, default `for_decode` of the shape.
      causal: token t of row b sees cells [0, n_b + t + 1) (decode), else every query row
        sees [0, n_b) (the shared part of a cascade).
      page_offset: static int >= 0 added to every table entry, in the kernel (an operand:
        the layers of stacked cells share one kernel and no per-layer table).

    Returns:
      out [B, K, N, M, D] float32 (M = 64 or 128 folded rows, normalised per split), lse
      [B, K, N, M] float32 (MASK_VALUE for a split with nothing to read).
    """
    # compiled=False: Triton's power-of-two rules do not apply; Mosaic's are checked below.
    window = pf.validate_paged(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window,
                               compiled=False)
    b, t, h, d = q_BxTxHxD.shape
    page_size, k_heads = k_pool.shape[1:3]
    group = h // k_heads
    mc.validate_operands(q_BxTxHxD, page_size)
    if t * group > MAX_ROWS:
        raise InputError(f"T x H / K = {t * group} query rows per kv-head; the mosaic_gpu "
                         f"decode kernel holds at most {MAX_ROWS} (two 64-row warpgroup "
                         "tiles; use append_attention)")
    rows = _padded_rows(t * group)
    bs = block_sizes or MosaicDecodeBlockSizes.for_decode(
        batch=b, k_heads=k_heads, head_dim=d, page_size=page_size, window=window,
        rows=t * group)
    mc.validate_tiles(bs, head_dim=d, itemsize=q_BxTxHxD.dtype.itemsize, page_size=page_size,
                      rows=rows)
    if bs.num_splits < 1:
        raise InputError(f"num_splits={bs.num_splits} must be >= 1")
    table = mc.table_for_blocks(page_table_BxP, window=window, block_k=bs.block_k,
                                page_size=page_size)
    blocks_per_split = pl.cdiv(pl.cdiv(window, bs.block_k), bs.num_splits)
    q = pf._fold_queries(q_BxTxHxD, k_heads, rows)
    n_split, num_wgs = bs.num_splits, rows // _ROWS
    ops = mc.KernelOps(interpret)
    return plgpu.kernel(
        functools.partial(_entry, bs=bs, page_size=page_size, num_tokens=t, group=group,
                          window=window, blocks_per_split=blocks_per_split, causal=causal,
                          num_wgs=num_wgs, ops=ops),
        out_type=(jax.ShapeDtypeStruct((b, k_heads, n_split, rows, d), jnp.float32),
                  jax.ShapeDtypeStruct((b, k_heads, n_split, rows), jnp.float32)),
        grid=(k_heads, n_split, b),
        grid_names=("heads", "splits", "rows"),
        num_threads=num_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **ops.kernel_params(),
    )(lengths_B, table, mc.page_offset_operand(page_offset), q, k_pool, v_pool)


@functools.partial(jax.jit, static_argnames=("layer", "window", "block_sizes"))
def decode_attention_mgpu_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
                                window: int, block_sizes: MosaicDecodeBlockSizes | None = None):
    """`decode_attention_mgpu` over contiguous cells [L, B, C, K, D] (with `layer`) or
    [B, C, K, D]; default tiles at the finest page size they fit.

    Returns:
      out_BxTxHxD, lse_BxTxH.
    """
    if block_sizes is None:
        b, t, h, d = q_BxTxHxD.shape
        k_heads = k_cells.shape[-2]
        block_sizes = MosaicDecodeBlockSizes.for_decode(
            batch=b, k_heads=k_heads, head_dim=d,
            page_size=pf.cells_page_size(k_cells.shape[-3], 16), window=window,
            rows=t * (h // k_heads))
    return pf.on_cells(decode_attention_mgpu, q_BxTxHxD, k_cells, v_cells, lengths_B,
                       layer=layer, window=window, block_sizes=block_sizes)
