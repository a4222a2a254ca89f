"""Append attention for Hopper on the Pallas Mosaic GPU backend (TMA, wgmma, warp-specialised).

Same contract as `append_attention.append_attention` (query token t of row b attends to cells
[0, min(n_b + t + 1, S)) of its row, cells addressed through a page table), built for
ingestion: long chunks (T in the hundreds) over long sessions, where it beats the Triton
lowering (docs/kernels.md). `dispatch` chooses it; the portable kernels never import it.

The structure is JAX's FlashAttention-3 forward (`jax.experimental.pallas.ops.gpu.
attention_mgpu`), adapted to the append contract:

- one program per (query head, tile of 2 * block_q tokens, row); three warpgroups: two compute
  warpgroups of block_q tokens each, staggered by a schedule barrier so one's softmax overlaps
  the other's matmuls, and one memory warpgroup that streams K/V blocks into
  `max_concurrent_steps` shared-memory slots with TMA;
- K/V blocks of block_k cells are gathered page by page through the row's page table (one TMA
  copy per page, all arriving on the slot's barrier);
- each compute warpgroup visits only the blocks its tokens can see: blocks every token sees in
  full run unmasked, the causal / window boundary blocks masked; the warpgroup that finishes
  early keeps releasing the memory warpgroup's slots (as in the causal FA3 kernel);
- outputs: out in q's dtype and the natural-log lse in float32, as `attention.attend`.

Compiled for Hopper through the public wrappers. On CPU, tests run it in jax's Mosaic GPU
interpreter (`interpret=True` on `_append_mgpu`, with a test-only patch for the wgmma forms
that interpreter lacks: tests/kernels/mgpu_interpreter.py; `mosaic_common.KernelOps` switches
off the layout hints and `pl.run_state` there). Masked probabilities are exactly 0, but a masked
cell's V still enters the p @ V matmul: cells a row cannot see must be finite (statejax states
hold zeros or written K/V there; the Triton kernel also tolerates NaN).
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

from . import mosaic_common as mc
from . import paged_flash as pf

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """Tiles of the Mosaic GPU append kernel.

    Attributes:
      block_q: query tokens per compute warpgroup (a program holds 2 * block_q); a multiple of
        64 (the wgmma M tile).
      block_k: cells per KV step; a multiple of 64 and of the page size.
      max_concurrent_steps: K/V blocks in flight (shared-memory slots), >= 2.
    """

    block_q: int = 64
    block_k: int = 128
    max_concurrent_steps: int = 2

    @classmethod
    def for_append(cls, *, head_dim: int, page_size: int) -> "MosaicBlockSizes":
        """FA3's Hopper tiles (64-token warpgroups, 128-cell steps; 64 for D > 128)."""
        block_k = max(128 if head_dim <= 128 else 64, page_size)
        return cls(block_q=64, block_k=block_k, max_concurrent_steps=2)

    def smem_bytes(self, head_dim: int, itemsize: int) -> int:
        """Shared memory the kernel allocates, as `_entry` lays it out and the lowering
        aligns it (`mosaic_common.smem_bytes`): Q/O tiles, K and V slots, lse tiles; ready,
        free and end barriers."""
        slots = self.max_concurrent_steps
        kv = slots * self.block_k * head_dim * itemsize
        buffers = [_COMPUTE_WGS * self.block_q * head_dim * itemsize, kv, kv,
                   _COMPUTE_WGS * self.block_q * 4]
        return mc.smem_bytes(buffers, barriers=4 * slots + _COMPUTE_WGS + 1)


def validate(q_BxTxHxD, page_size: int, bs: MosaicBlockSizes):
    """Raises InputError for what the append kernel cannot run (beyond
    `paged_flash.validate_paged`)."""
    mc.validate_operands(q_BxTxHxD, page_size)
    if bs.block_q % 64 or bs.block_q < 64:
        raise InputError(f"block_q={bs.block_q} must be a positive multiple of 64")
    mc.validate_tiles(bs, head_dim=q_BxTxHxD.shape[-1], itemsize=q_BxTxHxD.dtype.itemsize,
                      page_size=page_size)


