"""The Mosaic GPU (Hopper) append and decode kernels vs their references.

On CPU: small cases run in jax's Mosaic GPU interpreter (warpgroups, TMA, barriers and their
phases simulated; `mgpu_interpreter` patches the wgmma forms it lacks), every test and benchmark
configuration is lowered for CUDA (Pallas -> Mosaic GPU MLIR: layouts, wgmma tiles, TMA slices;
PTX needs the device), the block / split plans are checked against brute force, and the
wrappers' errors. On a GPU, `TestCompiledMosaicGpu` (marker `gpu`) compiles them. The cells a
row may not see hold large finite values (the kernels require finite cells there; see their
docstrings): a kernel that lets one through fails by far.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import kernel_bench as kb_config
from statejax.errors import InputError
from statejax.kernels import append_attention as aa
from statejax.kernels import append_attention_mgpu as mg
from statejax.kernels import cascade_attention as ca
from statejax.kernels import decode_attention as da
from statejax.kernels import decode_attention_mgpu as dm
from statejax.kernels import dispatch, tuned
from statejax.kernels import mosaic_common as mc
from statejax.kernels import paged_flash as pf
from statejax.perf import gpu_target
from tests.kernels import mgpu_interpreter, mosaic_ptxas
from tests.kernels.test_kernels import (
    _H100_KIND,
    GPU,
    CascadeCase,
    Case,
    _pools,
    _queries,
    _reference,
    _window,
    check_cascade,
)

# approx_math exp2 and bf16 probabilities: as loose as the Triton kernel's bf16 tolerances.
TOLERANCE = {"bfloat16": (dict(atol=2e-2, rtol=2e-2), dict(atol=2e-3, rtol=2e-3)),
             "float16": (dict(atol=5e-3, rtol=5e-3), dict(atol=2e-3, rtol=2e-3))}
_GARBAGE = 50.0  # what invisible cells hold: a leaked score of ~50 * |q| dominates the row
_INTERPRETER_DEADLINE_S = 180  # per interpreted case; the slowest takes ~30 s on 2 cores


@dataclasses.dataclass(frozen=True)
class MosaicCase:
    case: Case
    tiles: mg.MosaicBlockSizes | dm.MosaicDecodeBlockSizes | None = None
    kind: str = "append"
    page_offset: int = 0  # the pool holds this many other pages first (stacked cells)

    def __str__(self):
        tiles = "default" if self.tiles is None else "-".join(
            f"{v}" for v in dataclasses.astuple(self.tiles))
        offset = f"_off{self.page_offset}" if self.page_offset else ""
        return f"{self.kind}_{self.case}_{tiles}{offset}"

    @property
    def build(self):
        """The kernel call without the device check (lowers on CPU)."""
        return {"append": mg._append_mgpu, "decode": dm._decode_mgpu,
                "shared": _shared_mgpu}[self.kind]

    @property
    def wrapper_and_reference(self):
        if self.kind == "append":
            return dispatch.append_attention, aa.append_attention_reference
        if self.kind == "shared":
            return None, functools.partial(pf.paged_attention_reference, causal=False)
        return dispatch.decode_attention, da.decode_attention_reference

    def visible(self, n: int) -> int:
        """Cells row n's queries may see (the rest hold garbage)."""
        return min(n if self.kind == "shared" else n + self.case.t, _window(self.case))


def _shared_mgpu(q, k_pool, v_pool, table, lengths, *, window, block_sizes, interpret=False,
                 page_offset=0):
    """The cascade's shared part on the Mosaic decode kernel (every row sees its n cells),
    its splits merged: comparable with the non-causal reference."""
    t, h = q.shape[1:3]
    out, lse = dm.decode_partials_mgpu(q, k_pool, v_pool, table, lengths, window=window,
                                       block_sizes=block_sizes, causal=False,
                                       interpret=interpret, page_offset=page_offset)
    return pf.combine_splits(*pf.unfold_partials(out, lse, t, h), q.dtype)


