"""The shared paged flash engine: online-softmax attention of query rows over paged cells.

The contract is `statejax.attention`: query token t of row b sits at position n_b + t, its own
K/V is already written at cell n_b + t, and it attends to cells [0, min(n_b + t + 1, S)) of its
row, S being the window (non-causal calls: [0, min(n_b, S))). Cells live in a pool
[num_pages, page_size, K, D]; row b's cell c is `pool[page_table[b, c // page_size],
c % page_size]`. Contiguous cells [L, B, C, K, D] are the same pool reshaped (`cells_as_pool`),
so one kernel serves both layouts.

Grid: (row, kv-head, query block, split). Query rows are the T x G query heads that share a
kv-head (GQA folded into the rows), so each K/V block is read once for the whole group. A
program loops only over the blocks its rows can see; blocks every row sees whole skip the
mask. `num_splits > 1` writes per-split partials (flash-decoding), merged by `combine_splits`.

The append, decode and cascade kernels are wrappers of this engine (`paged_flash_folded`);
`paged_attention_reference` is its plain-JAX specification. docs/kernels.md has the design
notes and measurements behind the tiles.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from statejax import attention, platform
from statejax.errors import InputError

MASK_VALUE = attention.MASK_VALUE
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
BACKENDS = ("triton",)  # the engine's lowering; Hopper variants are chosen by `dispatch`
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# Table entries a program may hold in registers (`BlockSizes.preload_pages`): its KV blocks'
# pages, padded to a power of two (Triton's shapes), picked by a masked sum in each step.
MAX_PRELOAD_PAGES = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def kv_block(cells: int, page_size: int) -> int:
    """A KV step of about `cells` (a power of two) cells that gathers whole pages: the page
    size times the most pages, a power of two of them, within `cells`; at least one page.
    For a power-of-two page size that is max(page_size, cells)."""
    pages = max(1, cells // page_size)
    return page_size * (1 << (pages.bit_length() - 1))


def triton_compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params (named `TritonCompilerParams` before jax 0.7)."""
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the paged flash kernel.

    Attributes:
      block_q: query rows per program (rows = query tokens x query heads per kv-head); a power
        of two >= 16 (Triton's `dot` needs 16).
      block_k: cells per KV step; a multiple of the page size (pages gathered per step).
      num_splits: splits of the sequence (grid axis); > 1 only for flash-decoding.
      num_warps, num_stages: Triton launch parameters.
      preload_pages: through a page table (not `contiguous_pages`), read a program's table
        entries (at most `MAX_PRELOAD_PAGES`) into registers before its KV loop and pick
        each step's from there: no load inside the loop, so Triton can keep blocks in
        flight from 3 stages on (an entry loaded in the loop makes it wait for every copy
        at each step). A tile choice for paged pools (shuffled pages: a multi-tenant pool,
        the benchmark's `paged` rows); contiguous cells ignore it.
    """

    block_q: int
    block_k: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    preload_pages: bool = False

    @classmethod
    def for_append(cls, *, rows: int, head_dim: int, page_size: int) -> "BlockSizes":
        """Ingestion defaults: big query tiles, 64-128 cell KV steps, no split, 4 warps
        (the measured winners, docs/kernels.md)."""
        block_q = min(128, max(16, _next_pow2(rows)))
        block_k = kv_block(64 if head_dim >= 128 else 128, page_size)
        return cls(block_q=block_q, block_k=block_k, num_warps=4, num_stages=2)


def validate_block_sizes(bs: BlockSizes, page_size: int):
    """Raises InputError unless block_q is a power of two and block_k a positive multiple of
    `page_size` (a key block is whole pages)."""
    if not _is_pow2(bs.block_q) or bs.block_q < 1:
        raise InputError(f"block_q={bs.block_q} must be a power of two")
    if bs.block_k % page_size or bs.block_k < page_size:
        raise InputError(f"block_k={bs.block_k} must be a positive multiple of page_size="
                         f"{page_size}")
    if not _is_pow2(bs.block_k // page_size):
        raise InputError(f"block_k / page_size = {bs.block_k // page_size} must be a power of "
                         "two (pages gathered per KV step)")
    if bs.num_splits < 1:
        raise InputError(f"num_splits={bs.num_splits} must be >= 1")
    if not isinstance(bs.preload_pages, bool):
        raise InputError(f"preload_pages={bs.preload_pages!r} must be a bool")


def check_page_offset(page_offset):
    """A table offset is a static, non-negative Python int."""
    if not isinstance(page_offset, int) or isinstance(page_offset, bool) or page_offset < 0:
        raise InputError(f"page_offset must be a static int >= 0, got {page_offset!r}")


def check_backend(backend: str, interpret: bool):
    """Raises unless (backend, interpret) can run here. Nothing ever falls back."""
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r}; allowed: {BACKENDS}")
    if not isinstance(interpret, bool):
        raise InputError(f"interpret must be a bool, got {interpret!r}")
    if not interpret and not platform.compiling_for_gpu():
        raise InputError(f"compiled Pallas {backend} kernels need a GPU (default backend is "
                         f"{jax.default_backend()!r}); pass interpret=True to run them in "
                         "interpret mode")


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where a call's heads sit in its buffers.

    By default q holds the H query heads and each pool [num_pages, page_size, K, D] the K
    kv-heads of its role. Two layouts put more in one buffer, so that one kernel of the
    model writes it: K and V in one pool (`v_pool` None: [.., 2K, D], each cell's K heads
    then its V heads, as `statejax.cache.BranchView` keeps a branch's cells), and the step's
    own q, k and v in one [B, T, H + 2K, D] buffer that is both the queries and the pool (a
    first-token branch's private cells, `cascade_attention.cascade_attention_cells`).

    Attributes:
      q_heads: H, the queries: the first H heads of q (it may hold more: a q/k/v buffer).
      kv_heads: K; H % K == 0.
      k_head, v_head: the pool heads of K's and V's kv-head 0 (kv-head h at + h).
    """

    q_heads: int
    kv_heads: int
    k_head: int = 0
    v_head: int = 0

    @classmethod
    def of(cls, q_BxTxHxD, k_pool, v_pool) -> "HeadLayout":
        """The layout of separate pools, or of K and V in one (`v_pool` None)."""
        if v_pool is None:
            k_heads = k_pool.shape[2] // 2
            return cls(q_BxTxHxD.shape[2], k_heads, 0, k_heads)
        return cls(q_BxTxHxD.shape[2], k_pool.shape[2])


def _check_heads(heads: HeadLayout, q_BxTxHxD, k_pool, v_pool):
    h, k_heads, pool_heads = heads.q_heads, heads.kv_heads, k_pool.shape[2]
    if k_heads < 1 or h % k_heads:
        raise InputError(f"query heads H={h} must be a multiple of kv-heads K={k_heads}")
    if h > q_BxTxHxD.shape[2]:
        raise InputError(f"{h} query heads; q holds {q_BxTxHxD.shape[2]}")
    for role, first in (("K", heads.k_head), ("V", heads.v_head)):
        if not 0 <= first <= pool_heads - k_heads:
            raise InputError(f"{role}'s {k_heads} kv-heads from pool head {first} do not fit "
                             f"the pool's {pool_heads} heads")
    if v_pool is None and heads.k_head == heads.v_head:
        raise InputError("K and V in one pool need distinct heads (HeadLayout.v_head)")


def validate_paged(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window, *,
                   compiled: bool, heads: HeadLayout | None = None):
    """Checks ranks, dtypes and sizes of a paged attention call; returns the window S.

    `v_pool` None: `k_pool` holds V's heads too; `heads`: where the heads sit (default
    `HeadLayout.of` the buffers)."""
    if q_BxTxHxD.ndim != 4:
        raise InputError(f"q must be [B, T, H, D], got shape {q_BxTxHxD.shape}")
    b, t, _, d = q_BxTxHxD.shape
    if v_pool is None and heads is None and (k_pool.ndim != 4 or k_pool.shape[2] % 2):
        raise InputError(f"a K/V pool in one buffer must be [num_pages, page_size, 2K, D] "
                         f"(K heads, then V heads), got {k_pool.shape}")
    if k_pool.ndim != 4 or (v_pool is not None and k_pool.shape != v_pool.shape):
        raise InputError(f"k_pool and v_pool must both be [num_pages, page_size, K, D], got "
                         f"{k_pool.shape} and {None if v_pool is None else v_pool.shape}")
    heads = heads or HeadLayout.of(q_BxTxHxD, k_pool, v_pool)
    _check_heads(heads, q_BxTxHxD, k_pool, v_pool)
    v_pool = k_pool if v_pool is None else v_pool
    num_pages, page_size, _, d_kv = k_pool.shape
    if d_kv != d:
        raise InputError(f"head dim of q ({d}) and of the K/V pool ({d_kv}) differ")
    h = heads.q_heads
    if q_BxTxHxD.dtype not in _DTYPES or k_pool.dtype != q_BxTxHxD.dtype or (
            v_pool.dtype != q_BxTxHxD.dtype):
        raise InputError(f"q, k_pool, v_pool must share one dtype of float32/bfloat16/float16, "
                         f"got {q_BxTxHxD.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if page_table_BxP.ndim != 2 or page_table_BxP.shape[0] != b or (
            page_table_BxP.dtype != jnp.int32):
        raise InputError(f"page_table must be int32 [B={b}, P], got "
                         f"{page_table_BxP.dtype}{list(page_table_BxP.shape)}")
    if lengths_B.shape != (b,) or lengths_B.dtype != jnp.int32:
        raise InputError(f"lengths must be int32 [B={b}], got "
                         f"{lengths_B.dtype}{list(lengths_B.shape)}")
    sizes = dict(B=b, T=t, H=h, D=d, num_pages=num_pages, page_size=page_size,
                 P=page_table_BxP.shape[1])
    if min(sizes.values()) < 1:
        raise InputError(f"every size must be >= 1, got {sizes}")
    if window is not None and (not isinstance(window, int | np.integer)
                               or isinstance(window, bool)):
        raise InputError(f"window={window!r}; allowed: None or a static int")
    visible = page_table_BxP.shape[1] * page_size
    window = visible if window is None else int(window)
    if not 1 <= window <= visible:
        raise InputError(f"window={window} must be in [1, P * page_size = {visible}]")
    if compiled:  # Triton tensors are power-of-two sized; `dot` needs >= 16 per dim.
        if not _is_pow2(d) or d < 16:
            raise InputError(f"compiled kernels need a power-of-two head dim >= 16, got {d}")
        if not _is_pow2(page_size):
            raise InputError(f"compiled kernels need a power-of-two page size, got {page_size}")
    return window


def read_rows(ref, valid, *idx):
    """ref[:, *idx] of a block of rows; with `valid` ([bm, 1] bool: rows below M) the rows
    past M (a last row tile overhanging the array) read as zeros, not past the buffer."""
    idx = (slice(None), *idx) if idx else (...,)
    if valid is None:
        return ref[idx]
    view = ref.at[idx]
    return plgpu.load(view, mask=jnp.broadcast_to(valid, view.shape), other=0)


def write_rows(ref, value, valid, *idx):
    """ref[:, *idx] = value, rows past M (`valid` False) left unwritten."""
    idx = (slice(None), *idx) if idx else (...,)
    if valid is None:
        ref[idx] = value
        return
    plgpu.store(ref.at[idx], value, mask=jnp.broadcast_to(valid, value.shape))


class PrefixCells(NamedTuple):
    """Cells every query row of a call sees before its own (`paged_flash_folded(prefix=)`):
    a cascade's shared cells, attended in the same kernel as each branch's own when they are
    not split, so one launch does both and no partial is written or merged.

    Attributes:
      k_pool, v_pool: [num_pages, page_size, K', D] pools (kv-head h at `heads`' k_head + h
        and v_head + h).
      page_table_P: int32 [P], the prefix's pages (one table for every row).
      length: int32 scalar n: every row sees prefix cells [0, min(n, window)).
      window: static S <= P * page_size.
      block_k: static cells per KV step over the prefix (whole pages, a power of two of them).
      page_offset: static, added to the table's entries.
      heads: where the pools' heads sit (`HeadLayout`).
      contiguous: static; the prefix's pages are the table's first entry and its
        successors (`paged_flash_folded`'s `contiguous_pages`).
      preload_pages: static; through the table, its entries read before the loop
        (`BlockSizes.preload_pages`).
    """

    k_pool: jax.Array
    v_pool: jax.Array
    page_table_P: jax.Array
    length: jax.Array
    window: int
    block_k: int
    page_offset: int
    heads: "HeadLayout"
    contiguous: bool = False
    preload_pages: bool = False


@dataclasses.dataclass(frozen=True)
class _PrefixShape:
    """What the kernel needs to know statically of a `PrefixCells`."""

    page_size: int
    pages_per_block: int
    num_pages: int
    window: int
    contiguous: bool
    preload_width: int = 0  # > 0: table entries read before the loop


def _preload_width(blocks: int, pages_per_block: int) -> int:
    """Table entries a program holds for `blocks` KV blocks (`BlockSizes.preload_pages`):
    a power of two; raises past `MAX_PRELOAD_PAGES`."""
    width = _next_pow2(blocks * pages_per_block)
    if width > MAX_PRELOAD_PAGES:
        raise InputError(
            f"preload_pages: a program's {blocks} KV blocks of {pages_per_block} pages need "
            f"{width} table entries in registers; allowed: at most {MAX_PRELOAD_PAGES} (more "
            "splits, bigger pages or preload_pages=False)")
    return width


def _block_loader(k_ref, v_ref, pt_ref, page_offset, *, page_size, pages_per_block,
                  num_pages, contiguous, preload=None):
    """`load(j)` -> K, V [block_k, D]: KV block j (pages_per_block pages) of a kv-head's
    pool. Its pages are the table's entries j * pages_per_block ... (plus `page_offset`), or
    with `contiguous` the first entry's successors, computed: no load of the table inside
    the KV loop, whose block addresses then depend on the loop index alone, so Triton keeps
    num_stages - 1 blocks in flight while one is computed on (a table entry loaded in the
    loop makes every step wait for all copies).

    `preload`: None, or (first block, width): through the table, its entries for blocks
    first ... (width of them, a power of two) are read once before the loop and each step's
    picked from those registers by a masked sum, again no load in the loop
    (`BlockSizes.preload_pages`)."""
    block_k = page_size * pages_per_block
    first = pt_ref[0] + page_offset if contiguous else None  # read once, before the loop
    preload = None if contiguous else preload
    if preload is not None:
        first_block, width = preload
        held = pt_ref[pl.ds(first_block * pages_per_block, width)] + page_offset
        slots = jnp.arange(width, dtype=jnp.int32)

    def entries(j):  # the table's entries of block j: [pages_per_block]
        if preload is None:
            return pt_ref[pl.ds(j * pages_per_block, pages_per_block)] + page_offset
        wanted = (j - first_block) * pages_per_block + jnp.arange(pages_per_block,
                                                                  dtype=jnp.int32)
        return jnp.sum(jnp.where(slots[None, :] == wanted[:, None], held[None, :], 0), axis=1)

    def load(j):
        if pages_per_block == 1:
            if contiguous:
                page = first + j
            elif preload is None:
                page = pt_ref[j] + page_offset
            else:
                page = jnp.sum(jnp.where(slots == j - first_block, held, 0))
            page = jnp.clip(page, 0, num_pages - 1)
            return k_ref[page], v_ref[page]
        if contiguous:
            pages = first + j * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
        else:
            pages = entries(j)
        pages = jnp.clip(pages, 0, num_pages - 1)
        return (k_ref[pages].reshape(block_k, k_ref.shape[-1]),
                v_ref[pages].reshape(block_k, v_ref.shape[-1]))
    return load


def _attend_blocks(carry, q, scale, load, *, block_k, first, full_end, last, limit_q,
                   limit_hi):
    """Online softmax of q [block_q, D] over KV blocks [first, last) (`load(j)` -> K, V
    [block_k, D]), continuing `carry` = (unnormalised out, running max in base 2,
    denominator). Row r sees cells [0, limit_q[r]); blocks before `full_end` every row sees
    whole (no mask); `limit_hi`: the largest limit."""
    def body(j, carry, masked):
        o, m, denom = carry
        k, v = load(j)
        # HIGHEST: float32 operands take the IEEE path on Triton, not TF32 (bf16 unchanged).
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) * scale
        if masked:
            cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
            valid = cols[None, :] < limit_q[:, None]
            s = jnp.where(valid, s, MASK_VALUE)
            # Cells past every row's limit may hold anything (a page's unwritten tail): zero
            # them, or 0 * NaN would reach the output.
            v = jnp.where(cols[:, None] < limit_hi, v, jnp.zeros_like(v))
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:  # a row with no visible key yet must not count masked ones
            p = jnp.where(valid, p, 0.0)
        denom = correction * denom + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        return correction[:, None] * o + pv, m_next, denom

    carry = lax.fori_loop(first, full_end, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_end, last, functools.partial(body, masked=True), carry)


def _flash_kernel(len_ref, pt_ref, offset_ref, q_ref, k_ref, v_ref, *refs, group, num_tokens,
                  causal, window, page_size, pages_per_block, blocks_per_split, num_pages,
                  merge_splits, block_q, overhang, tokens_out, contiguous, prefix=None,
                  preload_width=0):
    """One (row, kv-head, query block, split) program.

    Refs: len_ref [1] the row's n; pt_ref [P] its page table; offset_ref [1] added to its
    entries (an operand, not a constant of the kernel: the layers of a step then launch one
    identical kernel, compiled once); q_ref [block_q, D] folded, or [block_q / G, G x D]:
    whole tokens read from q's own [B, T, H, D] layout (`token_tiles`), the same rows;
    k_ref, v_ref [num_pages, page_size, D] (this kv-head's slice of the pool); with a
    `prefix` (`_PrefixShape`), then its length [1], table [P'], offset [1], K and V pools
    [num_pages', page_size', D], attended first; with `merge_splits` N > 0, then
    earlier_o_ref [N, block_q, D] and earlier_lse_ref [N, block_q], partials of the same
    query rows over other keys, merged into this program's result; refs[-2:] = o_ref
    [block_q, D] (or whole tokens, as q_ref), lse_ref [block_q] (refs between: aliased poison
    inputs). `overhang`: whole-token tiles whose last one reaches past the T tokens (its rows
    there read as zeros); `tokens_out`: o_ref is whole tokens (left unwritten past T);
    `contiguous`: the row's pages are its table's first entry and the ones after
    (`_block_loader`); `preload_width` > 0: the program's table entries, that many from
    its split's first block's, are read before the loop (`BlockSizes.preload_pages`).
    """
    if prefix is not None:
        prefix_refs, refs = refs[:5], refs[5:]
    o_ref, lse_ref = refs[-2:]
    head_dim = k_ref.shape[-1]
    block_k = page_size * pages_per_block
    qi, split = pl.program_id(2), pl.program_id(3)
    n = len_ref[0]

    def key_limit(row):  # cells [0, limit) are visible to query row `row`
        t = jnp.minimum(lax.div(row, group), num_tokens - 1)
        return jnp.minimum(n + t + 1, window) if causal else jnp.minimum(n + 0 * t, window)

    row0 = qi * block_q
    rows = row0 + jnp.arange(block_q, dtype=jnp.int32)
    limit_q = key_limit(rows)
    limit_lo, limit_hi = key_limit(row0), key_limit(row0 + block_q - 1)
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, lax.div(limit_hi + block_k - 1, block_k))
    full_end = jnp.maximum(first, jnp.minimum(last, lax.div(limit_lo, block_k)))

    # Tokens of this tile inside the T (masked loads and stores where a tile overhangs).
    tokens = (qi * q_ref.shape[0] + jnp.arange(q_ref.shape[0], dtype=jnp.int32)
              < num_tokens)[:, None] if overhang else None
    q = read_rows(q_ref, tokens).reshape(block_q, head_dim)  # a token's G heads in a row
    scale = head_dim**-0.5 * _LOG2E  # scores in base 2: exp2 is the fast path

    carry = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    if prefix is not None:  # the shared cells first: every row sees [0, min(n', S'))
        p_len_ref, p_pt_ref, p_offset_ref, p_k_ref, p_v_ref = prefix_refs
        p_n = jnp.minimum(p_len_ref[0], prefix.window)
        p_block_k = prefix.page_size * prefix.pages_per_block
        load = _block_loader(p_k_ref, p_v_ref, p_pt_ref, p_offset_ref[0],
                             page_size=prefix.page_size, pages_per_block=prefix.pages_per_block,
                             num_pages=prefix.num_pages, contiguous=prefix.contiguous,
                             preload=(0, prefix.preload_width) if prefix.preload_width
                             else None)
        carry = _attend_blocks(carry, q, scale, load, block_k=p_block_k, first=0,
                               full_end=lax.div(p_n, p_block_k),
                               last=lax.div(p_n + p_block_k - 1, p_block_k),
                               limit_q=jnp.full((block_q,), p_n, jnp.int32), limit_hi=p_n)
    load = _block_loader(k_ref, v_ref, pt_ref, offset_ref[0], page_size=page_size,
                         pages_per_block=pages_per_block, num_pages=num_pages,
                         contiguous=contiguous,
                         preload=(first, preload_width) if preload_width else None)
    o, m, denom = _attend_blocks(carry, q, scale, load, block_k=block_k, first=first,
                                 full_end=full_end, last=last, limit_q=limit_q,
                                 limit_hi=limit_hi)
    # A row with no visible key (empty split, empty prefix) gives out 0 and lse MASK_VALUE:
    # it then merges with weight zero.
    empty = denom == 0.0
    denom = jnp.where(empty, 1.0, denom)
    out = o / denom[:, None]
    lse = jnp.where(empty, MASK_VALUE, (m + jnp.log2(denom)) * _LN2)
    if merge_splits:
        out, lse = _merge_earlier(out, lse, *refs[:2], merge_splits)
    out = out.astype(o_ref.dtype).reshape(o_ref.shape)
    write_rows(o_ref, out, tokens if tokens_out else None)
    lse_ref[...] = lse