def key_limit(n, token, *, num_tokens: int, window: int):
    """Cells [0, limit) visible to query token `token` of a row holding n cells before the
    chunk; padding tokens (>= num_tokens) see what the last real token sees."""
    return jnp.minimum(n + jnp.minimum(token, num_tokens - 1) + 1, window)


def block_plan(n, first_token, count: int, *, num_tokens: int, window: int, block_k: int):
    """KV steps of the query tokens [first_token, first_token + count) of a row.

    Returns:
      (visit, full): blocks [0, visit) hold every cell any of the tokens sees; blocks
      [0, full) are visible in full to all of them (no mask needed).
    """
    limits = functools.partial(key_limit, n, num_tokens=num_tokens, window=window)
    visit = pl.cdiv(limits(first_token + count - 1), jnp.int32(block_k))
    full = lax.div(limits(first_token), jnp.int32(block_k))
    return visit, full


def _kernel(len_ref, pt_ref, off_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped, *, bs,
            num_tokens, window, group, page_size, ops: mc.KernelOps):
    """One (query head, token tile, row) program; refs are whole GMEM arrays.

    len_ref [B] int32; pt_ref [B, P] int32 (padded); off_ref [1] int32 page offset; q_ref,
    out_ref [B, T_pad, H, D]; k_ref, v_ref [num_pages, page_size, K, D]; lse_ref [B, H, T_pad]
    float32.
    """
    block_q, block_k, steps_in_flight = bs.block_q, bs.block_k, bs.max_concurrent_steps
    pages_per_block = block_k // page_size
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    row = lax.axis_index("rows")
    q_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    (qo_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), \
        (k_free, v_free), schedule = scoped
    n = len_ref[row]
    plan = functools.partial(block_plan, n, num_tokens=num_tokens, window=window,
                             block_k=block_k)

    def schedule_barrier():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    tile_base = lax.axis_index("tiles") * (_COMPUTE_WGS * block_q)
    tile_steps, _ = plan(tile_base, _COMPUTE_WGS * block_q)  # what the memory wg streams

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        q_base = tile_base + wg * block_q
        kv_steps, full_steps = plan(q_base, block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[row, pl.ds(q_base, block_q), q_head], qo_smem,
                                q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        m_i = ops.layout(jnp.full((block_q,), -jnp.inf, jnp.float32),
                         plgpu.Layout.WGMMA.reduce(1))
        l_i = ops.layout(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = ops.layout(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(k_ready.at[0])  # every token sees cell 0: kv_steps >= 1
        pl.when(wg == 1)(schedule_barrier)
        # Scores in base 2 with the softmax scale folded in: exp2 of an FMA.
        score_scale = head_dim**-0.5 * _LOG2E

        def kv_step(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(steps_in_flight))

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                schedule_barrier()
                return acc_ref[...]

            qk = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_k), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                tokens = ops.iota((block_q, block_k), 0) + q_base
                cells = ops.iota((block_q, block_k), 1) + step * block_k
                visible = cells < key_limit(n, tokens, num_tokens=num_tokens, window=window)
                qk = jnp.where(visible, qk, -jnp.inf)
            # Every token sees cell 0 in step 0, so m_i is finite from the first step on.
            m_next = jnp.maximum(m_i, qk.max(axis=1) * score_scale)
            alpha = jnp.exp2(m_i - m_next)
            p = jnp.exp2(qk * score_scale - lax.broadcast_in_dim(m_next, qk.shape, [0]))
            acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i *= alpha
            p16 = p.astype(dtype)

            def end_softmax():
                plgpu.barrier_arrive(schedule)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(schedule)  # the tensor cores are free
            # FA3 orders these by head dim; the order measurably changes its speed.
            if head_dim <= 128:
                l_i += p.sum(axis=1)
                acc, l_i, m_next, p16 = lax.optimization_barrier((acc, l_i, m_next, p16))
                end_softmax()
            else:
                end_softmax()
                l_i += p.sum(axis=1)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                next_slot = lax.rem(step + 1, jnp.int32(steps_in_flight))

                @pl.when(step + 1 < kv_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[next_slot])

            acc = ops.accumulate(acc, pv)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_next, l_i

        def release_step(step, _):
            # Steps this warpgroup does not need but the other one does: free the slots and
            # keep the schedule barrier in step. Waiting for the data first keeps every
            # barrier phase observed by its waiters (the other warpgroup needs it now anyway).
            slot = lax.rem(step, jnp.int32(steps_in_flight))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            schedule_barrier()
            schedule_barrier()

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, full_steps, functools.partial(kv_step, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(full_steps, kv_steps,
                                      functools.partial(kv_step, masked=True), carry)
        lax.fori_loop(kv_steps, tile_steps, release_step, None)
        pl.when(wg == 0)(schedule_barrier)

        acc /= lax.broadcast_in_dim(l_i, (block_q, head_dim), [0])
        qo_smem[...] = acc.astype(dtype)
        lse_smem[...] = m_i * _LN2 + jnp.log(l_i)  # natural log; m_i is in base 2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[row, pl.ds(q_base, block_q), q_head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[row, q_head, pl.ds(q_base, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(q_head, jnp.int32(group))

        def fetch(step, slot, src_ref, dst_smem, barrier):
            mc.fetch_block(pt_ref, off_ref, row, step, src_ref, dst_smem.at[slot],
                           barrier.at[slot],
                           kv_head=kv_head, page_size=page_size,
                           pages_per_block=pages_per_block)

        def prefetch(step):  # fills slot `step` before any slot is released
            fetch(step, step, k_ref, k_smem, k_ready)
            fetch(step, step, v_ref, v_smem, v_ready)

        for i in range(steps_in_flight):
            pl.when(i < tile_steps)(functools.partial(prefetch, i))

        @pl.loop(0, tile_steps - steps_in_flight)
        def _(step):
            fetch_step = step + steps_in_flight
            slot = lax.rem(step, jnp.int32(steps_in_flight))
            plgpu.barrier_wait(k_free.at[slot])
            fetch(fetch_step, slot, k_ref, k_smem, k_ready)
            plgpu.barrier_wait(v_free.at[slot])
            fetch(fetch_step, slot, v_ref, v_smem, v_ready)

        mc.drain_releases((k_free, v_free), tile_steps, steps_in_flight)


def _entry(len_ref, pt_ref, off_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *, bs, page_size,
           **static):
    head_dim, dtype = q_ref.shape[-1], q_ref.dtype
    steps_in_flight = bs.max_concurrent_steps
    smem = (
        plgpu.SMEM((_COMPUTE_WGS, bs.block_q, head_dim), dtype, transforms=mc.TILES),
        plgpu.SMEM((steps_in_flight, bs.block_k, head_dim), dtype, transforms=mc.TILES),
        plgpu.SMEM((steps_in_flight, bs.block_k, head_dim), dtype, transforms=mc.TILES),
        plgpu.SMEM((_COMPUTE_WGS, bs.block_q), jnp.float32),
    )
    pages_per_block = bs.block_k // page_size
    ready = (plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=steps_in_flight),
             plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=steps_in_flight),
             plgpu.Barrier(num_barriers=_COMPUTE_WGS))
    free = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=steps_in_flight),) * 2
    kernel = functools.partial(_kernel, len_ref, pt_ref, off_ref, q_ref, k_ref, v_ref, out_ref,
                               lse_ref, bs=bs, page_size=page_size, **static)
    pl.run_scoped(lambda *scoped: kernel(scoped), smem, ready, free,
                  plgpu.Barrier(num_arrivals=_COMPUTE_WGS), collective_axes="wg")


