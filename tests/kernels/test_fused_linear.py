"""Fused linear kernels (kernels/fused_linear.py) vs their reference, and in the model.

Interpret mode on CPU; fresh random inputs; the output starts NaN-poisoned so an element no
program writes fails the comparison.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from statejax import steps
from statejax.budget import Budget
from statejax.errors import InputError
from statejax.kernels import fused_linear as fl
from statejax.model import rope
from statejax.model.config import preset
from statejax.model.layouts import lay_out
from statejax.model.llama import Transformer, init_params
from statejax.serving.session import Session
from statejax.state import init_state
from statejax.tokenizer import ByteTokenizer

GPU = jax.default_backend() == "gpu"
TOLERANCE = {"float32": dict(atol=2e-5, rtol=2e-5), "bfloat16": dict(atol=3e-2, rtol=3e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    widths: tuple[int, ...]
    norm: bool = False
    bias: bool = False
    residual: bool = False
    activation: str | None = None
    blocks: tuple[int, int, int] | None = None  # (block_m, block_n, block_k)

    def __str__(self):
        return (f"m{self.m}_k{self.k}_n{'-'.join(map(str, self.widths))}_norm{self.norm}"
                f"_bias{self.bias}_res{self.residual}_{self.activation}_b{self.blocks}")


CASES = [
    Case(1, 64, (32,)),  # one row: padded to the 16-row tile
    Case(20, 128, (64, 32, 32), norm=True),  # q/k/v side by side, rows not a tile multiple
    Case(20, 128, (64, 32, 32), norm=True, bias=True, blocks=(16, 16, 32)),  # 2 row tiles
    Case(33, 256, (48, 48), norm=True, activation="silu_mul", blocks=(32, 16, 64)),
    Case(32, 512, (64,), residual=True, blocks=(32, 32, 128)),  # down + residual, 4 K steps
    Case(70, 64, (64,), residual=True, norm=True),  # all of prologue and epilogue
]


def _inputs(case: Case, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape), dtype)
    x = arr(case.m, case.k, s=2.0)
    weights = tuple(arr(n, case.k, s=case.k ** -0.5) for n in case.widths)
    n_out = case.widths[0] if case.activation else sum(case.widths)
    kwargs = dict(activation=case.activation)
    if case.norm:
        kwargs["norm_scale_K"] = arr(case.k, s=0.5) + 1
    if case.bias:
        kwargs["bias"] = tuple(arr(n) for n in case.widths)
    if case.residual:
        kwargs["residual_MxN"] = arr(case.m, n_out)
    return x, weights, kwargs, n_out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_linear_matches_reference(case, dtype):
    x, weights, kwargs, n_out = _inputs(case, jnp.dtype(dtype))
    blocks = None if case.blocks is None else fl.LinearBlocks(*case.blocks)
    got = fl.fused_linear(x, weights, blocks=blocks, interpret=True, poison_outputs=True,
                          **kwargs)
    want = fl.fused_linear_reference(x, weights, **kwargs)
    assert got.shape == want.shape == (case.m, n_out) and got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **TOLERANCE[dtype])
    assert np.abs(np.asarray(want, np.float32)).max() > 0.1  # not a vacuous comparison


def test_reference_is_the_models_rounding_order():
    """The reference normalises in float32, rounds, scales in the dtype (`llama.RMSNorm`),
    rounds each product, and adds the residual last: checked in numpy at float32."""
    case = Case(5, 64, (16, 16), norm=True, residual=True, activation="silu_mul")
    x, (g, u), kwargs, _ = _inputs(case, jnp.float32, seed=3)
    xs = np.asarray(x, np.float64)
    normed = xs / np.sqrt((xs * xs).mean(-1, keepdims=True) + 1e-5) * np.asarray(
        kwargs["norm_scale_K"])
    gate, up = normed @ np.asarray(g).T, normed @ np.asarray(u).T
    want = np.asarray(kwargs["residual_MxN"]) + gate / (1 + np.exp(-gate)) * up
    got = fl.fused_linear_reference(x, (g, u), **kwargs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_default_blocks_fill_an_h100_with_one_pass_over_the_weights():
    """Llama-3.2-1B shapes at a 32-token query: one row tile, >= 128 programs where the
    widths allow, 16 KiB weight tiles, K steps dividing K."""
    qkv = fl.default_linear_blocks(m=32, widths=(2048, 512, 512), k=2048, columns=3072)
    assert qkv == fl.LinearBlocks(block_m=32, block_n=16, block_k=512)
    gate_up = fl.default_linear_blocks(m=32, widths=(8192, 8192), k=2048, columns=8192)
    assert gate_up == fl.LinearBlocks(block_m=32, block_n=64, block_k=128)
    down = fl.default_linear_blocks(m=32, widths=(2048,), k=8192, columns=2048)
    assert down == fl.LinearBlocks(block_m=32, block_n=16, block_k=512)
    # Qwen2.5-0.5B's width 896 = 7 x 128: the K step halves until it divides.
    assert fl.default_linear_blocks(m=1, widths=(896,), k=896, columns=896).block_k == 128
    assert fl.default_linear_blocks(m=300, widths=(64,), k=64, columns=64).block_m == 128


def test_bad_input_is_refused_with_what_is_allowed():
    x = jnp.ones((4, 64), jnp.float32)
    w = jnp.ones((32, 64), jnp.float32)
    call = lambda *a, **k: fl.fused_linear(*a, interpret=True, **k)
    with pytest.raises(InputError, match=r"x must be \[M, K\]"):
        call(x[None], (w,))
    with pytest.raises(InputError, match="non-empty tuple"):
        call(x, ())
    with pytest.raises(InputError, match=r"weights\[0\] must be \[N, K=64\]"):
        call(x, (w[:, :32],))
    with pytest.raises(InputError, match=r"weights\[0\] must be .* in x's dtype"):
        call(x, (w.astype(jnp.bfloat16),))
    with pytest.raises(InputError, match="two weights"):
        call(x, (w, w, w), activation="silu_mul")
    with pytest.raises(InputError, match="activation='gelu'"):
        call(x, (w,), activation="gelu")
    with pytest.raises(InputError, match=r"norm_scale must be \[K=64\]"):
        call(x, (w,), norm_scale_K=jnp.ones((32,)))
    with pytest.raises(InputError, match="one \\[N_i\\] array per weight"):
        call(x, (w, w), bias=(jnp.ones((32,)),))
    with pytest.raises(InputError, match=r"residual must be \[M, N\] = \[4, 64\]"):
        call(x, (w, w), residual_MxN=jnp.ones((4, 32)))
    with pytest.raises(InputError, match="must tile K=64"):
        call(x, (w,), blocks=fl.LinearBlocks(16, 64, 16))
    with pytest.raises(InputError, match="power of two >= 16"):
        fl.LinearBlocks(16, 24, 16)
    with pytest.raises(InputError, match="need a GPU"):
        fl.fused_linear(x, (w,), interpret=False)


def _tiny(**overrides):
    """The tiny model with heads of 32 (RoPE in the fused q/k/v kernel: `rotary_fits`)."""
    cfg = preset("tiny", **{"head_dim": 32, **overrides})
    params = init_params(cfg, seed=1)
    # Norm scales at one and zero biases would let a kernel skip them unnoticed.
    noise = lambda a, i: a + 0.1 * jax.random.normal(jax.random.key(i), a.shape, a.dtype)
    leaves, tree = jax.tree.flatten(params)
    return cfg, jax.tree.unflatten(tree, [noise(a, i) for i, a in enumerate(leaves)])


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, qk_norm=True),
                                       dict(dtype="bfloat16"), dict(qkv_bias=True),
                                       dict(head_dim=16)],
                         ids=["llama", "qwen", "bf16", "qwen2.5", "heads-of-16"])
def test_model_with_fused_linear_layers_matches_xla(overrides):
    cfg, params = _tiny(**overrides)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)), jnp.int32)
    want = steps.forward(params, tokens, cfg=cfg)
    got = steps.forward(params, tokens, cfg=cfg, linear_impl="pallas")
    tol = dict(atol=5e-2, rtol=5e-2) if cfg.dtype == "bfloat16" else dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol)
    assert not np.allclose(np.asarray(want[:, 0]), np.asarray(want[:, 1]))  # not constant


def test_session_with_fused_linear_layers_answers_as_xla():
    """Appends (chunked, into a window) and a generating query: the same logits and
    tokens as with XLA's linear layers; the state stays per the same cells."""
    cfg, params = _tiny()
    budget = Budget(cells=128, page_size=16, chunk_sizes=(16, 32), question_cells=16,
                    max_new_tokens=8)
    sessions = [Session(params, cfg, budget, ByteTokenizer(), linear_impl=impl)
                for impl in ("xla", "pallas")]
    data = np.random.default_rng(1).integers(0, 256, 45).astype(np.int32)
    logits = [s.append(data) for s in sessions]
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits[0]), atol=1e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sessions[1].state.k), np.asarray(sessions[0].state.k),
                               atol=1e-5, rtol=1e-5)
    answers = [s.query("what next?", 8) for s in sessions]
    np.testing.assert_array_equal(answers[1].tokens, answers[0].tokens)
    assert answers[0].tokens.size >= 1
    assert abs(answers[1].first_gap - answers[0].first_gap) < 1e-3