CASES = [
    # GQA 4, ragged incl. an empty row, D = 64, 8 pages per KV block.
    MosaicCase(Case(lengths=(0, 700, 1500), t=32, h=32, k=8, pages=100, d=64,
                    dtype="bfloat16")),
    # A full 128-token tile and a second one; page = 64 cells, 2 per block.
    MosaicCase(Case(lengths=(1000, 37), t=256, h=32, k=8, pages=32, d=128, page_size=64,
                    dtype="bfloat16")),
    # T = 200 (padded to 256), 3 K/V slots, 64-cell blocks of 16-cell pages.
    MosaicCase(Case(lengths=(513, 0), t=200, h=16, k=4, pages=60, d=128, dtype="bfloat16"),
               mg.MosaicBlockSizes(block_q=64, block_k=64, max_concurrent_steps=3)),
    # GQA 1, one 128-cell page per block, a window short of the table (later tokens clamp).
    MosaicCase(Case(lengths=(5, 450), t=130, h=4, k=4, pages=8, d=64, page_size=128,
                    dtype="bfloat16", window=500)),
    # GQA 8, float16, 8-cell pages (16 TMA copies per block), T = 1.
    MosaicCase(Case(lengths=(77, 300), t=1, h=8, k=1, pages=48, d=128, page_size=8,
                    dtype="float16")),
]
DECODE_CASES = [
    # 3 splits of 4 blocks: short rows leave later splits empty (out 0, lse MASK_VALUE).
    MosaicCase(Case(lengths=(0, 1, 47, 1000), t=1, h=32, k=8, pages=80, d=128,
                    dtype="bfloat16"), dm.MosaicDecodeBlockSizes(64, 4, 3), "decode"),
    # Speculative verification (T = 3) with GQA 8: 24 folded rows; default tiles.
    MosaicCase(Case(lengths=(5, 600), t=3, h=8, k=1, pages=48, d=64, dtype="bfloat16"),
               kind="decode"),
    # Long ragged rows, default splits.
    MosaicCase(Case(lengths=(4095, 17, 2048, 3000), t=1, h=32, k=8, pages=256, d=128,
                    dtype="bfloat16"), kind="decode"),
    # float16, 64-cell pages, T = 4 at GQA 4.
    MosaicCase(Case(lengths=(1000, 0), t=4, h=32, k=8, pages=32, d=64, page_size=64,
                    dtype="float16"), kind="decode"),
    # GQA 1, 128-cell pages, a window short of the table, 2 slots, 4 splits.
    MosaicCase(Case(lengths=(300, 900), t=2, h=4, k=4, pages=8, d=128, page_size=128,
                    dtype="bfloat16", window=1000),
               dm.MosaicDecodeBlockSizes(128, 2, 4), "decode"),
    # A 32-token question at GQA 4: 128 folded rows, two compute warpgroups; default tiles.
    MosaicCase(Case(lengths=(3000, 40), t=32, h=32, k=8, pages=200, d=64, dtype="bfloat16"),
               kind="decode"),
    # The same rows as a cascade's shared part (non-causal: every row sees its n cells),
    # 24 rows (one warpgroup) and 100 (two, the second partly padding).
    MosaicCase(Case(lengths=(3000, 0), t=32, h=32, k=8, pages=200, d=64, page_size=64,
                    dtype="bfloat16"), dm.MosaicDecodeBlockSizes(128, 3, 4), "shared"),
    MosaicCase(Case(lengths=(700,), t=3, h=8, k=1, pages=64, d=128, dtype="float16"),
               kind="shared"),
    MosaicCase(Case(lengths=(500, 64), t=25, h=16, k=4, pages=40, d=64, dtype="bfloat16"),
               dm.MosaicDecodeBlockSizes(64, 2, 3), "shared"),
]
# The benchmark's targets: ingestion (8 sessions, T = 512 over 8k cached, 32 heads, D = 128)
# and decode (8 sessions x 16k, K = 8, D = 128).
TARGET = MosaicCase(Case(lengths=(8192,) * 8, t=512, h=32, k=8, pages=136, d=128,
                         page_size=64, dtype="bfloat16"))
DECODE_TARGET = MosaicCase(Case(lengths=(16384,) * 8, t=1, h=32, k=8, pages=257, d=128,
                                page_size=64, dtype="bfloat16"), kind="decode")


def _shapes(case: Case):
    b = len(case.lengths)
    dtype = jnp.dtype(case.dtype)
    return (jax.ShapeDtypeStruct((b, case.t, case.h, case.d), dtype),
            jax.ShapeDtypeStruct((b * case.pages + 3, case.page_size, case.k, case.d), dtype),
            jax.ShapeDtypeStruct((b, case.pages), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32))


# The benchmark's Mosaic tuning grids, on the shapes they are timed on.
_TUNE = kb_config.get_config("gpu-tune")
TUNED = [dataclasses.replace(TARGET, tiles=mg.MosaicBlockSizes(*entry))
         for entry in _TUNE.tune_append_mosaic]
TUNED += [dataclasses.replace(DECODE_TARGET, tiles=dm.MosaicDecodeBlockSizes(*entry))
          for entry in _TUNE.tune_decode_mosaic]