@functools.partial(jax.jit, static_argnames=("window", "block_sizes"))
def append_attention_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                          window: int | None = None,
                          block_sizes: MosaicBlockSizes | None = None, page_offset: int = 0):
    """`append_attention` (same arguments and results) on the Mosaic GPU backend; compiled.

    Args:
      q_BxTxHxD: bf16/f16 queries (RoPE applied) of the tokens at positions [n_b, n_b + T).
      k_pool, v_pool: [num_pages, page_size, K, D] cell pools, q's dtype; H % K == 0,
        D % 64 == 0, page_size % 8 == 0. Cells a row cannot see must be finite.
      page_table_BxP: int32; row b's cell c is pool[page_table[b, c // page_size],
        c % page_size] (entries past a row's last page are clamped into range).
      lengths_B: int32 n_b, cells of row b in use before the chunk.
      window: static S <= P * page_size (default P * page_size).
      block_sizes: tiles; default `MosaicBlockSizes.for_append` of this shape.
      page_offset: static int >= 0 added to every table entry, in the kernel (an operand:
        the layers of stacked cells share one kernel and no per-layer table).

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32 (natural log, as `attention.attend`).
    """
    if block_sizes is not None and not isinstance(block_sizes, MosaicBlockSizes):
        raise InputError(f"backend='mosaic_gpu' takes MosaicBlockSizes, got {block_sizes}")
    mc.check_device()
    return _append_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window=window,
                        block_sizes=block_sizes, page_offset=page_offset)