def test_fused_linear_layers_refuse_unknown_names():
    cfg, params = _tiny()
    budget = Budget(cells=64, page_size=16, chunk_sizes=(16,), question_cells=16,
                    max_new_tokens=1)
    with pytest.raises(InputError, match="linear_impl='mlp'; allowed"):
        Session(params, cfg, budget, ByteTokenizer(), linear_impl="mlp")
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(InputError, match="linear_impl='dot'; allowed"):
        steps.forward(params, tokens, cfg=cfg, linear_impl="dot")
    with pytest.raises(InputError, match="linear_impl='cublas'; allowed"):
        Transformer(cfg, "cublas").init(jax.random.key(0), tokens, tokens, None)


# ------------------------------------------- RoPE in the epilogue, one output per weight

def _rotary(m: int, d: int, rotate: tuple[bool, ...], seed: int = 5) -> fl.Rotary:
    """Angles of m random positions up to 128k (Llama-3's inverse frequencies)."""
    positions = jnp.asarray(np.random.default_rng(seed).integers(0, 1 << 17, m), jnp.int32)
    inv_freq = jnp.asarray(1.0 / 500000.0 ** (np.arange(0, d, 2) / d), jnp.float32)
    cos, sin = rope.rope_tables(positions, inv_freq)
    return fl.Rotary(cos, sin, rotate=rotate)