# The end-to-end query's shared part (32 tokens, G = 4: 128 rows, D = 64, 32k cells) with the
# `:gpu-query` Mosaic tiles and the defaults.
_QUERY = kb_config.get_config("gpu-query")
QUERY_SHARED = MosaicCase(Case(lengths=(32768,), t=32, h=32, k=8, pages=512, d=64,
                               page_size=_QUERY.page_size, dtype="bfloat16"), kind="shared")
TUNED += [QUERY_SHARED] + [dataclasses.replace(QUERY_SHARED,
                                               tiles=dm.MosaicDecodeBlockSizes(*entry))
                           for entry in sorted({e[:3] for e in _QUERY.tune_cascade_mosaic})]


@pytest.mark.parametrize("mc", CASES + DECODE_CASES + [TARGET, DECODE_TARGET] + TUNED,
                         ids=str)
def test_mosaic_lowering_on_cpu(mc):
    """Each configuration traces and lowers to one Mosaic GPU custom call with the right
    output shapes."""
    q, pool, table, lengths = _shapes(mc.case)
    call = jax.jit(lambda *a: mc.build(*a, window=mc.case.window, block_sizes=mc.tiles))
    traced = call.trace(q, pool, pool, table, lengths)
    out, lse = traced.out_info
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1


def _valid(dtype=jnp.bfloat16, d=64, page_size=16):
    q = jnp.ones((2, 4, 8, d), dtype)
    pool = jnp.ones((6, page_size, 2, d), dtype)
    return q, pool, pool, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize("args, tiles, match", [
    (_valid(jnp.float32), None, "bfloat16 or float16"),
    (_valid(d=32), None, "multiple of 64"),
    (_valid(page_size=4), None, "multiple of 8"),
    (_valid(page_size=512), mg.MosaicBlockSizes(block_k=512, max_concurrent_steps=2),
     "<= 256"),
    (_valid(), mg.MosaicBlockSizes(block_q=32), "block_q=32"),
    (_valid(page_size=128), mg.MosaicBlockSizes(block_k=64), "block_k=64"),
    (_valid(), mg.MosaicBlockSizes(max_concurrent_steps=1), "max_concurrent_steps"),
    (_valid(d=256), mg.MosaicBlockSizes(block_k=128, max_concurrent_steps=4),
     "shared memory"),
])
def test_mosaic_validation(args, tiles, match):
    with pytest.raises(InputError, match=match):
        mg._append_mgpu(*args, window=None, block_sizes=tiles)


@pytest.mark.parametrize("args, tiles, match", [
    (_valid(), dm.MosaicDecodeBlockSizes(block_k=64, num_splits=0), "num_splits=0"),
    (_valid(d=128), dm.MosaicDecodeBlockSizes(block_k=128, max_concurrent_steps=4),
     "shared memory"),
    (_valid(jnp.float32), None, "bfloat16 or float16"),
])
def test_mosaic_decode_validation(args, tiles, match):
    with pytest.raises(InputError, match=match):
        dm._decode_mgpu(*args, window=None, block_sizes=tiles)
    # 33 tokens x G = 4 folded rows do not fit two 64-row warpgroup tiles.
    q33 = jnp.ones((2, 33, 8, 64), jnp.bfloat16)
    with pytest.raises(InputError, match="at most 128"):
        dm._decode_mgpu(q33, *_valid()[1:], window=None, block_sizes=None)


@pytest.mark.parametrize("fn, tiles, kind", [
    (dispatch.append_attention, aa.BlockSizes(block_q=16, block_k=16), "append"),
    (dispatch.decode_attention, aa.BlockSizes(block_q=16, block_k=16), "decode"),
])
def test_mosaic_backend_is_explicit_and_compiled_only(fn, tiles, kind):
    args = _valid()
    with pytest.raises(InputError, match="compiled only"):
        fn(*args, interpret=True, backend="mosaic_gpu")
    with pytest.raises(InputError, match="MosaicBlockSizes|MosaicDecodeBlockSizes"):
        fn(*args, interpret=False, backend="mosaic_gpu", block_sizes=tiles)
    with pytest.raises(InputError, match=f"allowed for {kind}"):
        fn(*args, interpret=False, backend="cudnn")
    if not GPU:  # nothing falls back to another backend
        with pytest.raises(InputError, match="no interpret mode"):
            fn(*args, interpret=False, backend="mosaic_gpu")


