"""Pallas attention kernels vs their plain-JAX references.

Every case runs in interpret mode on CPU; `TestCompiledGpu` (marker `gpu`) runs the same cases
and larger ones compiled. Inputs are fresh random values; outputs start NaN-poisoned
(`poison_outputs`), and every cell a row may not read (past its last visible position, pages
no row owns) is NaN in the kernel's pool while the reference sees finite values: a kernel that
leaves an output unwritten, or reads a block beyond a row's length without masking it, fails.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import kernel_bench as kb_config
from statejax import attention
from statejax.errors import InputError
from statejax.kernels import append_attention as aa
from statejax.kernels import cascade_attention as ca
from statejax.kernels import decode_attention as da
from statejax.kernels import paged_flash as pf
from statejax.perf import gpu_target, kernel_bench
from tests.kernels import triton_ptx

# (out, lse) tolerances by dtype. lse is float32 from the same products in both paths.
TOLERANCE = {
    "float32": (dict(atol=2e-5, rtol=2e-5), dict(atol=2e-5, rtol=2e-5)),
    "bfloat16": (dict(atol=2e-2, rtol=2e-2), dict(atol=1e-3, rtol=1e-3)),
}
GPU = jax.default_backend() == "gpu"


@dataclasses.dataclass(frozen=True)
class Case:
    """One paged call: B = len(lengths) rows of T tokens at n = lengths[b]."""

    lengths: tuple[int, ...]
    t: int
    h: int
    k: int
    pages: int  # P, pages per row in the table
    d: int = 16
    page_size: int = 16
    dtype: str = "float32"
    window: int | None = None
    # (block_q, block_k, num_splits[, preload_pages])
    block: tuple[int, int, int] | tuple[int, int, int, bool] | None = None

    @property
    def block_sizes(self):
        if self.block is None:
            return None
        return aa.BlockSizes(*self.block[:3], preload_pages=len(self.block) > 3
                             and self.block[3])

    def __str__(self):
        return (f"n{'-'.join(map(str, self.lengths))}_t{self.t}_h{self.h}k{self.k}_d{self.d}"
                f"_ps{self.page_size}x{self.pages}_{self.dtype}_w{self.window}_b{self.block}")


def _pools(rng, case: Case, visible_B, contiguous: bool = False):
    """Random pools, a shuffled page table, and a copy of the pools with every cell past
    `visible_B[b]` in row b, and every page no row owns, set to NaN. (numpy: no compiles)
    With `contiguous`, each row's pages are a run (the rows' runs in shuffled order, after
    a page no row owns)."""
    b = len(case.lengths)
    num_pages = b * case.pages + 3
    shape = (num_pages, case.page_size, case.k, case.d)
    k_pool, v_pool = rng.standard_normal((2, *shape), np.float32)
    if contiguous:
        runs = rng.permutation(b)[:, None] * case.pages + 1 + np.arange(case.pages)[None]
        table = runs.reshape(b, case.pages)
    else:
        table = rng.permutation(num_pages)[: b * case.pages].reshape(b, case.pages)
    poison = np.ones((num_pages, case.page_size), bool)
    pos = np.arange(case.pages * case.page_size).reshape(case.pages, case.page_size)
    for row in range(b):
        poison[table[row]] = pos >= visible_B[row]
    nan = poison[:, :, None, None]
    dtype = jnp.dtype(case.dtype)
    clean = [jnp.asarray(p, dtype) for p in (k_pool, v_pool)]
    poisoned = [jnp.asarray(np.where(nan, np.nan, p), dtype) for p in (k_pool, v_pool)]
    return clean, poisoned, jnp.asarray(table, jnp.int32)


def _queries(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), jnp.dtype(dtype))


def _reference(fn, *args, **kwargs):
    with jax.default_matmul_precision("highest"):  # no TF32 in the GPU reference
        return jax.jit(fn, static_argnames=tuple(kwargs))(*args, **kwargs)


def _assert_close(got, want, dtype, tolerance=None):
    out_tol, lse_tol = (tolerance or TOLERANCE)[dtype]
    for x in got:
        assert not np.isnan(np.asarray(x, np.float32)).any(), "unwritten or unmasked output"
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               **out_tol)
    np.testing.assert_allclose(got[1], want[1], **lse_tol)


def _window(case):
    return case.window or case.pages * case.page_size


def check_paged(case: Case, fn, reference, *, interpret: bool, seed: int = 0,
                contiguous: bool = False, page_offset: int = 0):
    """`fn` is append_attention or decode_attention (same contract); with `contiguous`,
    through tables whose rows are runs of pages, as `contiguous_pages` (the kernel computes
    the pages from a row's first one); with `page_offset`, the kernel's pools hold that many
    NaN pages first and it adds the offset to the table's entries."""
    rng = np.random.default_rng(seed)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    visible = [min(n + case.t, _window(case)) for n in case.lengths]
    clean, poisoned, table = _pools(rng, case, visible, contiguous)
    poisoned = [jnp.concatenate([jnp.full((page_offset, *p.shape[1:]), jnp.nan, p.dtype), p])
                for p in poisoned]
    q = _queries(rng, (len(case.lengths), case.t, case.h, case.d), case.dtype)
    extra = dict(contiguous_pages=True) if contiguous else {}
    if page_offset:
        extra["page_offset"] = page_offset
    got = fn(q, *poisoned, table, lengths, window=case.window, block_sizes=case.block_sizes,
             interpret=interpret, poison_outputs=True, **extra)
    want = _reference(reference, q, *clean, table, lengths, window=case.window)
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    _assert_close(got, want, case.dtype)


APPEND_CASES = [
    # GQA 4; ragged rows incl. an empty one; default blocks gather 8 pages per step (> P).
    Case(lengths=(0, 17, 80), t=5, h=8, k=2, pages=6),
    # GQA 1, T = 1, lengths at page boundaries, window short of the table, one page per step.
    Case(lengths=(0, 15, 16, 33), t=1, h=2, k=2, pages=4, dtype="bfloat16", window=40,
         block=(16, 16, 1)),
    # GQA 8: query blocks of 16 rows hold 2 tokens each; 2 pages per step.
    Case(lengths=(3, 64, 29), t=7, h=8, k=1, pages=6, block=(16, 32, 1)),
    # Small pages, D = 32, a 16-token chunk.
    Case(lengths=(40, 0), t=16, h=8, k=2, pages=8, d=32, page_size=8, dtype="bfloat16",
         block=(32, 16, 1)),
]
DECODE_CASES = [
    # 3 splits of 2 blocks over 4 blocks: the last split is empty for every row.
    Case(lengths=(0, 1, 47, 100), t=1, h=8, k=2, pages=8, block=(16, 32, 3)),
    # Default tiles (one split at this size), T = 3 (speculative verification), GQA 8.
    Case(lengths=(5, 60), t=3, h=8, k=1, pages=4, dtype="bfloat16"),
    # GQA 1, 4 splits of one page each, ragged.
    Case(lengths=(0, 31, 50), t=2, h=2, k=2, pages=4, block=(16, 16, 4)),
]


@pytest.mark.parametrize("case", APPEND_CASES, ids=str)
def test_append_attention_interpret(case):
    check_paged(case, aa.append_attention, aa.append_attention_reference, interpret=True)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_attention_interpret(case):
    check_paged(case, da.decode_attention, da.decode_attention_reference, interpret=True)


@pytest.mark.parametrize("fn, reference, case", [
    # Ragged rows, 8 pages a KV step (past the table's 6); 2 pages a step; splits.
    (aa.append_attention, aa.append_attention_reference, APPEND_CASES[0]),
    (aa.append_attention, aa.append_attention_reference, APPEND_CASES[2]),
    (da.decode_attention, da.decode_attention_reference, DECODE_CASES[0]),
], ids=["append", "append-2-pages-a-step", "decode-splits"])
def test_contiguous_pages_are_computed_from_a_rows_first(fn, reference, case):
    """`contiguous_pages`: each row's pages computed from its first (the cells form's
    tables), rows in shuffled order in the pool, against the reference through the table."""
    check_paged(case, fn, reference, interpret=True, contiguous=True)


PRELOAD_CASES = [
    # 2 pages a step (3 splits of 2 blocks: 4 entries a program, the last split's past the
    # table); 1 page a step (4 splits); unsplit with 2 pages a step; a window short of the
    # table, 1 page a step.
    (da.decode_attention, da.decode_attention_reference,
     dataclasses.replace(DECODE_CASES[0], block=(16, 32, 3, True))),
    (da.decode_attention, da.decode_attention_reference,
     dataclasses.replace(DECODE_CASES[2], block=(16, 16, 4, True))),
    (aa.append_attention, aa.append_attention_reference,
     dataclasses.replace(APPEND_CASES[2], block=(16, 32, 1, True))),
    (aa.append_attention, aa.append_attention_reference,
     dataclasses.replace(APPEND_CASES[1], block=(16, 16, 1, True))),
]


@pytest.mark.parametrize("fn, reference, case", PRELOAD_CASES,
                         ids=["decode-2-pages", "decode-1-page", "append-2-pages",
                              "append-short-window"])
def test_preloaded_page_tables_pick_each_steps_pages(fn, reference, case):
    """`preload_pages`: a program's table entries read before its KV loop, each step's
    picked from them, through shuffled tables (entries offset, as a layer's), against the
    reference."""
    check_paged(case, fn, reference, interpret=True)
    check_paged(case, fn, reference, interpret=True, seed=1, page_offset=5)


def test_preloaded_page_tables_are_bounded():
    """More entries than `MAX_PRELOAD_PAGES` in a program's registers is refused, saying
    what to change; contiguous cells ignore the flag."""
    case = Case(lengths=(5,), t=1, h=2, k=2, pages=80, page_size=16,
                block=(16, 16, 1, True))
    with pytest.raises(InputError, match="at most 64"):
        check_paged(case, da.decode_attention, da.decode_attention_reference, interpret=True)
    check_paged(case, da.decode_attention, da.decode_attention_reference, interpret=True,
                contiguous=True)
    with pytest.raises(InputError, match="preload_pages=1 must be a bool"):
        pf.validate_block_sizes(aa.BlockSizes(16, 16, preload_pages=1), 16)


@dataclasses.dataclass(frozen=True)
class CascadeCase:
    """R branches of T tokens over one session row (n cells) and private cells (m_r each)."""

    shared_lengths: tuple[int, ...]  # several n, one compile
    branch_lengths: tuple[int, ...]
    t: int
    h: int
    k: int
    shared_pages: int
    branch_pages: int
    d: int = 16
    shared_page_size: int = 16
    branch_page_size: int = 8
    dtype: str = "float32"
    block_sizes: ca.BlockSizes | None = None

    def __str__(self):
        return (f"n{'-'.join(map(str, self.shared_lengths))}_m"
                f"{'-'.join(map(str, self.branch_lengths))}_t{self.t}_h{self.h}k{self.k}"
                f"_d{self.d}_{self.dtype}_b{self.block_sizes is not None}")


def check_cascade(case: CascadeCase, *, interpret: bool, seed: int = 0,
                  backend: str = "triton", tolerance=None, garbage: float | None = None,
                  joint_branch: bool = False):
    """`cascade_attention` vs its reference at every shared length of `case`.

    Cells no query may see hold NaN and the outputs are poisoned (an unwritten or unmasked
    element fails), unless `garbage` is given: the Mosaic shared part's contract is finite
    values there (it skips masking whole invisible tiles), so they hold `garbage` instead.
    `joint_branch`: the kernel reads the branch cells' K and V heads from one buffer
    ([.., 2K, D], as `BranchView` keeps them); the reference from two.
    """
    r = len(case.branch_lengths)
    rng = np.random.default_rng(seed)
    q = _queries(rng, (r, case.t, case.h, case.d), case.dtype)
    branch_case = Case(lengths=case.branch_lengths, t=case.t, h=case.h, k=case.k,
                       pages=case.branch_pages, d=case.d, page_size=case.branch_page_size,
                       dtype=case.dtype)
    b_clean, b_poisoned, b_table = _pools(rng, branch_case,
                                          [m + case.t for m in case.branch_lengths])
    b_lengths = jnp.asarray(case.branch_lengths, jnp.int32)
    if joint_branch:
        b_poisoned = [jnp.concatenate(b_poisoned, axis=2), None]
    for n in case.shared_lengths:
        shared_case = Case(lengths=(n,), t=case.t, h=case.h, k=case.k, pages=case.shared_pages,
                           d=case.d, page_size=case.shared_page_size, dtype=case.dtype)
        s_clean, s_poisoned, s_table = _pools(rng, shared_case, [n])
        if garbage is not None:
            s_poisoned = [jnp.where(jnp.isnan(p), garbage, p).astype(p.dtype)
                          for p in s_poisoned]
        got = ca.cascade_attention(q, *s_poisoned, s_table[0], jnp.int32(n), *b_poisoned,
                                   b_table, b_lengths, block_sizes=case.block_sizes,
                                   interpret=interpret, backend=backend,
                                   poison_outputs=garbage is None)
        want = _reference(ca.cascade_attention_reference, q, *s_clean, s_table[0],
                          jnp.int32(n), *b_clean, b_table, b_lengths)
        _assert_close(got, want, case.dtype, tolerance)


_SPLIT_TILES = ca.BlockSizes(shared=aa.BlockSizes(block_q=16, block_k=32, num_splits=3),
                             private=aa.BlockSizes(block_q=16, block_k=16))
CASCADE_CASES = [
    # Empty, one-cell and multi-block shared prefixes; ragged private cells; default tiles.
    CascadeCase(shared_lengths=(0, 1, 70), branch_lengths=(0, 5, 20), t=4, h=8, k=2,
                shared_pages=8, branch_pages=4),
    # GQA 8, T = 1 (a decode step of every branch), split shared part, bf16.
    CascadeCase(shared_lengths=(100,), branch_lengths=(3, 0), t=1, h=8, k=1, shared_pages=8,
                branch_pages=2, dtype="bfloat16", block_sizes=_SPLIT_TILES),
    # bf16 shared splits merged in the private kernel's epilogue (T x G = 16 fills its tile):
    # the splits' partial outputs are bf16 there.
    CascadeCase(shared_lengths=(0, 37, 100), branch_lengths=(2, 0), t=4, h=8, k=2,
                shared_pages=8, branch_pages=2, dtype="bfloat16", block_sizes=_SPLIT_TILES),
]
SPLIT_MERGED = CASCADE_CASES[-1]  # shared splits merged in the private kernel's epilogue
# One shared split: one kernel (`cascade_attention.fuses`), each program over the shared cells
# and then its branch's own. Tiles of one branch (T x G = 16 rows), a padded tile of one
# branch (G = 8, T = 1), two tiles a branch in bf16; 32-cell shared steps, 16-cell private.
_FUSED_TILES = ca.BlockSizes(shared=aa.BlockSizes(block_q=16, block_k=32, num_splits=1),
                             private=aa.BlockSizes(block_q=16, block_k=16))
FUSED_CASES = [
    CascadeCase(shared_lengths=(0, 1, 70), branch_lengths=(0, 5, 20), t=4, h=8, k=2,
                shared_pages=8, branch_pages=4, block_sizes=_FUSED_TILES),
    CascadeCase(shared_lengths=(100, 128), branch_lengths=(3,), t=1, h=8, k=1, shared_pages=8,
                branch_pages=2, block_sizes=_FUSED_TILES),
    CascadeCase(shared_lengths=(0, 33), branch_lengths=(2, 9), t=8, h=8, k=2, shared_pages=4,
                branch_pages=4, dtype="bfloat16", block_sizes=_FUSED_TILES),
]
CASCADE_CASES += FUSED_CASES


@pytest.mark.parametrize("case", CASCADE_CASES, ids=str)
def test_cascade_attention_interpret(case):
    check_cascade(case, interpret=True)


def _preloaded(tiles: ca.BlockSizes) -> ca.BlockSizes:
    return ca.BlockSizes(shared=dataclasses.replace(tiles.shared, preload_pages=True),
                         private=dataclasses.replace(tiles.private, preload_pages=True))


@pytest.mark.parametrize("case", [
    dataclasses.replace(FUSED_CASES[0], block_sizes=_preloaded(_FUSED_TILES)),
    dataclasses.replace(FUSED_CASES[2], block_sizes=_preloaded(_FUSED_TILES)),
    dataclasses.replace(CASCADE_CASES[1], block_sizes=_preloaded(_SPLIT_TILES)),
    dataclasses.replace(SPLIT_MERGED, block_sizes=_preloaded(_SPLIT_TILES)),
], ids=["one-kernel", "one-kernel-bf16", "split", "split-merged"])
def test_cascade_with_preloaded_page_tables(case):
    """`preload_pages` in both parts of a cascade, the one-kernel form's shared cells
    (the prefix) included, through shuffled tables."""
    check_cascade(case, interpret=True)


@pytest.mark.parametrize("case", CASCADE_CASES, ids=str)
def test_cascade_reads_branch_k_and_v_from_one_buffer(case):
    check_cascade(case, interpret=True, seed=1, joint_branch=True)


def test_joint_pool_must_hold_two_halves():
    q, pool, _, table, lengths = _valid_args()
    odd = jnp.ones((5, 16, 3, 16))
    with pytest.raises(InputError, match=r"one buffer must be \[num_pages, page_size, 2K, D\]"):
        pf.validate_paged(q, odd, None, table, lengths, None, compiled=False)
    # [.., 2K, D] with K = 2: the 4 query heads are a multiple of 2, not of the 4 pool heads.
    assert pf.validate_paged(q, jnp.ones((5, 16, 4, 16)), None, table, lengths, None,
                             compiled=False) == 32
    with pytest.raises(InputError, match="shared and branch pools differ"):
        ca.cascade_attention(q[:1], pool, pool, table[0], jnp.int32(3), pool, None,
                             table[:1], lengths[:1], interpret=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cascade_shared_partials_are_written_in_the_queries_dtype(dtype):
    """The shared splits' partial outputs (the bytes the private kernel's merge reads) are
    q's dtype, their log-sum-exps float32; the merged output is q's dtype."""
    case = SPLIT_MERGED
    rng = np.random.default_rng(0)
    q = _queries(rng, (2, case.t, case.h, case.d), dtype)
    pool = _queries(rng, (8, case.shared_page_size, case.k, case.d), dtype)
    table = jnp.arange(8, dtype=jnp.int32)
    jaxpr = jax.make_jaxpr(functools.partial(
        ca.cascade_attention, block_sizes=case.block_sizes, interpret=True))(
        q, pool, pool, table, jnp.int32(100), pool, pool, table.reshape(2, 4),
        jnp.zeros((2,), jnp.int32))
    calls = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    assert len(calls) == 2  # shared splits, then private + merge
    assert [v.aval.dtype for v in calls[0].outvars] == [jnp.dtype(dtype), jnp.float32]
    assert [v.aval.dtype for v in calls[1].outvars] == [jnp.dtype(dtype), jnp.float32]


def test_one_shared_split_is_one_kernel():
    """With one shared split the cascade is one Pallas call (`statejax_cascade`), reading q
    and writing its output in the queries' layout; the rule fuses one branch, or branches
    whose query tiles are whole; split tiles stay two calls (`test_cascade_shared_partials_
    are_written_in_the_queries_dtype`)."""
    case = FUSED_CASES[0]
    r, t, k, g, d = 3, case.t, case.k, case.h // case.k, case.d
    q = jnp.ones((r, t, case.h, d))
    pool = jnp.ones((12, 16, k, d))
    table = jnp.arange(12, dtype=jnp.int32)
    call = lambda *a: ca.cascade_attention(*a, block_sizes=_FUSED_TILES, interpret=True)[0]
    args = (q, pool, pool, table[:8], jnp.int32(70), pool, pool, table.reshape(3, 4),
            jnp.zeros((3,), jnp.int32))
    assert _kernel_layouts(call, *args) == [((r, t, k, g * d), (r, t, k, g * d))]
    calls = [e for e in _all_eqns(jax.make_jaxpr(call)(*args).jaxpr)
             if e.primitive.name == "pallas_call"]
    assert [e.params["name"] for e in calls] == ["statejax_cascade"]
    shared = _FUSED_TILES.shared
    assert ca.fuses(3, 4, 4, shared) and ca.fuses(1, 1, 8, shared)
    assert not ca.fuses(2, 1, 8, shared)  # 8-row branches share a tile: folded, two calls
    assert not ca.fuses(1, 4, 4, dataclasses.replace(shared, num_splits=2))
    with pytest.raises(InputError, match="a prefix is attended in unsplit calls"):
        pf.paged_flash_folded(
            q, pool, pool, table.reshape(3, 4), jnp.zeros((3,), jnp.int32), window=64,
            causal=True, block_sizes=dataclasses.replace(shared, num_splits=2),
            out_dtype=q.dtype, interpret=True,
            prefix=pf.PrefixCells(pool, pool, table, jnp.int32(3), 64, 32, 0,
                                  pf.HeadLayout(case.h, k)))


def _all_eqns(jaxpr):
    """Equations of a jaxpr and of every jaxpr nested in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _all_eqns(inner)


# Query tiles of whole tokens (`token_tiles`): q read, and an unsplit output written, in the
# model's [B, T, H, D] layout; tiles of 16, 2 and 8 tokens, GQA 1 / 8 / 2; in the last two
# the last tile reaches past T (5 tokens in tiles of 2; 3 in one tile of 8: masked rows).
TOKEN_TILE_CASES = [
    Case(lengths=(0, 33, 70), t=32, h=2, k=2, pages=8, block=(16, 32, 1)),
    Case(lengths=(9, 64), t=5, h=8, k=1, pages=6, dtype="bfloat16", block=(16, 16, 1)),
    Case(lengths=(40,), t=3, h=4, k=2, pages=5, d=32, block=(16, 16, 1)),
]


def _kernel_layouts(fn, *args) -> list[tuple[tuple, tuple]]:
    """(q operand shape, first output shape) of each Pallas call of fn(*args)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [(tuple(e.invars[3].aval.shape), tuple(e.outvars[0].aval.shape))
            for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("case", TOKEN_TILE_CASES, ids=str)
def test_token_tiles_read_and_write_the_queries_layout(case):
    """Tiles of whole tokens: the same answers as the reference (outputs poisoned: a row
    the masked last tile fails to write is NaN), and the kernel reads q and writes its
    output as [B, T, K, G x D] (free reshapes of [B, T, H, D]: no transpose or pad before
    or after it), the last tile overhanging T or not."""
    g = case.h // case.k
    assert pf.token_tiles(g, case.block[0])
    check_paged(case, aa.append_attention, aa.append_attention_reference, interpret=True)
    b = len(case.lengths)
    q = jnp.ones((b, case.t, case.h, case.d))
    pool = jnp.ones((b * case.pages, case.page_size, case.k, case.d))
    table = jnp.zeros((b, case.pages), jnp.int32)
    lengths = jnp.zeros((b,), jnp.int32)
    call = lambda q, k_pool: aa.append_attention(q, k_pool, k_pool, table, lengths,
                                                 block_sizes=case.block_sizes,
                                                 interpret=True)[0]
    as_tokens = (b, case.t, case.k, g * case.d)
    assert _kernel_layouts(call, q, pool) == [(as_tokens, as_tokens)]
    # Three query heads a kv-head are no power of two: folded (rows padded to the tile).
    rows = -(-case.t * 3 // case.block[0]) * case.block[0]
    q3, pool3 = jnp.ones((b, case.t, 6, case.d)), jnp.ones((b * case.pages, case.page_size, 2,
                                                           case.d))
    assert _kernel_layouts(call, q3, pool3) == [((b, 2, rows, case.d), (b, 2, 1, rows, case.d))]


def test_token_tiles_rule():
    assert pf.token_tiles(4, 128) and pf.token_tiles(8, 16) and pf.token_tiles(1, 16)
    assert not pf.token_tiles(3, 48)  # a power-of-two G only (Triton's tensors)
    assert not pf.token_tiles(32, 16)  # a token's heads span two tiles
    # Merging earlier partials: whole tiles a row, or one row within the earlier rows.
    assert pf.merges_earlier(3, 8, 4, 32, earlier_rows=96)
    assert pf.merges_earlier(1, 1, 4, 16, earlier_rows=16)
    assert not pf.merges_earlier(2, 1, 4, 16, earlier_rows=16)
    assert not pf.merges_earlier(1, 1, 4, 32, earlier_rows=16)


def test_token_tiles_cascade_merges_into_the_queries_layout():
    """Both cascade kernels read the branch queries in place (the shared one as R x T tokens
    of one row) and the private one, merging the shared splits, writes their layout itself
    (SPLIT_MERGED: T x G = 16 rows fill its tile), the shared partials stay folded."""
    case = SPLIT_MERGED
    rng = np.random.default_rng(0)
    q = _queries(rng, (2, case.t, case.h, case.d), case.dtype)
    pool = _queries(rng, (8, case.shared_page_size, case.k, case.d), case.dtype)
    table = jnp.arange(8, dtype=jnp.int32)
    args = (q, pool, pool, table, jnp.int32(100), pool, pool, table.reshape(2, 4),
            jnp.zeros((2,), jnp.int32))
    call = lambda *a: ca.cascade_attention(*a, block_sizes=case.block_sizes,
                                           interpret=True)[0]
    r, t, k, g, d = 2, case.t, case.k, case.h // case.k, case.d
    splits = case.block_sizes.shared.num_splits
    assert _kernel_layouts(call, *args) == [
        ((1, r * t, k, g * d), (1, k, splits, r * t * g, d)),
        ((r, t, k, g * d), (r, t, k, g * d))]
    check_cascade(case, interpret=True, seed=3)


# One branch generating (T = 1, G = 4: 4 of a 16-row tile): the private kernel merges the
# shared splits in its epilogue all the same, q and out in the branch's layout.
DECODE_BRANCH = CascadeCase(shared_lengths=(0, 37, 100), branch_lengths=(5,), t=1, h=8, k=2,
                            shared_pages=8, branch_pages=2, dtype="bfloat16",
                            block_sizes=_SPLIT_TILES)


def test_one_generating_branch_merges_in_the_private_kernel():
    case = DECODE_BRANCH
    rng = np.random.default_rng(0)
    q = _queries(rng, (1, 1, case.h, case.d), case.dtype)
    pool = _queries(rng, (8, case.shared_page_size, case.k, case.d), case.dtype)
    table = jnp.arange(8, dtype=jnp.int32)
    call = lambda *a: ca.cascade_attention(*a, block_sizes=case.block_sizes,
                                           interpret=True)[0]
    args = (q, pool, pool, table, jnp.int32(100), pool, pool, table[None, :2],
            jnp.zeros((1,), jnp.int32))
    k, g, d = case.k, case.h // case.k, case.d
    assert _kernel_layouts(call, *args) == [((1, 1, k, g * d), (1, k, 3, 16, d)),
                                            ((1, 1, k, g * d), (1, 1, k, g * d))]
    check_cascade(case, interpret=True, seed=4)
    # Two such branches: their rows 4 apart in the shared partials, no tile each: combined
    # after the kernels (the private part a float32 partial).
    two = dataclasses.replace(case, branch_lengths=(5, 0))
    q2 = jnp.concatenate([q, q])
    args2 = (q2, *args[1:5], pool, pool, table[:4].reshape(2, 2), jnp.zeros((2,), jnp.int32))
    assert _kernel_layouts(call, *args2)[1][1] == (2, k, 1, 16, d)
    check_cascade(two, interpret=True, seed=5)


def test_tokens_out_needs_token_tiles():
    q, pool, _, table, lengths = _valid_args()
    with pytest.raises(InputError, match="tokens_out needs query tiles of whole tokens"):
        pf.paged_flash_folded(q, pool, pool, table, lengths, window=32, causal=True,
                              block_sizes=aa.BlockSizes(block_q=16, block_k=16, num_splits=2),
                              out_dtype=q.dtype, interpret=True, tokens_out=True)


def check_cells(*, dtype: str, interpret: bool, d: int = 16, cells: int = 48, window: int = 40):
    """Contiguous [L, B, C, K, D] entry points vs `attend` exactly as AppendView calls it."""
    layers, lengths, t, h, k = 2, (0, 9, 30), 5, 4, 2
    rng = np.random.default_rng(1)
    shape = (layers, len(lengths), cells, k, d)
    k_cells, v_cells = (_queries(rng, shape, dtype) for _ in range(2))
    q = _queries(rng, (len(lengths), t, h, d), dtype)
    n = jnp.asarray(lengths, jnp.int32)
    q_pos = n[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    mask = jnp.arange(window, dtype=jnp.int32)[None, None, :] <= q_pos[:, :, None]
    want = _reference(attention.attend, q, k_cells[1, :, :window], v_cells[1, :, :window],
                      mask)
    for fn in (aa.append_attention_cells, da.decode_attention_cells):
        got = fn(q, k_cells, v_cells, n, layer=1, window=window, interpret=interpret)
        _assert_close(got, want, dtype)


def test_contiguous_cells_interpret():
    check_cells(dtype="float32", interpret=True)


def check_first_token_branches(*, dtype: str, interpret: bool, t: int = 4, h: int = 8,
                               k: int = 2, d: int = 16, window: int = 48, block_sizes=None):
    """First-token branches (no private cells) read their own K and V from the q/k/v buffer
    one fusion writes: against `attend` over the session's cells [0, n) and, causally, the
    branch's own tokens. Session cells past n are NaN in the kernel's input."""
    layers, rows, cells, row = 2, 3, 2 * window, 1
    rng = np.random.default_rng(2)
    shared = [_queries(rng, (layers, rows, cells, k, d), dtype) for _ in range(2)]
    qkv = _queries(rng, (2, t, h + 2 * k, d), dtype)
    q, k_new, v_new = qkv[:, :, :h], qkv[:, :, h:h + k], qkv[:, :, h + k:]
    for n in (0, 17, window):
        unseen = (jnp.arange(cells) >= n)[None, None, :, None, None]
        poisoned = [jnp.where(unseen, jnp.nan, c).astype(c.dtype) for c in shared]
        got = ca.cascade_attention_cells(
            qkv, *poisoned, jnp.int32(row), jnp.int32(n), None, None, None, layer=1,
            shared_window=window, interpret=interpret, q_heads=h, block_sizes=block_sizes)
        keys, values = ([jnp.concatenate([jnp.broadcast_to(c[1, row, :window], (2, window, k, d)),
                                          new], axis=1)] for c, new in zip(
                            shared, (k_new, v_new), strict=True))
        mask = jnp.concatenate([jnp.broadcast_to(jnp.arange(window) < n, (2, t, window)),
                                jnp.broadcast_to(jnp.tri(t, dtype=bool), (2, t, t))], axis=-1)
        want = _reference(attention.attend, q, keys[0], values[0], mask)
        assert got[0].shape == q.shape
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles", [None, _FUSED_TILES], ids=["default", "one_kernel"])
def test_first_token_branches_read_their_k_and_v_from_the_qkv_buffer(dtype, tiles):
    check_first_token_branches(dtype=dtype, interpret=True, block_sizes=tiles)


def test_first_token_branches_take_qkv_or_cells():
    qkv = jnp.ones((1, 4, 12, 16))
    cells = jnp.ones((2, 1, 64, 2, 16))
    call = functools.partial(ca.cascade_attention_cells, shared_k=cells, shared_v=cells,
                             row=jnp.int32(0), shared_len=jnp.int32(3), layer=0,
                             shared_window=32, interpret=True)
    with pytest.raises(InputError, match="one of the two"):
        call(qkv, branch_k=None, branch_v=None, branch_lengths_R=None)
    with pytest.raises(InputError, match=r"holds 6 \+ 2 x 2 heads"):
        call(qkv, branch_k=None, branch_v=None, branch_lengths_R=None, q_heads=6)


def test_cells_as_pool_addresses_layer_and_row():
    cells = jnp.arange(2 * 3 * 32).reshape(2, 3, 32, 1, 1)
    pool, table, offset = pf.cells_as_pool(cells, layer=1, rows=jnp.asarray([2]), window=20,
                                           page_size=8)
    np.testing.assert_array_equal(pf.gather_pages(pool, table + offset, 20)[0, :, 0, 0],
                                  cells[1, 2, :20, 0, 0])
    # The table does not depend on the layer: every layer of a step shares it.
    _, table_0, offset_0 = pf.cells_as_pool(cells, layer=0, rows=jnp.asarray([2]), window=20,
                                            page_size=8)
    np.testing.assert_array_equal(table_0, table)
    assert (offset_0, offset) == (0, 3 * 32 // 8)


# ---------------------------------------------------------------- validation (no kernel run)


def _valid_args(dtype=jnp.float32):
    q = jnp.ones((2, 3, 4, 16), dtype)
    pool = jnp.ones((5, 16, 2, 16), dtype)
    return q, pool, pool, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize("change, match", [
    (lambda a: (a[0][0],) + a[1:], r"q must be \[B, T, H, D\]"),
    (lambda a: (jnp.ones((2, 3, 3, 16)),) + a[1:], "multiple of kv-heads"),
    (lambda a: (a[0].astype(jnp.bfloat16),) + a[1:], "share one dtype"),
    (lambda a: a[:3] + (a[3].astype(jnp.float32),) + a[4:], "page_table must be int32"),
    (lambda a: a[:4] + (jnp.zeros((3,), jnp.int32),), r"lengths must be int32 \[B=2\]"),
    (lambda a: (a[0], a[1][..., :8], a[2][..., :8]) + a[3:], "head dim"),
])
def test_bad_inputs_raise_clear_errors(change, match):
    for fn in (aa.append_attention, da.decode_attention):
        with pytest.raises(InputError, match=match):
            fn(*change(_valid_args()), interpret=True)


def test_bad_window_block_sizes_and_backend_raise():
    args = _valid_args()
    with pytest.raises(InputError, match="window=40"):
        aa.append_attention(*args, window=40, interpret=True)
    with pytest.raises(InputError, match="multiple of page_size"):
        aa.append_attention(*args, block_sizes=aa.BlockSizes(block_q=16, block_k=24),
                            interpret=True)
    with pytest.raises(InputError, match="backend="):
        aa.append_attention(*args, interpret=True, backend="cuda")
    with pytest.raises(InputError, match="num_splits=1"):
        aa.append_attention(*args, block_sizes=aa.BlockSizes(16, 16, num_splits=2),
                            interpret=True)
    for bad in (-1, 1.5):
        with pytest.raises(InputError, match="page_offset must be a static int"):
            da.decode_attention(*args, interpret=True, page_offset=bad)
    for bad in (31.9, True, "32"):  # not truncated to a window nobody asked for
        for fn in (aa.append_attention, da.decode_attention):
            with pytest.raises(InputError, match="allowed: None or a static int"):
                fn(*args, window=bad, interpret=True)
    q, k_pool, v_pool, table, lengths = args
    for sized, match in (((q[:0], k_pool, v_pool, table[:0], lengths[:0]), "'B': 0"),
                         ((q[:, :, :0], k_pool, v_pool, table, lengths), "'H': 0"),
                         ((q, k_pool, v_pool, table[:, :0], lengths), "'P': 0")):
        for fn in (aa.append_attention, da.decode_attention):
            with pytest.raises(InputError, match=f"every size must be >= 1.*{match}"):
                fn(*sized, interpret=True)
    shared = (q[:1], k_pool, v_pool, table[0], jnp.int32(3), k_pool, v_pool, table[:1],
              lengths[:1])
    with pytest.raises(InputError, match=r"allowed for the cascade: \('triton', "
                       r"'mosaic_gpu', None\)"):
        ca.cascade_attention(*shared, interpret=True, backend="mosaic")
    if not GPU:
        with pytest.raises(InputError, match="need a GPU"):
            da.decode_attention(*args, interpret=False)


def test_default_block_sizes_follow_the_shape():
    # The tiles the H100 tuning run measured fastest on the target shapes
    # (docs/results/kernel_bench_h100/triton_tune).
    ingest = aa.BlockSizes.for_append(rows=512 * 4, head_dim=128, page_size=16)
    assert (ingest.block_q, ingest.block_k, ingest.num_splits, ingest.num_warps) == (
        128, 64, 1, 4)
    decode = da.default_block_sizes(batch=8, rows=4, k_heads=8, head_dim=128, page_size=16,
                                    window=16384)
    assert (decode.block_q, decode.block_k, decode.num_splits, decode.num_warps,
            decode.num_stages) == (16, 64, 8, 4, 2)
    one = da.default_block_sizes(batch=1, rows=32, k_heads=8, head_dim=64, page_size=16,
                                 window=32768)
    assert one.block_k == 128  # 16 KiB K blocks: 128 cells at D = 64
    assert one.num_splits == 64  # one long session still fills the GPU
    assert 8 * one.num_splits >= 512 and 32768 // 128 // one.num_splits >= 2
    # float32 cells at D = 128: the same 16 KiB per K block is 32 cells.
    wide = da.default_block_sizes(batch=1, rows=2, k_heads=8, head_dim=128, page_size=16,
                                  window=384, itemsize=4)
    assert wide.block_k == 32 and wide.num_splits == 384 // 32 // 2
    # A page larger than the byte-sized block wins: KV steps gather whole pages.
    paged = da.default_block_sizes(batch=8, rows=4, k_heads=8, head_dim=128, page_size=128,
                                   window=16384)
    assert paged.block_k == 128
    odd = da.default_block_sizes(batch=8, rows=4, k_heads=8, head_dim=80, page_size=16,
                                 window=16384)
    assert odd.block_k == 64  # 102 cells rounded down to a power of two
    # Pages of a size that is not a power of two (interpret mode takes them): whole pages,
    # a power of two of them per KV step.
    assert aa.BlockSizes.for_append(rows=64, head_dim=64, page_size=24).block_k == 96
    assert aa.BlockSizes.for_append(rows=64, head_dim=64, page_size=200).block_k == 200
    assert da.default_block_sizes(batch=1, rows=4, k_heads=2, head_dim=128, page_size=12,
                                  window=480).block_k == 48


def test_pages_of_any_size_run_on_default_tiles():
    """A page size that is not a power of two runs in interpret mode on the default tiles
    (they were page-size-blind: a 128-cell step is not whole 24-cell pages)."""
    rng = np.random.default_rng(5)
    q = _queries(rng, (2, 3, 4, 16), jnp.float32)
    k_pool, v_pool = (_queries(rng, (12, 24, 2, 16), jnp.float32) for _ in range(2))
    table = jnp.asarray([[0, 5, 2, 7, 9], [1, 3, 4, 6, 8]], jnp.int32)
    lengths = jnp.asarray([40, 97], jnp.int32)
    for fn, ref in ((aa.append_attention, aa.append_attention_reference),
                    (da.decode_attention, da.decode_attention_reference)):
        _assert_close(fn(q, k_pool, v_pool, table, lengths, interpret=True),
                      ref(q, k_pool, v_pool, table, lengths), "float32")


def test_cells_take_64_cell_steps_at_head_dim_128(monkeypatch):
    """Over contiguous cells the append kernel runs its documented D >= 128 tiles (64-cell
    KV steps, the H100 winner), not whatever a 128-cell page forces."""
    seen = []
    real = aa.append_attention

    def spy(*args, block_sizes, **kwargs):
        seen.append((args[1].shape[1], block_sizes))
        return real(*args, block_sizes=block_sizes, **kwargs)

    monkeypatch.setattr(aa, "append_attention", spy)
    rng = np.random.default_rng(6)
    k_cells, v_cells = (_queries(rng, (1, 256, 1, 128), jnp.float32) for _ in range(2))
    q = _queries(rng, (1, 2, 2, 128), jnp.float32)
    aa.append_attention_cells(q, k_cells, v_cells, jnp.asarray([70], jnp.int32), layer=None,
                              window=256, interpret=True)
    (page_size, bs), = seen
    assert (page_size, bs.block_k) == (64, 64)


# ---------------------------------------------------------------- larger cases for the GPU

GPU_APPEND = APPEND_CASES + [
    Case(lengths=(0, 700, 1500), t=32, h=32, k=8, pages=100, d=64, dtype="bfloat16"),
    Case(lengths=(1000, 37), t=128, h=32, k=8, pages=32, d=128, page_size=64,
         dtype="bfloat16"),
    Case(lengths=(513, 0), t=64, h=16, k=4, pages=40, d=128, page_size=16),
]
GPU_DECODE = DECODE_CASES + [
    Case(lengths=(4095, 17, 2048, 3000), t=1, h=32, k=8, pages=256, d=128, dtype="bfloat16"),
    Case(lengths=(1000, 0), t=4, h=32, k=8, pages=32, d=64, page_size=64, dtype="bfloat16"),
    Case(lengths=(300,), t=2, h=8, k=8, pages=24, d=128, page_size=16),
]
GPU_CASCADE = CASCADE_CASES + [
    CascadeCase(shared_lengths=(0, 3000), branch_lengths=(0, 32, 5, 60, 1, 2, 3, 4), t=32,
                h=32, k=8, shared_pages=256, branch_pages=8, d=64, branch_page_size=16,
                dtype="bfloat16"),
]



# ---------------------------------------------------------------- Triton lowering on CPU

# The lowering reads the target GPU's compute capability: from the device (jax 0.10) or, with no
# GPU present, only from an abstract device (jax 0.11). Lower for the bench's card.
# What Triton's lowering reads of the target (its model), where no compile-only device exists.
_H100_KIND = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")


def _compile_only_h100():
    """The compile-only H100 (`statejax.perf.gpu_target`), or None without jax's CUDA plugin."""
    try:
        return gpu_target.target_device("h100")
    except InputError:
        return None


H100 = _compile_only_h100()


def _lower_or_compile(fn, args, static, compile_for) -> str:
    """Lowers jitted `fn` for CUDA (Pallas -> Triton IR, no GPU needed); with `compile_for`
    (a compile-only device), compiles it too (Triton -> PTX -> machine code)."""
    if compile_for is not None:
        return gpu_target.compile_for(fn, compile_for, *args, **static).as_text()
    with gpu_target.compiling_for(_H100_KIND):
        return fn.trace(*args, **static).lower(lowering_platforms=("cuda",)).as_text()


def _lower_paged(case: Case, *, causal: bool, block_sizes: aa.BlockSizes, compile_for=None):
    """One kernel call of `case` (append or decode tiles)."""
    b = len(case.lengths)
    dtype = jnp.dtype(case.dtype)
    q = jax.ShapeDtypeStruct((b, case.t, case.h, case.d), dtype)
    pool = jax.ShapeDtypeStruct((b * case.pages + 3, case.page_size, case.k, case.d), dtype)
    table = jax.ShapeDtypeStruct((b, case.pages), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    call = jax.jit(lambda *args: pf.paged_attention_partials(
        *args, window=_window(case), causal=causal, block_sizes=block_sizes,
        out_dtype=dtype if block_sizes.num_splits == 1 else jnp.float32, interpret=False,
        poison_outputs=True))
    text = _lower_or_compile(call, (q, pool, pool, table, lengths), {}, compile_for)
    assert text.count("xla.gpu.triton") >= 1


def _lower_cascade(c: CascadeCase, *, compile_for=None):
    """The whole cascade call of `c`: the shared kernel and the private one (which merges the
    shared splits in its epilogue when the branch's query rows fill whole tiles), or with one
    shared split one kernel (`cascade_attention.fuses`)."""
    r = len(c.branch_lengths)
    dtype = jnp.dtype(c.dtype)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    q = jax.ShapeDtypeStruct((r, c.t, c.h, c.d), dtype)
    s_pool = jax.ShapeDtypeStruct((c.shared_pages + 3, c.shared_page_size, c.k, c.d), dtype)
    b_pool = jax.ShapeDtypeStruct((r * c.branch_pages + 3, c.branch_page_size, c.k, c.d),
                                  dtype)
    args = (q, s_pool, s_pool, i32(c.shared_pages), i32(), b_pool, b_pool,
            i32(r, c.branch_pages), i32(r))
    static = dict(block_sizes=c.block_sizes, interpret=False, poison_outputs=True)
    text = _lower_or_compile(ca.cascade_attention, args, static, compile_for)
    one_kernel = c.block_sizes is not None and ca.fuses(r, c.t, c.h // c.k, c.block_sizes.shared)
    assert (text.count("xla.gpu.triton") == 1) if one_kernel else (
        text.count("xla.gpu.triton") >= 2)


def _tuning_cases():
    """The benchmark's Triton tuning grids on the shapes they are timed on."""
    tune, query = kb_config.get_config("gpu-tune"), kb_config.get_config("gpu-query")
    for kind, shape, grid in (("decode", tune.decode[0], tune.tune_decode),
                              ("append", tune.append[0], tune.tune_append)):
        rows, cells, t, h, k, d = shape
        case = Case(lengths=(cells,) * rows, t=t, h=h, k=k, d=d, page_size=tune.page_size,
                    pages=-(-(cells + t) // tune.page_size), dtype=tune.dtype)
        for entry in grid:
            yield pytest.param(functools.partial(_lower_paged, case, causal=True,
                                                 block_sizes=aa.BlockSizes(*entry)),
                               id=f"tune-{kind}-{entry}")
    for name, shape, grid in (("query", query.cascade[0], query.tune_cascade),
                              ("query-1k", query.cascade[1], query.tune_cascade_second)):
        r, cells, t, h, k, d = shape
        for entry in grid:
            case = CascadeCase(
                shared_lengths=(cells,), branch_lengths=(0,) * r, t=t, h=h, k=k,
                shared_pages=cells // query.page_size, branch_pages=1, d=d,
                shared_page_size=query.page_size,
                branch_page_size=kernel_bench.branch_page_size(query, t), dtype=query.dtype,
                block_sizes=kernel_bench.cascade_block_sizes(query, shape, entry))
            yield pytest.param(functools.partial(_lower_cascade, case),
                               id=f"tune-{name}-{entry}")


def _lowering_cases():
    for case in GPU_APPEND + [Case(lengths=(0,) * 8, t=512, h=32, k=8, pages=136, d=128,
                                   dtype="bfloat16")]:
        rows = case.t * case.h // case.k
        bs = case.block_sizes or aa.BlockSizes.for_append(rows=rows, head_dim=case.d,
                                                          page_size=case.page_size)
        yield pytest.param(functools.partial(_lower_paged, case, causal=True, block_sizes=bs),
                           id=f"append-{case}")
    for case in GPU_DECODE + [Case(lengths=(0,) * 8, t=1, h=32, k=8, pages=1024, d=128,
                                   dtype="bfloat16")]:
        bs = case.block_sizes or da.default_block_sizes(
            batch=len(case.lengths), rows=case.t * case.h // case.k, k_heads=case.k,
            head_dim=case.d, page_size=case.page_size, window=_window(case),
            itemsize=jnp.dtype(case.dtype).itemsize)
        yield pytest.param(functools.partial(_lower_paged, case, causal=True, block_sizes=bs),
                           id=f"decode-{case}")
    for c in GPU_CASCADE:
        yield pytest.param(functools.partial(_lower_cascade, c), id=f"cascade-{c}")


@pytest.mark.parametrize("lower", list(_lowering_cases()))
def test_triton_lowering_on_cpu(lower):
    """Every compiled configuration of the GPU tests (and the benchmark's targets) lowers to
    Triton IR: power-of-two tensors, supported primitives. Compiling the IR needs the GPU."""
    lower()


@pytest.mark.skipif(H100 is None, reason="compiling for a GPU target needs jax's CUDA plugin "
                                         "(CI's second leg installs it)")
@pytest.mark.parametrize("lower", list(_lowering_cases()) + list(_tuning_cases()))
def test_triton_kernels_compile_for_an_h100(lower):
    """... and compiles for the H100 (compile-only target): Triton -> PTX within the card's
    shared memory and registers, every tuning entry included, so none fails on device time."""
    lower(compile_for=H100)


# The query's cascade over contiguous session cells (the model's form), as the 1B first-token
# query makes it (32 query heads, 8 kv-heads, D = 64, K/V from q's buffer) over 2k cells, its
# shared tiles 128 x 64 with 8 warps and 3 stages: split four ways, or one kernel.
_PIPELINED_CODE = """
import os
import jax, jax.numpy as jnp
from statejax.perf import gpu_target
from statejax.kernels import append_attention as aa, cascade_attention as ca
S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
args = (S((1, 32, 48, 64), bf), S((2, 1, 2048, 8, 64), bf), S((2, 1, 2048, 8, 64), bf),
        S((), jnp.int32), S((), jnp.int32))
for splits in (4, 1):
    for mode in ("contiguous", "paged", "preloaded"):
        os.environ["PTX_DUMP"] = os.path.join(os.environ["PTX_DUMP_ROOT"], f"{splits}-{mode}")
        os.makedirs(os.environ["PTX_DUMP"])
        preload = mode == "preloaded"
        tiles = ca.BlockSizes(shared=aa.BlockSizes(128, 64, splits, 8, 3, preload),
                              private=aa.BlockSizes(128, 128, 1, 4, 2, preload))
        if mode == "contiguous":
            fn = jax.jit(lambda q, k, v, row, n: ca.cascade_attention_cells(
                q, k, v, row, n, None, None, None, layer=1, shared_window=1920,
                interpret=False, q_heads=32, block_sizes=tiles))
        else:  # the same cells through an arbitrary page table
            fn = jax.jit(lambda q, k, v, row, n: ca.cascade_attention(
                q[:, :, :32], k.reshape(-1, 64, 8, 64), v.reshape(-1, 64, 8, 64),
                jnp.arange(32, dtype=jnp.int32) + row, n,
                q[:, :, 32:40].reshape(1, 32, 8, 64), q[:, :, 40:].reshape(1, 32, 8, 64),
                jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32),
                shared_window=1920, block_sizes=tiles, interpret=False))
        gpu_target.compile_for(fn, gpu_target.target_device("h100"), *args)
"""


@pytest.mark.skipif(H100 is None or not triton_ptx.has_ptxas(),
                    reason="needs jax's CUDA plugin (CI's second leg installs it) and CUDA's "
                           "ptxas on the PATH")
def test_kv_loops_over_contiguous_cells_keep_a_block_in_flight(tmp_path):
    """Over contiguous cells the kernels compute each KV block's address from the loop index
    (`contiguous_pages`): compiled for the H100 with 3 stages, every KV loop of the query's
    cascade (split, and as one kernel) waits only for the oldest block it fetched, with the
    next one still in flight, and loads nothing else from global memory. Through a page
    table, the same loops wait for every copy at each step (what the H100 ran before), unless
    the table's entries are read before the loop (`preload_pages`): then they keep a block in
    flight too."""
    dumps = triton_ptx.run_capturing_ptx(_PIPELINED_CODE, tmp_path, timeout_s=600)
    for splits, kernel in ((4, "statejax_cascade_shared"), (1, "statejax_cascade")):
        for mode in ("contiguous", "paged", "preloaded"):
            ptx = triton_ptx.read_ptx(dumps / f"{splits}-{mode}")
            loops = triton_ptx.kv_loops(ptx[kernel])
            assert len(loops) >= 2, (kernel, loops)  # unmasked and masked steps (+ prefix)
            if mode == "paged":
                assert any(min(loop["waits"]) == 0 for loop in loops), (kernel, loops)
            else:
                assert all(min(loop["waits"]) >= 1 and loop["global_loads"] == 0
                           for loop in loops), (kernel, mode, loops)


# ---------------------------------------------------------------- compiled on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compiled Triton kernels)")
class TestCompiledGpu:
    @pytest.mark.parametrize("case", GPU_APPEND, ids=str)
    def test_append(self, case):
        check_paged(case, aa.append_attention, aa.append_attention_reference, interpret=False)

    @pytest.mark.parametrize("case", GPU_DECODE, ids=str)
    def test_decode(self, case):
        check_paged(case, da.decode_attention, da.decode_attention_reference, interpret=False)

    @pytest.mark.parametrize("case", GPU_CASCADE, ids=str)
    def test_cascade(self, case):
        check_cascade(case, interpret=False)

    def test_cascade_joint_branch_cells(self):
        check_cascade(GPU_CASCADE[0], interpret=False, seed=1, joint_branch=True)

    def test_first_token_branches(self):
        check_first_token_branches(dtype="bfloat16", interpret=False, t=32, h=32, k=8, d=64,
                                   window=1024)

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_contiguous_cells(self, dtype):
        check_cells(dtype=dtype, interpret=False, d=64, cells=256, window=192)