ROTARY_CASES = [
    # q/k/v of 4/2/2 heads of 32 (the least: two 16-row half-strips a program), 20 rows.
    (Case(20, 128, (128, 64, 64), norm=True), 32, (True, True, False)),
    # Heads of 64 in strips of 16 of each half (2 programs a head), biases, 2 row tiles.
    (Case(20, 128, (128, 64, 64), norm=True, bias=True, blocks=(16, 32, 32)), 64,
     (True, True, False)),
    # A whole head per program (block_n = D), v-like weights first, 3 K steps.
    (Case(33, 192, (64, 128), blocks=(32, 64, 64)), 64, (False, True)),
]


@pytest.mark.parametrize("split", [False, True], ids=["side-by-side", "split"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case, d, rotate", ROTARY_CASES,
                         ids=[f"{c}_d{d}" for c, d, _ in ROTARY_CASES])
def test_rotary_epilogue_matches_reference(case, d, rotate, dtype, split, interpret=True):
    """q/k rotated per head in the epilogue: as the reference (`model.rope.rotate` of the
    rounded outputs), outputs poisoned; the unrotated weights' outputs as without rotary
    (within TOLERANCE, not bit for bit: XLA's CPU dot may sum a tile in another order in the
    two programs, as on an AVX-512 host); split outputs are the side-by-side ones' columns."""
    x, weights, kwargs, _ = _inputs(case, jnp.dtype(dtype))
    blocks = None if case.blocks is None else fl.LinearBlocks(*case.blocks)
    rotary = _rotary(case.m, d, rotate)
    got = fl.fused_linear(x, weights, rotary=rotary, split_outputs=split, blocks=blocks,
                          interpret=interpret, poison_outputs=True, **kwargs)
    want = fl.fused_linear_reference(x, weights, rotary=rotary, split_outputs=split, **kwargs)
    plain = fl.fused_linear(x, weights, blocks=blocks, interpret=interpret, **kwargs)
    bounds = np.cumsum(case.widths)[:-1]
    if not split:
        assert got.shape == (case.m, sum(case.widths))
        got, want = jnp.split(got, bounds, axis=1), jnp.split(want, bounds, axis=1)
    assert [g.shape for g in got] == [(case.m, n) for n in case.widths]
    for g, w, p, r in zip(got, want, jnp.split(plain, bounds, axis=1), rotate, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   **TOLERANCE[dtype])
        if not r:
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(p, np.float32),
                                       **TOLERANCE[dtype])
        else:  # rotated: not the plain output (angles up to 128k rad are not ~0)
            assert np.abs(np.asarray(g, np.float32) - np.asarray(p, np.float32)).max() > 0.1