def test_default_decode_tiles_fit_and_split():
    for d in (64, 128):  # (at D = 256 none fits: refused, see the shared-memory test)
        for page_size in (8, 16, 64):
            bs = dm.MosaicDecodeBlockSizes.for_decode(batch=8, k_heads=8, head_dim=d,
                                                      page_size=page_size, window=16384)
            assert bs.block_k % page_size == 0 and bs.block_k % 64 == 0
            assert bs.smem_bytes(d, 2) <= mc.SMEM_LIMIT and bs.max_concurrent_steps >= 2
            assert bs.num_splits == 8  # 8 x 8 x 8 = 512 programs
    one = dm.MosaicDecodeBlockSizes.for_decode(batch=1, k_heads=8, head_dim=128, page_size=16,
                                               window=32768)
    assert one.num_splits == 64  # one long session still fills the GPU
    short = dm.MosaicDecodeBlockSizes.for_decode(batch=1, k_heads=8, head_dim=128,
                                                 page_size=16, window=256)
    assert short.num_splits == 1  # every split keeps >= 4 blocks


def _lowers(build, q, pool, block_sizes):
    """Lowers a Mosaic kernel call for CUDA on this CPU: None, or the lowering's error."""
    b, p = q.shape[0], pool.shape[0] // q.shape[0]
    table, lengths = jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b,),
                                                                                   jnp.int32)
    call = jax.jit(lambda *a: build(*a, window=None, block_sizes=block_sizes))
    try:
        call.trace(q, pool, pool, table, lengths).lower(lowering_platforms=("cuda",))
    except ValueError as e:
        return str(e)
    return None


def test_the_shared_memory_count_is_the_lowerings_at_the_limit(monkeypatch):
    """The tile rules count shared memory as the lowering allocates it (1 KiB-aligned buffers,
    reduction scratch, barriers): at D = 128 with 128 folded rows four decode slots need 144
    bytes more than Hopper has and fail to lower, three fit and lower; the default picks
    three. (Counting the buffers alone, four "fit" by 2.5 KB and failed on a GPU.)"""
    shape = jax.ShapeDtypeStruct
    q = shape((1, 32, 8, 128), jnp.bfloat16)  # T x G = 128 rows: two warpgroups
    pool = shape((64, 64, 2, 128), jnp.bfloat16)
    four, three = (dm.MosaicDecodeBlockSizes(block_k=64, max_concurrent_steps=s, num_splits=2)
                   for s in (4, 3))
    assert four.smem_bytes(128, 2, 128) == mc.SMEM_LIMIT + 144
    with pytest.raises(InputError, match="shared memory"):
        dm._decode_mgpu(q, pool, pool, shape((1, 64), jnp.int32), shape((1,), jnp.int32),
                        window=None, block_sizes=four)
    with monkeypatch.context() as m:  # past our check, the lowering judges
        m.setattr(mc, "SMEM_LIMIT", mc.SMEM_LIMIT + 144)
        assert "exceeds available shared memory" in _lowers(dm._decode_mgpu, q, pool, four)
    assert three.smem_bytes(128, 2, 128) <= mc.SMEM_LIMIT
    assert _lowers(dm._decode_mgpu, q, pool, three) is None
    default = dm.MosaicDecodeBlockSizes.for_decode(batch=1, k_heads=2, head_dim=128,
                                                   page_size=64, window=4096, rows=128)
    assert default.max_concurrent_steps == 3
    assert _lowers(dm._decode_mgpu, q, pool, None) is None
    # Append at the same limit: six 64-cell slots at D = 128 need 216 bytes more.
    six = mg.MosaicBlockSizes(block_q=64, block_k=64, max_concurrent_steps=6)
    assert six.smem_bytes(128, 2) == mc.SMEM_LIMIT + 216
    # D = 256 decode: no number of slots fits; refused with the count.
    with pytest.raises(InputError, match="shared memory at D=256"):
        dm._decode_mgpu(*_valid(d=256), window=None, block_sizes=None)


def test_head_dims_mosaic_takes_that_triton_does_not():
    """D = 192 (a multiple of 64) is Mosaic's to take or refuse, not Triton's power-of-two
    rule's: both kernels lower it."""
    for build in (mg._append_mgpu, dm._decode_mgpu):
        q, pool, _, table, lengths = _valid(d=192)
        assert _lowers(build, q, pool, None) is None
        out, lse = jax.eval_shape(lambda *a, build=build: build(*a, window=None,
                                                                block_sizes=None),
                                  q, pool, pool, table, lengths)
        assert (out.shape, out.dtype, lse.shape) == (q.shape, q.dtype, q.shape[:3])