def _merge_earlier(out, lse, earlier_o_ref, earlier_lse_ref, num: int):
    """Exact log-sum-exp merge of `num` earlier partials (out normalised, in float32 or the
    queries' dtype; lse float32, natural, MASK_VALUE for an empty one) into (out, lse), one at
    a time, as `combine_splits` does (in float32)."""
    def merge(i, carry):
        out, lse = carry
        lse_i = earlier_lse_ref[i]
        new = jnp.maximum(lse, lse_i)
        w, w_i = jnp.exp(lse - new), jnp.exp(lse_i - new)
        total = w + w_i
        out_i = earlier_o_ref[i].astype(jnp.float32)
        out = (w[:, None] * out + w_i[:, None] * out_i) / total[:, None]
        return out, new + jnp.log(total)

    return lax.fori_loop(0, num, merge, (out, lse))


def token_tiles(group: int, block_q: int) -> bool:
    """Whether query tiles of `block_q` folded rows are whole tokens (G a power of two
    dividing block_q): the kernel then reads q, and writes an unsplit output, in the model's
    [B, T, H, D] layout (a tile: block_q / G tokens x the G heads of a kv-head; where the
    last tile reaches past the T tokens, its loads and stores there are masked), and no
    transpose or pad runs before or after it."""
    return _is_pow2(group) and block_q % group == 0