def test_rotary_default_strips_pair_half_heads():
    """Default tiles with rotary: strips of 32..D columns (two half-strips of >= 16 rows),
    the 1B q/k/v at 32 rows in 32-column strips (96 programs, 192 without rotary), halves
    dividing the weights' first rows when read in place."""
    x = jnp.zeros((32, 2048), jnp.bfloat16)
    w = [jnp.zeros((n, 2048), jnp.bfloat16) for n in (2048, 512, 512)]
    assert fl.blocks_for(x, w).block_n == 16
    assert fl.blocks_for(x, w, head_dim=64) == fl.LinearBlocks(block_m=32, block_n=32,
                                                               block_k=256)
    wide = [jnp.zeros((n, 2048), jnp.bfloat16) for n in (64, 64)]
    assert fl.blocks_for(x[:1], wide, head_dim=64).block_n == 16 * 2  # 2 programs at most
    buffer = jnp.zeros((4096, 2048), jnp.bfloat16)
    assert fl.blocks_for(x, [fl.BufferRows(buffer, 16, 512)], head_dim=128).block_n == 32


def test_rotary_is_checked():
    x = jnp.ones((4, 64), jnp.float32)
    w = jnp.ones((64, 64), jnp.float32)
    ok = _rotary(4, 32, (True,))
    call = lambda *a, **k: fl.fused_linear(x, *a, interpret=True, **k)
    with pytest.raises(InputError, match="no activation, no residual"):
        call((w, w), rotary=fl.Rotary(ok.cos, ok.sin, (True, True)), activation="silu_mul")
    with pytest.raises(InputError, match="one flag per weight"):
        call((w, w), rotary=ok)
    with pytest.raises(InputError, match=r"rotary.cos must be float32 \[M, head_dim / 2\] = "
                                         r"\[4, 16\]"):
        call((w,), rotary=fl.Rotary(ok.cos[:3], ok.sin, (True,)))
    with pytest.raises(InputError, match=r"rotary.sin must be float32"):
        call((w,), rotary=fl.Rotary(ok.cos, ok.sin.astype(jnp.bfloat16), (True,)))
    with pytest.raises(InputError, match="head_dim=16 must be a power of two >= 32"):
        call((w,), rotary=_rotary(4, 16, (True,)))
    with pytest.raises(InputError, match=r"dividing every weight's N \(48,\)"):
        call((w[:48],), rotary=ok)
    with pytest.raises(InputError, match=r"block_n=16 must be in \[32, head_dim=32\]"):
        call((w,), rotary=ok, blocks=fl.LinearBlocks(16, 16, 64))
    with pytest.raises(InputError, match="split_outputs gives each weight its own output"):
        call((w,), split_outputs=True, residual_MxN=x)
    with pytest.raises(InputError, match="rotary must be a Rotary"):
        call((w,), rotary=(ok.cos, ok.sin))