def _append_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *, window,
                 block_sizes, interpret=False, page_offset: int = 0):
    """Validates and builds the kernel call (no device check: tests lower it on CPU, and run
    it with `interpret=True` in jax's GPU interpreter, patched by
    tests/kernels/mgpu_interpreter.py)."""
    # compiled=False: Triton's power-of-two rules do not apply; `validate` checks Mosaic's.
    window = pf.validate_paged(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window,
                               compiled=False)
    b, t, h, d = q_BxTxHxD.shape
    page_size, k_heads = k_pool.shape[1:3]
    bs = block_sizes or MosaicBlockSizes.for_append(head_dim=d, page_size=page_size)
    validate(q_BxTxHxD, page_size, bs)
    tile = _COMPUTE_WGS * bs.block_q
    t_pad = pl.cdiv(t, tile) * tile
    q = jnp.pad(q_BxTxHxD, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    table = mc.table_for_blocks(page_table_BxP, window=window, block_k=bs.block_k,
                                page_size=page_size)
    ops = mc.KernelOps(interpret)
    out, lse = plgpu.kernel(
        functools.partial(_entry, bs=bs, page_size=page_size, num_tokens=t, window=window,
                          group=h // k_heads, ops=ops),
        out_type=(jax.ShapeDtypeStruct((b, t_pad, h, d), q.dtype),
                  jax.ShapeDtypeStruct((b, h, t_pad), jnp.float32)),
        grid=(h, t_pad // tile, b),
        grid_names=("heads", "tiles", "rows"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **ops.kernel_params(),
    )(lengths_B, table, mc.page_offset_operand(page_offset), q, k_pool, v_pool)
    return out[:, :t], jnp.swapaxes(lse, 1, 2)[:, :t]


@functools.partial(jax.jit, static_argnames=("layer", "window", "block_sizes"))
def append_attention_mgpu_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
                                window: int, block_sizes: MosaicBlockSizes | None = None):
    """`append_attention_mgpu` over contiguous cells [L, B, C, K, D] (with `layer`) or
    [B, C, K, D], chunk already written; default tiles at the finest page size they fit.

    Returns:
      out_BxTxHxD, lse_BxTxH.
    """
    if block_sizes is None:
        block_sizes = MosaicBlockSizes.for_append(
            head_dim=q_BxTxHxD.shape[-1], page_size=pf.cells_page_size(k_cells.shape[-3], 16))
    return pf.on_cells(append_attention_mgpu, q_BxTxHxD, k_cells, v_cells, lengths_B,
                       layer=layer, window=window, block_sizes=block_sizes)