def test_contiguous_cells_take_mosaic_tiles_before_their_page_size(monkeypatch):
    """Over contiguous cells the Mosaic tiles are chosen first: at D = 256 append takes its
    64-cell steps (the page size follows; 128-cell pages forced 128-cell steps, which no
    shared memory holds, and the call was refused), and decode at D = 128 its 64-cell steps."""
    monkeypatch.setattr(mc, "check_device", lambda: None)  # lowered here, not run
    seen = []
    for module, build in ((mg, "_append_mgpu"), (dm, "_decode_mgpu")):
        real = getattr(module, build)

        def spy(*args, real=real, **kwargs):
            seen.append((args[1].shape[1], kwargs["block_sizes"]))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, build, spy)
    shape = jax.ShapeDtypeStruct
    lengths = shape((2,), jnp.int32)
    for fn, t, d in ((dispatch.append_attention_cells, 256, 256),
                     (dispatch.decode_attention_cells, 1, 128)):
        cells = shape((4, 2, 1024, 2, d), jnp.bfloat16)
        call = jax.jit(lambda q, k, v, n, fn=fn: fn(q, k, v, n, layer=1, window=1024,
                                                    interpret=False, backend="mosaic_gpu"))
        call.trace(shape((2, t, 8, d), jnp.bfloat16), cells, cells, lengths).lower(
            lowering_platforms=("cuda",))
    (append_page, append_tiles), (decode_page, decode_tiles) = seen
    assert (append_page, append_tiles.block_k) == (64, 64)
    assert (decode_page, decode_tiles.block_k, decode_tiles.max_concurrent_steps) == (64, 64, 4)


def test_default_tiles_fit_hopper():
    for d in (64, 128, 256):
        for page_size in (8, 16, 64, 128):
            bs = mg.MosaicBlockSizes.for_append(head_dim=d, page_size=page_size)
            assert bs.block_k % page_size == 0 and bs.block_k % 64 == 0
            # D = 256 with 128-cell pages needs 128-cell blocks: too big, and said so.
            assert (bs.smem_bytes(d, 2) <= mc.SMEM_LIMIT) == (d < 256 or page_size <= 64)
    with pytest.raises(InputError, match="shared memory"):
        mg._append_mgpu(*_valid(d=256, page_size=128), window=None, block_sizes=None)