def test_model_rotates_in_the_qkv_kernel():
    """Llama's fused q/k/v call writes q, k, v as three outputs and rotates them: outside
    the kernel only the angles' table (one cos a layer, of the positions); with qk-norm
    (Qwen3) RoPE stays after the norm, outside the kernel (q's and k's)."""
    from tests.kernels.test_kernels import _all_eqns  # noqa: PLC0415 - a test module's helper

    def calls(cfg):
        params = init_params(cfg, seed=0)
        tokens = jnp.zeros((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: steps.forward(p, tokens, cfg=cfg,
                                                       linear_impl="pallas"))(params)
        eqns = list(_all_eqns(jaxpr.jaxpr))
        fused = [e for e in eqns if e.primitive.name == "pallas_call"]
        return [len(e.outvars) for e in fused], sum(e.primitive.name == "cos" for e in eqns)

    outputs, cosines = calls(_tiny()[0])
    assert outputs == [3, 1, 1, 1] * 2 and cosines == 2
    outputs, cosines = calls(_tiny(qk_norm=True)[0])
    assert outputs == [3, 1, 1, 1] * 2 and cosines == 2 * 2  # q and k, per layer


@pytest.mark.parametrize("overrides", [{}, dict(qk_norm=True)], ids=["llama", "qwen3"])
def test_first_token_query_writes_q_k_v_as_one_buffer(overrides):
    """With the attention kernels, a first-token query's branches read q, k and v from one
    buffer (`BranchView.one_qkv_buffer`): the fused q/k/v call writes them as ONE output
    there (three in a generating query), and the answer is XLA's linear layers' answer."""
    from tests.kernels.test_kernels import _all_eqns  # noqa: PLC0415 - a test module's helper

    cfg, params = _tiny(**overrides)
    state = init_state(cfg, rows=1, cells=64)
    chunk = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 32)), jnp.int32)
    state, _ = steps.append(params, state, chunk, jnp.asarray([29], jnp.int32), cfg=cfg,
                            window=64, impl="pallas")
    question = jnp.asarray(np.random.default_rng(3).integers(0, 256, (1, 16)), jnp.int32)

    def query(linear_impl, cap):
        call = functools.partial(
            steps.query, cfg=cfg, window=64, branch_cells=24, max_new_cap=cap, impl="pallas",
            linear_impl=linear_impl)
        args = (params, state, jnp.int32(0), question, jnp.asarray([11], jnp.int32),
                jnp.asarray([cap], jnp.int32), jnp.int32(-1), jnp.float32(0.0),
                jax.random.key(0), jnp.int32(cfg.vocab_size))
        eqns = _all_eqns(jax.make_jaxpr(call)(*args).jaxpr)
        fused = [e for e in eqns if e.primitive.name == "pallas_call" and "fused_linear" in
                 str(e.params.get("name_and_src_info") or e.params.get("name"))]
        qkv_outputs = [len(e.outvars) for e in fused[::4]]  # a layer: qkv, o, gate/up, down
        return call(*args), qkv_outputs

    (want, _), (got, outputs) = query("xla", 1), query("pallas", 1)
    assert outputs == [1] * cfg.num_layers
    np.testing.assert_allclose(np.asarray(got.first_logits), np.asarray(want.first_logits),
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    assert query("pallas", 4)[1][:cfg.num_layers] == [3] * cfg.num_layers  # branch cells


# ------------------------------------------------- weights read in place (model.layouts)

def _in_place_inputs(dtype, seed: int = 3):
    """A [322, 64] buffer holding q/k/v (64, 32, 32 rows), gate/up (96 rows each), a norm
    scale row and a bias row; returns (x [20, 64], buffer, {name: (first, count)})."""
    rng = np.random.default_rng(seed)
    counts = dict(q=64, k=32, v=32, gate=96, up=96, scale=1, bias=1)
    rows, first = {}, 0
    for name, count in counts.items():
        rows[name] = (first, count)
        first += count
    buffer = jnp.asarray(0.2 * rng.standard_normal((first, 64)), dtype)
    x = jnp.asarray(2 * rng.standard_normal((20, 64)), dtype)
    return x, buffer, rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_read_in_place_equal_their_slices(dtype, interpret=True):
    """`BufferRows` operands (weights, a norm scale, a bias: rows of one buffer) give what
    their slices give, bit for bit: same kernel, the index maps offset by the first row.
    Another buffer's rows must not leak in (poisoned output, neighbours of other values)."""
    x, buffer, rows = _in_place_inputs(jnp.dtype(dtype))
    ref = {name: fl.BufferRows(buffer, *rows[name]) for name in rows}
    sliced = {name: r.value() for name, r in ref.items()}
    assert sliced["q"].shape == (64, 64) and sliced["scale"].shape == (1, 64)
    np.testing.assert_array_equal(sliced["k"], buffer[64:96])
    # q's bias is a row of the buffer (width 64); k's and v's (width 32) are arrays.
    kv_bias = buffer[-1, :32] + 1
    qkv = lambda a, vector: dict(norm_scale_K=vector(a["scale"]),
                                 bias=(vector(a["bias"]), kv_bias, -kv_bias))
    got = fl.fused_linear(x, (ref["q"], ref["k"], ref["v"]), **qkv(ref, lambda r: r),
                          interpret=interpret, poison_outputs=True)
    want = fl.fused_linear(x, (sliced["q"], sliced["k"], sliced["v"]),
                           **qkv(sliced, lambda a: a[0]), interpret=interpret)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    reference = fl.fused_linear_reference(x, (ref["q"], ref["k"], ref["v"]),
                                          **qkv(ref, lambda r: r))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference, np.float32),
                               **TOLERANCE[dtype])
    # gate / up at rows 128 and 224 (block_n 32 divides both), silu-mul, then a residual.
    # Strips as wide as the weights' first rows allow (the 1B up projection: 64 columns;
    # starting at row 16 of its buffer: 16).
    wide = dict(m=32, widths=(8192,), k=2048, columns=8192)
    assert fl.default_linear_blocks(**wide).block_n == 64
    assert fl.default_linear_blocks(**wide, offsets=(5120, 16)).block_n == 16
    assert fl.blocks_for(x, (ref["gate"], fl.BufferRows(buffer, 16, 96)),
                         "silu_mul").block_n == 16
    got = fl.fused_linear(x, (ref["gate"], ref["up"]), norm_scale_K=ref["scale"],
                          activation="silu_mul", residual_MxN=x[:, :48].repeat(2, 1),
                          interpret=interpret, poison_outputs=True)
    want = fl.fused_linear(x, (sliced["gate"], sliced["up"]), norm_scale_K=sliced["scale"][0],
                           activation="silu_mul", residual_MxN=x[:, :48].repeat(2, 1),
                           interpret=interpret)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_weights_read_in_place_equal_their_slices(dtype):
    test_weights_read_in_place_equal_their_slices(dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("split", [False, True], ids=["side-by-side", "split"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case, d, rotate", ROTARY_CASES + [
    (Case(32, 2048, (2048, 512, 512), norm=True), 64, (True, True, False))],
                         ids=[f"{c}_d{d}" for c, d, _ in ROTARY_CASES] + ["1b-qkv"])
def test_compiled_rotary_epilogue_matches_reference(case, d, rotate, dtype, split):
    test_rotary_epilogue_matches_reference(case, d, rotate, dtype, split, interpret=False)


def test_weights_read_in_place_are_checked():
    x, buffer, rows = _in_place_inputs(jnp.float32)
    call = lambda *a, **k: fl.fused_linear(x, *a, interpret=True, **k)
    with pytest.raises(InputError, match=r"starts at row 8 of its buffer; .* multiple of "
                                         r"the 16 rows a strip reads"):
        call((fl.BufferRows(buffer, 8, 32),))
    with pytest.raises(InputError, match=r"rows \[320, 352\) of a buffer \(322, 64\)"):
        call((fl.BufferRows(buffer, 320, 32),))
    with pytest.raises(InputError, match=r"norm_scale must be \[K=64\] \(or one BufferRows"):
        call((fl.BufferRows(buffer, 0, 32),), norm_scale_K=fl.BufferRows(buffer, 0, 2))
    with pytest.raises(InputError, match="norm_scale as BufferRows must be in x's dtype"):
        call((fl.BufferRows(buffer, 0, 32),),
             norm_scale_K=fl.BufferRows(buffer.astype(jnp.bfloat16), 320, 1))
    with pytest.raises(InputError, match=r"bias\[0\] must be \[32\]"):
        call((fl.BufferRows(buffer, 0, 32),), bias=(fl.BufferRows(buffer, 321, 1),))


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, qk_norm=True),
                                       dict(dtype="bfloat16"), dict(qkv_bias=True)],
                         ids=["llama", "qwen", "bf16", "qwen2.5"])
