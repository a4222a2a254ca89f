"""The Mosaic GPU (Hopper) append kernel: lowering and validation on CPU, numerics on a GPU.

Jax 0.10's Mosaic GPU interpreter cannot run this kernel (dynamic slices, transposed wgmma
operands), so on CPU every configuration is lowered for CUDA (Pallas -> Mosaic GPU MLIR: the
layouts, wgmma tiles, TMA slices and barriers are checked; PTX needs the device) and the
wrapper's errors are checked; `TestCompiledMosaicGpu` (marker `gpu`) compares it with the
reference. There the cells a row may not see hold large finite values (the kernel requires
finite cells there; see its docstring): a kernel that lets one through fails by far.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import GPU, Case, _pools, _queries, _reference, _window

from configs import kernel_bench as kb_config
from statejax.errors import InputError
from statejax.kernels import append_attention as aa
from statejax.kernels import append_attention_mgpu as mg

# approx_math exp2 and bf16 probabilities: as loose as the Triton kernel's bf16 tolerances.
TOLERANCE = {"bfloat16": (dict(atol=2e-2, rtol=2e-2), dict(atol=2e-3, rtol=2e-3)),
             "float16": (dict(atol=5e-3, rtol=5e-3), dict(atol=2e-3, rtol=2e-3))}
_GARBAGE = 50.0  # what invisible cells hold: a leaked score of ~50 * |q| dominates the row


@dataclasses.dataclass(frozen=True)
class MosaicCase:
    case: Case
    tiles: mg.MosaicBlockSizes | None = None

    def __str__(self):
        tiles = "default" if self.tiles is None else (
            f"q{self.tiles.block_q}k{self.tiles.block_k}s{self.tiles.max_concurrent_steps}")
        return f"{self.case}_{tiles}"


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
# The benchmark's ingestion target: 8 sessions, T = 512 over 8k cached, 32 heads, D = 128.
TARGET = MosaicCase(Case(lengths=(8192,) * 8, t=512, h=32, k=8, pages=136, d=128,
                         page_size=64, dtype="bfloat16"))


def _shapes(case: Case):
    b = len(case.lengths)
    dtype = jnp.dtype(case.dtype)
    return (jax.ShapeDtypeStruct((b, case.t, case.h, case.d), dtype),
            jax.ShapeDtypeStruct((b * case.pages + 3, case.page_size, case.k, case.d), dtype),
            jax.ShapeDtypeStruct((b, case.pages), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32))


# The benchmark's Mosaic tuning grid, on the shape it is timed on.
TUNED = [dataclasses.replace(TARGET, tiles=mg.MosaicBlockSizes(*entry))
         for entry in kb_config.get_config("gpu-tune").tune_append_mosaic]


@pytest.mark.parametrize("mc", CASES + [TARGET] + TUNED, ids=str)
def test_mosaic_lowering_on_cpu(mc):
    """Each configuration traces and lowers to one Mosaic GPU custom call with the right
    output shapes."""
    q, pool, table, lengths = _shapes(mc.case)
    call = jax.jit(lambda *a: mg._append_mgpu(*a, window=mc.case.window,
                                              block_sizes=mc.tiles))
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
    (_valid(), mg.MosaicBlockSizes(block_q=32), "block_q=32"),
    (_valid(page_size=128), mg.MosaicBlockSizes(block_k=64), "block_k=64"),
    (_valid(), mg.MosaicBlockSizes(max_concurrent_steps=1), "max_concurrent_steps"),
    (_valid(d=256), mg.MosaicBlockSizes(block_k=128, max_concurrent_steps=4),
     "shared memory"),
])
def test_mosaic_validation(args, tiles, match):
    with pytest.raises(InputError, match=match):
        mg._append_mgpu(*args, window=None, block_sizes=tiles)


def test_mosaic_backend_is_explicit_and_compiled_only():
    args = _valid()
    with pytest.raises(InputError, match="compiled only"):
        aa.append_attention(*args, interpret=True, backend="mosaic_gpu")
    with pytest.raises(InputError, match="MosaicBlockSizes"):
        aa.append_attention(*args, interpret=False, backend="mosaic_gpu",
                            block_sizes=aa.BlockSizes(block_q=16, block_k=16))
    with pytest.raises(InputError, match="allowed for append"):
        aa.append_attention(*args, interpret=False, backend="cudnn")
    if not GPU:  # nothing falls back to another backend
        with pytest.raises(InputError, match="no interpret mode"):
            aa.append_attention(*args, interpret=False, backend="mosaic_gpu")


def test_default_tiles_fit_hopper():
    for d in (64, 128, 256):
        for page_size in (8, 16, 64, 128):
            bs = mg.MosaicBlockSizes.for_append(head_dim=d, page_size=page_size)
            assert bs.block_k % page_size == 0 and bs.block_k % 64 == 0
            # D = 256 with 128-cell pages needs 128-cell blocks: too big, and said so.
            assert (bs.smem_bytes(d, 2) <= mg._SMEM_LIMIT) == (d < 256 or page_size <= 64)
    with pytest.raises(InputError, match="shared memory"):
        mg._append_mgpu(*_valid(d=256, page_size=128), window=None, block_sizes=None)


def check_mosaic(mc: MosaicCase, seed: int = 0):
    case = mc.case
    rng = np.random.default_rng(seed)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    visible = [min(n + case.t, _window(case)) for n in case.lengths]
    clean, poisoned, table = _pools(rng, case, visible)
    garbage = [jnp.where(jnp.isnan(p), _GARBAGE, p).astype(p.dtype) for p in poisoned]
    q = _queries(rng, (len(case.lengths), case.t, case.h, case.d), case.dtype)
    got = aa.append_attention(q, *garbage, table, lengths, window=case.window,
                              block_sizes=mc.tiles, interpret=False, backend="mosaic_gpu")
    want = _reference(aa.append_attention_reference, q, *clean, table, lengths,
                      window=case.window)
    out_tol, lse_tol = TOLERANCE[case.dtype]
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0], np.float32),
                               np.asarray(want[0], np.float32), **out_tol)
    np.testing.assert_allclose(got[1], want[1], **lse_tol)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a Hopper GPU (compiled Mosaic GPU kernel)")
class TestCompiledMosaicGpu:
    @pytest.mark.parametrize("mc", CASES, ids=str)
    def test_append(self, mc):
        check_mosaic(mc)