def test_append_block_plan_covers_what_each_token_sees():
    """The KV steps each warpgroup (and the memory warpgroup) visits, against brute-force
    visibility: nothing visible is skipped, unmasked blocks are visible to every token, and
    the memory warpgroup streams every block either compute warpgroup needs."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = int(rng.integers(1, 300))
        block_q, block_k = 64, int(rng.choice([64, 128]))
        n = int(rng.integers(0, 2000))
        window = int(rng.integers(n + 1, n + t + 200)) if rng.random() < 0.8 else n + t
        t_pad = -(-t // (2 * block_q)) * 2 * block_q
        sees = np.minimum(n + np.minimum(np.arange(t_pad), t - 1) + 1, window)  # per token

        def plan(first, count, n=n, t=t, window=window, block_k=block_k):
            return [int(x) for x in mg.block_plan(n, first, count, num_tokens=t,
                                                  window=window, block_k=block_k)]

        for tile in range(0, t_pad, 2 * block_q):
            tile_visit, _ = plan(tile, 2 * block_q)
            for wg in range(2):
                first = tile + wg * block_q
                visit, full = plan(first, block_q)
                tokens = sees[first:first + block_q]
                assert 1 <= visit <= tile_visit and 0 <= full <= visit
                assert (visit - 1) * block_k < tokens.max() <= visit * block_k
                assert full * block_k <= tokens.min() < (full + 1) * block_k


@pytest.mark.parametrize("causal", [True, False])
def test_decode_splits_partition_the_visible_blocks(causal):
    rng = np.random.default_rng(1)
    for _ in range(300):
        t, group = int(rng.integers(1, 33)), int(rng.choice([1, 4, 8]))
        if t * group > dm.MAX_ROWS:
            continue
        block_k, splits = int(rng.choice([64, 128])), int(rng.integers(1, 9))
        n = int(rng.integers(0, 3000))
        window = n + t + int(rng.integers(0, 300))
        blocks_per_split = math.ceil(math.ceil(window / block_k) / splits)
        rows = np.arange(dm.MAX_ROWS)
        limits = [int(dm.row_limit(n, r, group=group, num_tokens=t, window=window,
                                   causal=causal)) for r in rows[:t * group]]
        # Causal: the last token sees the most; the shared part: every row sees n.
        assert limits[-1] == max(limits) == (min(n + t, window) if causal else n)
        assert causal or min(limits) == n
        visited = []
        for s in range(splits):
            first, steps = (int(x) for x in dm.split_plan(
                n, s, blocks_per_split=blocks_per_split, group=group, num_tokens=t,
                window=window, block_k=block_k, causal=causal))
            assert steps >= 0 and (steps == 0 or first == s * blocks_per_split)
            visited += range(first, first + steps)
        assert visited == list(range(math.ceil(max(limits) / block_k)))  # each block once


def check_mosaic(mc: MosaicCase, seed: int = 0, *, interpret: bool = False):
    """Kernel (compiled through the public wrapper, or in the patched GPU interpreter) vs the
    reference, with finite garbage in every cell a row may not see."""
    case = mc.case
    rng = np.random.default_rng(seed)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    visible = [mc.visible(n) for n in case.lengths]
    clean, poisoned, table = _pools(rng, case, visible)
    garbage = [jnp.where(jnp.isnan(p), _GARBAGE, p).astype(p.dtype) for p in poisoned]
    # Other pages first (as another layer's in stacked cells): the table plus the page
    # offset addresses this pool's pages; reading one of the others would show.
    garbage = [jnp.concatenate([jnp.full((mc.page_offset, *p.shape[1:]), _GARBAGE, p.dtype), p])
               for p in garbage]
    offset = dict(page_offset=mc.page_offset)
    q = _queries(rng, (len(case.lengths), case.t, case.h, case.d), case.dtype)
    fn, reference = mc.wrapper_and_reference
    if interpret:
        with mgpu_interpreter.patched():
            got = jax.block_until_ready(mc.build(q, *garbage, table, lengths,
                                                 window=case.window, block_sizes=mc.tiles,
                                                 interpret=mgpu_interpreter.params(), **offset))
            assert not mgpu_interpreter.races_found()
    elif fn is None:  # no public wrapper of its own (the shared part): the kernel call
        got = jax.jit(functools.partial(mc.build, window=case.window, block_sizes=mc.tiles,
                                        **offset))(q, *garbage, table, lengths)
    else:
        got = fn(q, *garbage, table, lengths, window=case.window, block_sizes=mc.tiles,
                 interpret=False, backend="mosaic_gpu", **offset)
    want = _reference(reference, q, *clean, table, lengths, window=case.window)
    out_tol, lse_tol = TOLERANCE[case.dtype]
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0], np.float32),
                               np.asarray(want[0], np.float32), **out_tol)
    np.testing.assert_allclose(got[1], want[1], **lse_tol)


# Small cases for the GPU interpreter (seconds each): warpgroups, TMA, barriers simulated.
INTERPRET_CASES = [
    # Two token tiles (T = 130 padded to 256), GQA 2, 4 pages per 64-cell block, ragged;
    # the pool behind 5 other pages (a page offset, as a layer of stacked cells).
    MosaicCase(Case(lengths=(5, 200), t=130, h=4, k=2, pages=24, d=64, dtype="bfloat16"),
               mg.MosaicBlockSizes(64, 64, 2), page_offset=5),
    # GQA 1, float16, default tiles (one 128-cell block = 2 pages), a window that clamps.
    MosaicCase(Case(lengths=(150,), t=70, h=2, k=2, pages=4, d=64, page_size=64,
                    dtype="float16", window=200)),
    # GQA 4, D = 128, 3 slots, 8-cell pages (8 TMA copies per block).
    MosaicCase(Case(lengths=(300,), t=64, h=4, k=1, pages=48, d=128, page_size=8,
                    dtype="bfloat16"), mg.MosaicBlockSizes(64, 64, 3)),
    # Decode: ragged, 2 splits of 64-cell blocks, 2 slots, a page offset of 7.
    MosaicCase(Case(lengths=(5, 700), t=1, h=8, k=2, pages=48, d=64, dtype="bfloat16"),
               dm.MosaicDecodeBlockSizes(64, 2, 2), "decode", page_offset=7),
    # Decode: T = 3 at GQA 8, an empty row (its later splits read nothing), 3 slots.
    MosaicCase(Case(lengths=(0, 90), t=3, h=8, k=1, pages=16, d=64, page_size=8,
                    dtype="bfloat16"), dm.MosaicDecodeBlockSizes(64, 3, 3), "decode"),
    # Decode: 128 folded rows (T = 16 at GQA 8): two compute warpgroups share the slots.
    MosaicCase(Case(lengths=(5, 300), t=16, h=8, k=1, pages=24, d=64, dtype="bfloat16"),
               dm.MosaicDecodeBlockSizes(64, 2, 2), "decode"),
    # Shared part (non-causal) of 100 rows, an empty row, 3 slots, a page offset of 3.
    MosaicCase(Case(lengths=(0, 200), t=25, h=8, k=2, pages=16, d=64, dtype="bfloat16"),
               dm.MosaicDecodeBlockSizes(64, 3, 2), "shared", page_offset=3),
    # Decode: GQA 1, D = 128, 128-cell pages, a window short of the table, one split.
    MosaicCase(Case(lengths=(300,), t=2, h=2, k=2, pages=4, d=128, page_size=128,
                    dtype="float16", window=350), dm.MosaicDecodeBlockSizes(128, 2, 1),
               "decode"),
]


def run_in_interpreter(index: int):
    """Entry point of the subprocess below."""
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    check_mosaic(INTERPRET_CASES[index], interpret=True)


@pytest.mark.skipif(not mgpu_interpreter.supported(),
                    reason="the GPU-interpreter patch is written for jax 0.10's internals")
@pytest.mark.parametrize("index", range(len(INTERPRET_CASES)),
                         ids=[str(c) for c in INTERPRET_CASES])
def test_mosaic_kernels_in_the_gpu_interpreter(index):
    """Each case in its own process with a deadline (`mgpu_interpreter.run_with_deadline`)."""
    ok, output = mgpu_interpreter.run_with_deadline(
        f"from tests.kernels import test_kernels_mgpu as t; t.run_in_interpreter({index})",
        _INTERPRETER_DEADLINE_S)
    assert ok, output


# Every configuration the tests and the benchmark compile, to machine code (sm_90a).
PTXAS_CASES = CASES + DECODE_CASES + [TARGET, DECODE_TARGET] + TUNED
_PTXAS_DEADLINE_S = 300


def lower_for_ptxas(case_id: str):
    """Entry point of the subprocess below: lowers one configuration for CUDA."""
    (mc,) = [c for c in PTXAS_CASES if str(c) == case_id]
    q, pool, table, lengths = _shapes(mc.case)
    call = jax.jit(lambda *a: mc.build(*a, window=mc.case.window, block_sizes=mc.tiles))
    call.trace(q, pool, pool, table, lengths).lower(lowering_platforms=("cuda",))


@pytest.mark.skipif(mosaic_ptxas.unavailable() is not None,
                    reason=str(mosaic_ptxas.unavailable()))
@pytest.mark.parametrize("mc", PTXAS_CASES, ids=str)
def test_mosaic_kernels_compile_to_sm90a_without_spills(mc, tmp_path):
    """Mosaic GPU compiles the kernel through ptxas for an H100 (no GPU here; see
    `mosaic_ptxas`): no register spills, and the registers fit one block of its warpgroups."""
    code = ("from tests.kernels import mosaic_ptxas, test_kernels_mgpu as t; "
            f"t.lower_for_ptxas({str(mc)!r}); mosaic_ptxas.compile_lowered_kernel()")
    report = mosaic_ptxas.ptxas_report(code, tmp_path, timeout_s=_PTXAS_DEADLINE_S)
    assert report["spill_stores"] == report["spill_loads"] == 0, report["log"]
    rows = mc.case.t * mc.case.h // mc.case.k
    decode_wgs = 1 if rows <= 64 else 2
    threads = 128 * ((mg._COMPUTE_WGS if mc.kind == "append" else decode_wgs) + 1)  # + memory
    assert report["registers"] * threads <= 65536, report["log"]


# The end-to-end query's attention (one branch: T = 32, G = 4, D = 64, 128 shared rows) and
# two branches of 12 tokens at GQA 4 (96 rows) with private history, default tiles.
CASCADE_MOSAIC = [
    CascadeCase(shared_lengths=(3000, 0), branch_lengths=(0,), t=32, h=32, k=8,
                shared_pages=64, branch_pages=2, d=64, shared_page_size=64,
                branch_page_size=32, dtype="bfloat16"),
    CascadeCase(shared_lengths=(517,), branch_lengths=(9, 0), t=12, h=8, k=2,
                shared_pages=40, branch_pages=4, d=128, branch_page_size=16,
                dtype="float16"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a Hopper GPU (compiled Mosaic GPU kernel)")
class TestCompiledMosaicGpu:
    @pytest.mark.parametrize("mc", CASES, ids=str)
    def test_append(self, mc):
        check_mosaic(mc)

    @pytest.mark.parametrize("mc", DECODE_CASES, ids=str)
    def test_decode(self, mc):
        check_mosaic(mc)

    @pytest.mark.parametrize("case", CASCADE_MOSAIC, ids=str)
    def test_cascade_with_the_shared_part_on_mosaic(self, case):
        check_cascade(case, interpret=False, backend="mosaic_gpu", tolerance=TOLERANCE,
                      garbage=_GARBAGE)


def _cascade_args(case: CascadeCase):
    r = len(case.branch_lengths)
    dtype = jnp.dtype(case.dtype)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    pool = lambda pages, size: jax.ShapeDtypeStruct((pages, size, case.k, case.d), dtype)  # noqa
    s_pool = pool(case.shared_pages + 3, case.shared_page_size)
    b_pool = pool(r * case.branch_pages + 3, case.branch_page_size)
    return (jax.ShapeDtypeStruct((r, case.t, case.h, case.d), dtype), s_pool, s_pool,
            i32(case.shared_pages), i32(), b_pool, b_pool, i32(r, case.branch_pages), i32(r))


def test_cascade_on_mosaic_lowers_to_both_backends(monkeypatch):
    """The shared part lowers to a Mosaic GPU call, the private part (with the merge) to a
    Triton call: the compiled-only check is all that stands between this CPU and a device."""
    monkeypatch.setattr(mc, "check_device", lambda: None)
    call = jax.jit(functools.partial(ca.cascade_attention, interpret=False,
                                     backend="mosaic_gpu"))
    with gpu_target.compiling_for(_H100_KIND):
        text = call.trace(*_cascade_args(CASCADE_MOSAIC[0])).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1 and text.count("xla.gpu.triton") == 1


def test_cascade_leaves_the_backend_to_the_measured_table(monkeypatch, tmp_path):
    """backend=None (the model's query path): the shared part lowers to Mosaic GPU where the
    GPU model's table holds a faster Mosaic entry for the shape, else to Triton."""
    monkeypatch.setattr(mc, "check_device", lambda: None)
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    case = CASCADE_MOSAIC[0]
    shape = dict(branches=1, tokens=case.t, group=case.h // case.k, k_heads=case.k,
                 head_dim=case.d, itemsize=2)
    private = dict(block_q=128, block_k=32, num_splits=1, num_warps=4, num_stages=2)
    triton = dict(block_q=128, block_k=64, num_splits=8, num_warps=8, num_stages=2)
    mosaic = dict(block_k=128, max_concurrent_steps=4, num_splits=8)
    call = functools.partial(ca.cascade_attention, interpret=False, backend=None)
    for mosaic_ms, want_mosaic in ((0.1, True), (0.9, False)):
        for backend, shared, ms in (("triton", triton, 0.5), ("mosaic_gpu", mosaic, mosaic_ms)):
            tuned.record(dict(kernel="cascade", shape=shape, window=64 * 64, backend=backend,
                              ms=ms, block_sizes=dict(shared=shared, private=private)),
                         device_kind=_H100_KIND.device_kind)
        jax.clear_caches()  # the table is read when a call is traced
        with gpu_target.compiling_for(_H100_KIND):
            text = jax.jit(call).trace(*_cascade_args(case)).lower(
                lowering_platforms=("cuda",)).as_text()
        assert (text.count("mosaic_gpu") >= 1) == want_mosaic
        assert text.count("xla.gpu.triton") == (1 if want_mosaic else 2)


def test_cascade_on_mosaic_is_explicit_and_bounded(monkeypatch):
    args = _cascade_args(CASCADE_MOSAIC[0])

    def trace(args=args, **kw):
        ca.cascade_attention.trace(*args, **kw)

    if not GPU:  # nothing falls back to Triton
        with pytest.raises(InputError, match="no interpret mode"):
            trace(interpret=False, backend="mosaic_gpu")
    monkeypatch.setattr(mc, "check_device", lambda: None)
    with pytest.raises(InputError, match="compiled only"):
        trace(interpret=True, backend="mosaic_gpu")
    with gpu_target.compiling_for(_H100_KIND):
        with pytest.raises(InputError, match="takes shared tiles of type MosaicDecodeBlock"):
            trace(interpret=False, backend="mosaic_gpu",
                  block_sizes=ca.BlockSizes(aa.BlockSizes(128, 128), aa.BlockSizes(128, 128)))
        three = _cascade_args(dataclasses.replace(CASCADE_MOSAIC[0], branch_lengths=(0,) * 3))
        with pytest.raises(InputError, match="384 shared query rows.*at most 128"):
            trace(three, interpret=False, backend="mosaic_gpu")


@pytest.mark.parametrize("fn, kind", [(aa.append_attention, "append"),
                                      (da.decode_attention, "decode")])
def test_portable_kernels_name_the_hopper_route(fn, kind):
    """The portable wrappers run Triton only; asked for Mosaic GPU they say where it is."""
    with pytest.raises(InputError, match=f"allowed for {kind} here.*dispatch"):
        fn(*_valid(), interpret=True, backend="mosaic_gpu")