@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_laid_out_weights_feed_the_fused_kernels_in_place(layout, overrides):
    """With stacked or packed weights the fused kernels read the layers' buffers in place
    (`layouts.LaidOutLeaf`): the same logits as per-layer weights, bit for bit."""
    cfg, params = _tiny(**overrides)
    laid_out = lay_out(params, layout)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)), jnp.int32)
    want = steps.forward(params, tokens, cfg=cfg, linear_impl="pallas")
    got = steps.forward(laid_out, tokens, cfg=cfg, linear_impl="pallas")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # What the model receives: the fused kernels' parameters as leaves of the buffers.
    from statejax.model.layouts import LaidOutLeaf
    tree = steps.model_params(laid_out, "pallas")["layer_1"]
    q = tree["attn"]["q_proj"]["weight"]
    assert isinstance(q, LaidOutLeaf) and q.shape == (4, 32, 64)
    np.testing.assert_array_equal(q.rows(64).value(),
                                  params["layer_1"]["attn"]["q_proj"]["weight"].reshape(-1, 64))
    assert isinstance(tree["post_norm"]["scale"], LaidOutLeaf)
    with pytest.raises(InputError, match=r"a leaf \(4, 32, 64\) .* is not whole rows of 48"):
        q.rows(48)
    assert not isinstance(steps.model_params(laid_out, "xla")["layer_1"]["attn"]["q_proj"][
        "weight"], LaidOutLeaf)


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_session_on_laid_out_weights_generates_with_fused_kernels(layout):
    """XLA's generation loop would copy stacked or packed weights, the fused kernels read
    them in place: such a session generates, and answers as on per-layer weights."""
    cfg, params = _tiny()
    budget = Budget(cells=128, page_size=16, chunk_sizes=(16, 32), question_cells=16,
                    max_new_tokens=8)
    sessions = [Session(p, cfg, budget, ByteTokenizer(), linear_impl="pallas")
                for p in (params, lay_out(params, layout))]
    assert sessions[1].validate_max_new_tokens(8) == 8
    data = np.random.default_rng(1).integers(0, 256, 45).astype(np.int32)
    logits = [s.append(data) for s in sessions]
    np.testing.assert_array_equal(np.asarray(logits[1]), np.asarray(logits[0]))
    answers = [s.query("what next?", 8) for s in sessions]
    np.testing.assert_array_equal(answers[1].tokens, answers[0].tokens)
    assert answers[1].tokens.size == 8 and answers[1].first_gap == answers[0].first_gap
    xla = Session(lay_out(params, layout), cfg, budget, ByteTokenizer())
    with pytest.raises(InputError, match=rf"allowed: 1\.\.1 \(this session's weights are "
                                         rf"{layout}"):
        xla.query("what next?", 8)