def merges_earlier(batch: int, tokens: int, group: int, block_q: int, *,
                   earlier_rows: int) -> bool:
    """Whether a call's query tiles can merge earlier partials of all `batch` rows' queries
    folded into one row of `earlier_rows` (`paged_flash_folded(..., earlier=)`): row b's
    tiles read the earlier rows' block b * tiles + i, so each row's T * G rows must fill
    whole tiles, or there is one row whose tiles lie within the earlier rows."""
    tiles = -(-tokens * group // block_q)
    return (tokens * group) % block_q == 0 or (batch == 1 and earlier_rows >= tiles * block_q)


def _fold_queries(q_BxTxHxD, k_heads: int, rows_padded: int):
    """[B, T, H, D] -> [B, K, M_pad, D], row = t * G + g (GQA group folded into rows)."""
    b, t, h, d = q_BxTxHxD.shape
    g = h // k_heads
    q = q_BxTxHxD.reshape(b, t, k_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(
        b, k_heads, t * g, d)
    return jnp.pad(q, ((0, 0), (0, 0), (0, rows_padded - t * g), (0, 0)))


def unfold_rows(x_BxKxMx_, t: int, h: int):
    """Inverse of the kernels' query folding: [B, K, M_pad, ...] -> [B, T, H, ...]."""
    b, k_heads = x_BxKxMx_.shape[:2]
    g = h // k_heads
    tail = x_BxKxMx_.shape[3:]
    x = x_BxKxMx_[:, :, : t * g].reshape(b, k_heads, t, g, *tail)
    return jnp.moveaxis(x, 2, 1).reshape(b, t, h, *tail)


def unfold_partials(out_BxKxNxMxD, lse_BxKxNxM, t: int, h: int):
    """Per-split partials in the kernels' folded layout -> out [B, T, H, N, D], lse [B, T, H, N]."""
    return (unfold_rows(jnp.moveaxis(out_BxKxNxMxD, 2, 3), t, h),
            unfold_rows(jnp.moveaxis(lse_BxKxNxM, 2, 3), t, h))


def paged_attention_partials(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                             window: int, causal: bool, block_sizes: BlockSizes,
                             out_dtype, interpret: bool, backend: str = "triton",
                             page_offset: int = 0, poison_outputs: bool = False,
                             contiguous_pages: bool = False,
                             name: str = "statejax_paged_flash"):
    """Runs the kernel; returns per-split partials (no validation: callers validate).

    Args:
      q_BxTxHxD: queries; kv-head k serves query heads [k * G, (k + 1) * G).
      k_pool, v_pool: [num_pages, page_size, K, D] cell pools.
      page_table_BxP: int32 page of each row's page-sized cell group.
      lengths_B: int32 n per row: causal rows see [0, min(n + t + 1, window)), non-causal
        rows see [0, min(n, window)).
      window: static S <= P * page_size.
      causal, block_sizes, interpret, backend: see `append_attention`.
      out_dtype: dtype of the partial outputs.
      poison_outputs: start the outputs NaN-filled (aliased inputs), so any element the
        kernel fails to write shows up; a test hook, also valid compiled.
      contiguous_pages: static; row b's pages are `page_table[b, 0]` and the ones after it
        (contiguous cells seen as pages, `cells_as_pool`): the kernel computes them rather
        than loading the table inside its KV loop, which lets Triton keep KV blocks in flight
        (`num_stages` - 1 of them) while it computes on one.
      name: the kernel's name (`paged_flash_folded`).

    Returns:
      out_BxTxHxNxD partial outputs (N = num_splits) in `out_dtype`, lse_BxTxHxN float32.
    """
    b, t, h, d = q_BxTxHxD.shape
    # Unsplit, with tiles of whole tokens, the kernel writes out in q's layout itself.
    tokens_out = block_sizes.num_splits == 1 and token_tiles(h // k_pool.shape[2],
                                                             block_sizes.block_q)
    out, lse = paged_flash_folded(
        q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, window=window, causal=causal,
        block_sizes=block_sizes, out_dtype=out_dtype, interpret=interpret,
        page_offset=page_offset, poison_outputs=poison_outputs, tokens_out=tokens_out,
        contiguous_pages=contiguous_pages, name=name)
    if not tokens_out:
        return unfold_partials(out, lse, t, h)
    return out.reshape(b, t, h, 1, d), unfold_rows(jnp.moveaxis(lse, 2, 3), t, h)


def paged_flash_folded(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *, window: int,
                       causal: bool, block_sizes: BlockSizes, out_dtype, interpret: bool,
                       page_offset: int = 0, poison_outputs: bool = False, earlier=None,
                       tokens_out: bool = False, heads: HeadLayout | None = None,
                       prefix: PrefixCells | None = None, contiguous_pages: bool = False,
                       name: str = "statejax_paged_flash"):
    """`paged_attention_partials` in the kernel's folded layout (query rows m = t * G + g,
    padded to the query tile), optionally merging `earlier` partials of the same rows.

    Queries are read in place from [B, T, H, D] when the tiles are whole tokens
    (`token_tiles`), else folded into the rows by a transpose (and a pad) first.

    Args:
      v_pool: None when `k_pool` holds V's heads too (`HeadLayout`).
      heads: where q's and the pools' heads sit; default `HeadLayout.of` the buffers.
      earlier: None, or partials (out [1, K, N', M', D] in float32 or q's dtype, lse
        [1, K, N', M'] float32) of the
        queries of ALL B rows folded into one row (as `cascade_attention`'s shared call
        folds them): row b's m is their row b * T * G + m. Requires num_splits == 1 and
        `merges_earlier`; the result is then the exact log-sum-exp merge of this call's
        keys and the earlier ones.
      tokens_out: write out as [B, T, H, D] (the queries' layout: no transpose after the
        call); requires `token_tiles` and num_splits == 1.
      prefix: cells every row attends to before its own (`PrefixCells`), in the same
        programs; requires num_splits == 1 and no `earlier`.
      contiguous_pages: as `paged_attention_partials` (the prefix says its own).
      name: the kernel's name, as a GPU profiler trace shows it (`statejax.perf.device_trace`):
        one per call site (append, decode, the cascade's shared and private parts), so a
        trace tells them apart.

    Returns:
      out [B, K, N, M_pad, D] (or [B, T, H, D] with `tokens_out`) in `out_dtype`, lse
      [B, K, N, M_pad] float32.
    """
    b, t, q_buffer_heads, d = q_BxTxHxD.shape
    num_pages, page_size = k_pool.shape[:2]
    heads = heads or HeadLayout.of(q_BxTxHxD, k_pool, v_pool)
    h, k_heads = heads.q_heads, heads.kv_heads
    bs = block_sizes
    g = h // k_heads
    rows = t * g
    rows_padded = pl.cdiv(rows, bs.block_q) * bs.block_q
    pages_per_block = bs.block_k // page_size
    num_blocks = pl.cdiv(window, bs.block_k)
    blocks_per_split = pl.cdiv(num_blocks, bs.num_splits)
    # The last block may read past the window: pad the table (entries are clamped anyway).
    need_pages = num_blocks * pages_per_block
    preload_width = 0
    if bs.preload_pages and not contiguous_pages:
        preload_width = _preload_width(blocks_per_split, pages_per_block)
        # The last split reads `preload_width` entries from its first block's.
        need_pages = max(need_pages, (bs.num_splits - 1) * blocks_per_split * pages_per_block
                         + preload_width)
    if page_table_BxP.shape[1] < need_pages:
        page_table_BxP = jnp.pad(page_table_BxP,
                                 ((0, 0), (0, need_pages - page_table_BxP.shape[1])))
    table_width = page_table_BxP.shape[1]
    merge_splits = 0 if earlier is None else earlier[0].shape[2]
    if earlier is not None and not (
            bs.num_splits == 1
            and merges_earlier(b, t, g, bs.block_q, earlier_rows=earlier[0].shape[3])):
        raise InputError(f"merging earlier partials needs num_splits 1 (got "
                         f"{bs.num_splits}) and `merges_earlier` (B={b}, T={t}, G={g}, "
                         f"block_q={bs.block_q}, {earlier[0].shape[3]} earlier rows)")

    if prefix is not None and (earlier is not None or bs.num_splits != 1):
        raise InputError(f"a prefix is attended in unsplit calls without earlier partials "
                         f"(num_splits={bs.num_splits}, earlier: {earlier is not None})")
    prefix_shape, prefix_specs, prefix_args = (None, [], []) if prefix is None else (
        _prefix_operands(prefix))
    # In place, a tile is one block of q seen as [B, T, heads / G, G x D].
    in_place = token_tiles(g, bs.block_q) and q_buffer_heads % g == 0
    if tokens_out and not (in_place and bs.num_splits == 1):
        raise InputError(f"tokens_out needs query tiles of whole tokens (G={g}, "
                         f"block_q={bs.block_q}: `token_tiles`) and num_splits 1 (got "
                         f"{bs.num_splits})")
    # A tile of whole tokens: block_q / G tokens x the G query heads of kv-head h, which in
    # [B, T, K, G x D] (a free reshape) is one rectangular block.
    token_spec = pl.BlockSpec((None, bs.block_q // g, None, g * d),
                              lambda b, h, i, s: (b, i, h, 0))
    if in_place:
        q, q_spec = q_BxTxHxD.reshape(b, t, q_buffer_heads // g, g * d), token_spec
    else:
        q = _fold_queries(q_BxTxHxD[:, :, :h], k_heads, rows_padded)
        q_spec = pl.BlockSpec((None, None, bs.block_q, d), lambda b, h, i, s: (b, h, i, 0))
    grid = (b, k_heads, rows_padded // bs.block_q, bs.num_splits)
    kernel = functools.partial(
        _flash_kernel, group=g, num_tokens=t, causal=causal, window=window,
        page_size=page_size, pages_per_block=pages_per_block,
        blocks_per_split=blocks_per_split, num_pages=num_pages, merge_splits=merge_splits,
        block_q=bs.block_q, overhang=in_place and rows % bs.block_q != 0,
        tokens_out=tokens_out, contiguous=contiguous_pages, prefix=prefix_shape,
        preload_width=preload_width)
    # kv-head h's cells: pool heads k_head + h and v_head + h (`HeadLayout`).
    in_specs = [
        pl.BlockSpec((None, 1), lambda b, h, i, s: (b, 0)),
        pl.BlockSpec((None, table_width), lambda b, h, i, s: (b, 0)),
        pl.BlockSpec((None, 1), lambda b, h, i, s: (0, 0)),
        q_spec,
        pl.BlockSpec((num_pages, page_size, None, d),
                     lambda b, h, i, s: (0, 0, h + heads.k_head, 0)),
        pl.BlockSpec((num_pages, page_size, None, d),
                     lambda b, h, i, s: (0, 0, h + heads.v_head, 0)),
    ]
    # The layer's page offset travels as data: as a constant each layer's kernel would differ
    # and be compiled apart.
    offset = jnp.full((1, 1), page_offset, jnp.int32)
    args = [lengths_B.reshape(b, 1), page_table_BxP, offset, q, k_pool,
            k_pool if v_pool is None else v_pool]
    in_specs += prefix_specs
    args += prefix_args
    if earlier is not None:
        row_blocks = pl.cdiv(rows, bs.block_q)  # query tiles a row; row b's follow b - 1's
        in_specs += [
            pl.BlockSpec((None, None, merge_splits, bs.block_q, d),
                         lambda b, h, i, s: (0, h, 0, b * row_blocks + i, 0)),
            pl.BlockSpec((None, None, merge_splits, bs.block_q),
                         lambda b, h, i, s: (0, h, 0, b * row_blocks + i)),
        ]
        args += list(earlier)
    lse_spec = pl.BlockSpec((None, None, None, bs.block_q), lambda b, h, i, s: (b, h, s, i))
    lse_shape = jax.ShapeDtypeStruct((b, k_heads, bs.num_splits, rows_padded), jnp.float32)
    if tokens_out:
        out_specs = [token_spec, lse_spec]
        out_shape = [jax.ShapeDtypeStruct((b, t, k_heads, g * d), out_dtype), lse_shape]
    else:
        out_specs = [pl.BlockSpec((None, None, None, bs.block_q, d),
                                  lambda b, h, i, s: (b, h, s, i, 0)), lse_spec]
        out_shape = [jax.ShapeDtypeStruct((b, k_heads, bs.num_splits, rows_padded, d),
                                          out_dtype), lse_shape]
    aliases = {}
    if poison_outputs:
        aliases = {len(args): 0, len(args) + 1: 1}
        args += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs += out_specs
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=triton_compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return (out.reshape(b, t, h, d) if tokens_out else out), lse


def _prefix_operands(prefix: PrefixCells):
    """(static shape, BlockSpecs, operands) of a prefix: what `_flash_kernel` knows of it,
    and its refs there: length, table (padded to whole KV blocks; entries are clamped
    anyway), offset, K and V pools."""
    num_pages, page_size, _, d = prefix.k_pool.shape
    pages_per_block = prefix.block_k // page_size
    blocks = pl.cdiv(prefix.window, prefix.block_k)
    preload_width = (_preload_width(blocks, pages_per_block)
                     if prefix.preload_pages and not prefix.contiguous else 0)
    shape = _PrefixShape(page_size=page_size, pages_per_block=pages_per_block,
                         num_pages=num_pages, window=prefix.window,
                         contiguous=prefix.contiguous, preload_width=preload_width)
    need = max(blocks * pages_per_block, preload_width)
    table = prefix.page_table_P
    if table.shape[0] < need:
        table = jnp.pad(table, (0, need - table.shape[0]))
    row = lambda width: pl.BlockSpec((None, width), lambda b, h, i, s: (0, 0))  # ref [width]
    specs = [row(1), row(table.shape[0]), row(1)]
    specs += [pl.BlockSpec((num_pages, page_size, None, d),
                           lambda b, h, i, s, first=first: (0, 0, h + first, 0))
              for first in (prefix.heads.k_head, prefix.heads.v_head)]
    operands = [jnp.reshape(prefix.length, (1, 1)), table[None],
                jnp.full((1, 1), prefix.page_offset, jnp.int32), prefix.k_pool, prefix.v_pool]
    return shape, specs, operands


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
    identity = (jnp.float32(MASK_VALUE), jnp.float32(0.0))
    lse, out = jax.lax.reduce((lse, out), identity, merge, (out.ndim - 2,))
    return out.astype(dtype), lse[..., 0]


# Reference.


def gather_pages(pool, page_table_BxP, window: int):
    """[num_pages, ps, K, D] pool -> [B, S, K, D] cells of each row (the first S)."""
    b, p = page_table_BxP.shape
    rows = pool[jnp.clip(page_table_BxP, 0, pool.shape[0] - 1)]  # [B, P, ps, K, D]
    return rows.reshape(b, p * pool.shape[1], *pool.shape[2:])[:, :window]


def paged_attention_reference(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                              window: int | None = None, causal: bool = True):
    """Plain-JAX specification of the paged kernel: gather the cells, then `attend`.

    Rows with no visible key give out 0 and lse MASK_VALUE (as the kernel does; `attend`
    would average the masked values, which merge with weight zero either way).

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32.
    """
    window = window or page_table_BxP.shape[1] * k_pool.shape[1]
    t = q_BxTxHxD.shape[1]
    k = gather_pages(k_pool, page_table_BxP, window)
    v = gather_pages(v_pool, page_table_BxP, window)
    key_pos = jnp.arange(window, dtype=jnp.int32)[None, None, :]
    if causal:
        q_pos = lengths_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        mask = key_pos <= q_pos[:, :, None]
    else:
        mask = jnp.broadcast_to(key_pos < lengths_B[:, None, None], (len(lengths_B), t, window))
    out, lse = attention.attend(q_BxTxHxD, k, v, mask)
    empty_BxT = ~jnp.any(mask, axis=-1)
    out = jnp.where(empty_BxT[:, :, None, None], jnp.zeros_like(out), out)
    lse = jnp.where(empty_BxT[:, :, None], MASK_VALUE, lse)
    return out, lse


# Contiguous cells [L, B, C, K, D] as a page pool.


def cells_page_size(cells: int, block_k: int = 128) -> int:
    """Page size used to view C contiguous cells as pages: the largest power of two <= block_k
    dividing C (a Budget's cells are multiples of its page size, typically 16)."""
    return _pow2_divisor(cells, block_k)


def cells_as_pool(cells, *, layer: int | None, rows: np.ndarray | jax.Array | None,
                  window: int, page_size: int):
    """Views cells [L, B, C, K, D] (with `layer`) or [B, C, K, D] as a paged pool.

    The pool is a reshape (free); row r's page j is pool page `table[r, j] + page_offset`. The
    table does not depend on the layer (the offset carries it), so the layers of one step share
    it: XLA computes it once instead of once per layer.

    Args:
      cells: the contiguous cells.
      layer: static layer index for 5-D cells, None for 4-D.
      rows: int32 [R] session rows to address (default all rows, in order).
      window: static S <= C: pages cover [0, S).
      page_size: divides C.

    Returns:
      (pool [L * B * C / page_size, page_size, K, D], page_table int32 [R, ceil(S / ps)],
       page_offset: static int, the layer's first pool page).
    """
    if cells.ndim == 5:
        if layer is None:
            raise InputError("5-D cells [L, B, C, K, D] need a layer index")
        num_layers, b, c, k_heads, d = cells.shape
        if not 0 <= layer < num_layers:
            raise InputError(f"layer={layer} out of range [0, {num_layers})")
    elif cells.ndim == 4:
        if layer is not None:
            raise InputError("4-D cells [B, C, K, D] take no layer index")
        num_layers, (b, c, k_heads, d), layer = 1, cells.shape, 0
    else:
        raise InputError(f"cells must be [L, B, C, K, D] or [B, C, K, D], got {cells.shape}")
    if c % page_size:
        raise InputError(f"page_size={page_size} must divide the cells per row C={c}")
    if not 1 <= window <= c:
        raise InputError(f"window={window} must be in [1, C={c}]")
    pages_per_row = c // page_size
    pool = cells.reshape(num_layers * b * pages_per_row, page_size, k_heads, d)
    rows = jnp.arange(b, dtype=jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
    pages_1xP = jnp.arange(pl.cdiv(window, page_size), dtype=jnp.int32)[None]
    table = (rows * pages_per_row)[:, None] + pages_1xP
    return pool, table, layer * b * pages_per_row


def on_cells(paged_fn, q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
             window: int, block_sizes, **kwargs):
    """Runs a paged wrapper over contiguous cells, viewed as pages of one KV block each.

    Args:
      paged_fn: a paged wrapper (`append_attention`, `decode_attention`, their Hopper
        variants): (q, k_pool, v_pool, table, lengths, *, window, block_sizes, page_offset,
        **kwargs) -> (out, lse).
      q_BxTxHxD: queries of the T new tokens.
      k_cells, v_cells: [L, B, C, K, D] (pass `layer`) or [B, C, K, D], new tokens written.
      lengths_B: int32 cells in use before the new tokens.
      layer: static layer index for 5-D cells.
      window: static S <= C.
      block_sizes: the call's tiles (chosen first: the page size follows their `block_k`).
      **kwargs: passed on (interpret, contiguous_pages, ...).

    Returns:
      what `paged_fn` returns: out_BxTxHxD, lse_BxTxH.
    """
    page_size = cells_page_size(k_cells.shape[-3], block_sizes.block_k)
    k_pool, table, offset = cells_as_pool(k_cells, layer=layer, rows=None, window=window,
                                          page_size=page_size)
    v_pool, _, _ = cells_as_pool(v_cells, layer=layer, rows=None, window=window,
                                 page_size=page_size)
    return paged_fn(q_BxTxHxD, k_pool, v_pool, table, lengths_B, window=window,
                    block_sizes=block_sizes, page_offset=offset, **kwargs)