# The Llama-3.2-1B block at a 32-token query, default tiles: the shapes the step runs.
GPU_CASES = [
    Case(32, 2048, (2048, 512, 512), norm=True),  # input norm + q/k/v
    Case(32, 2048, (2048,), residual=True),  # o + residual
    Case(32, 2048, (8192, 8192), norm=True, activation="silu_mul"),  # norm + gate/up
    Case(32, 8192, (2048,), residual=True),  # down + residual
    Case(1, 896, (896, 128, 128), norm=True, bias=True),  # Qwen2.5-0.5B decode, K = 7 x 128
]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", GPU_CASES + CASES, ids=str)
def test_compiled_fused_linear_matches_reference(case, dtype):
    x, weights, kwargs, _ = _inputs(case, jnp.dtype(dtype))
    blocks = None if case.blocks is None else fl.LinearBlocks(*case.blocks)
    got = fl.fused_linear(x, weights, blocks=blocks, interpret=False, poison_outputs=True,
                          **kwargs)
    want = fl.fused_linear_reference(x, weights, **kwargs)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **TOLERANCE[dtype])


# ---------------------------------------------------------------- Triton, without a GPU

# The GPU cases, and the 1B block at 256- and 512-token appends (128-row tiles: the shared
# memory the staged tiles take is what the default K step is sized by).
LOWERING_CASES = GPU_CASES + [
    Case(256, 2048, (2048, 512, 512), norm=True),
    Case(512, 2048, (8192, 8192), norm=True, activation="silu_mul"),
    Case(256, 8192, (2048,), residual=True),
]


def _lower_fused(case: Case, dtype: str, compile_for=None) -> str:
    from tests.kernels.test_kernels import _lower_or_compile  # noqa: PLC0415 - a test module's helper

    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype))
    n_out = case.widths[0] if case.activation else sum(case.widths)
    kwargs = {}
    if case.norm:
        kwargs["norm_scale_K"] = shape(case.k)
    if case.bias:
        kwargs["bias"] = tuple(shape(n) for n in case.widths)
    if case.residual:
        kwargs["residual_MxN"] = shape(case.m, n_out)
    call = jax.jit(lambda x, weights, kw: fl.fused_linear(
        x, weights, activation=case.activation, interpret=False, **kw))
    args = (shape(case.m, case.k), tuple(shape(n, case.k) for n in case.widths), kwargs)
    return _lower_or_compile(call, args, {}, compile_for)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", LOWERING_CASES, ids=str)
def test_fused_linear_lowers_to_triton_on_cpu(case, dtype):
    assert "xla.gpu.triton" in _lower_fused(case, dtype)


def _lower_in_place(dtype: str, compile_for=None, rotary: bool = False) -> str:
    """The 1B input norm + q/k/v reading a packed layer's rows [21506, 2048] in place (the
    rows of `layouts.pack_layers`: k, o, q, v, gate, up, then the two norm scales); with
    `rotary`, as the model calls it: RoPE of q and k (heads of 64), three outputs."""
    from tests.kernels.test_kernels import _lower_or_compile  # noqa: PLC0415 - a test module's helper

    shape = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, jnp.dtype(dt))
    table = shape(32, 32, dt="float32")
    call = jax.jit(lambda x, rows, cos, sin: fl.fused_linear(
        x, (fl.BufferRows(rows, 2560, 2048), fl.BufferRows(rows, 0, 512),
            fl.BufferRows(rows, 4608, 512)), norm_scale_K=fl.BufferRows(rows, 21504, 1),
        rotary=fl.Rotary(cos, sin, (True, True, False)) if rotary else None,
        split_outputs=rotary, interpret=False))
    return _lower_or_compile(call, (shape(32, 2048), shape(21506, 2048), table, table), {},
                             compile_for)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_read_in_place_lower_to_triton_without_slices(dtype, rotary):
    text = _lower_in_place(dtype, rotary=rotary)
    assert "xla.gpu.triton" in text and "slice" not in text


def _h100():
    from tests.kernels.test_kernels import H100  # noqa: PLC0415 - a test module's compile-only device

    return H100


@pytest.mark.skipif(_h100() is None, reason="compiling for a GPU target needs jax's CUDA "
                                            "plugin (CI's second leg installs it)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", LOWERING_CASES, ids=str)
def test_fused_linear_compiles_for_an_h100(case, dtype):
    """Triton -> PTX within the H100's shared memory (a 256-token append's tiles once asked
    for 240 KiB of its 227)."""
    assert "xla.gpu.triton" in _lower_fused(case, dtype, compile_for=_h100())


@pytest.mark.skipif(_h100() is None, reason="compiling for a GPU target needs jax's CUDA "
                                            "plugin (CI's second leg installs it)")
def test_weights_read_in_place_compile_for_an_h100_without_copies():
    """Compiled for the H100 the kernel reads the packed rows where they are: the program
    writes the output only (a slice handed to a Pallas call would be copied out first)."""
    from statejax.perf import step_census  # noqa: PLC0415

    for rotary in (False, True):  # with RoPE and three outputs: the same one kernel
        text = _lower_in_place("bfloat16", compile_for=_h100(), rotary=rotary)
        assert step_census.kernel_kinds(text) == dict(gemm=0, pallas=1, fusion=0, other=0,
                                                      total=1)
        assert step_census.written_bytes(text)["total"] == 32 * 3072 * 2
