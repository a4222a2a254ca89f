"""Fused linear layers of a decoder block: RMSNorm prologue, one GEMM pass, epilogue.

A query of T tokens multiplies [M = R x T, K] activations (M tens) by each layer's weights
[N, K]: the GEMMs read every weight once and are bound by those bytes. XLA compiles them as
split-K GEMMs that write partials and reduce them in a kernel after, around several more
small kernels (docs/kernels.md, "Fused linear layers"). This kernel does one linear layer
together with what surrounds it in the block:

    y = epilogue(norm(x) . W^T)        W [N, K] (PyTorch's layout, as `llama.Linear`)

- prologue `norm_scale`: HF's RMSNorm of each row of x (`llama.RMSNorm`'s rounding order);
- several weights, e.g. q, k, v: y is their outputs side by side, [M, N_1 + N_2 + ...];
- `activation="silu_mul"` with two weights (gate, up): y = silu(x G^T) * (x U^T);
- `bias` per weight (Qwen's q/k/v) and `residual` [M, N] added last (the block's skip);
- `rotary`: RoPE of the outputs' heads (q and k) by per-row angles, and `split_outputs`:
  one output per weight, so the attention kernels read q, and the cell writes k and v, as
  whole buffers (a slice handed to a Pallas call is copied out first).

So the MLP is two kernels (norm + gate/up + silu-mul; down + residual), the attention's
input one (norm + q/k/v + RoPE) and its output one (o + residual). Grid (M / bm, N / bn):
program (i, j) reads rows i of x and the [bn, K] strip j of its weight(s) in K steps of bk,
accumulating in float32; no split-K, so nothing but y is written. With `rotary` a program's
bn columns are bn / 2 of a head's first half and their partners in its second half (two
[bn / 2, K] strips), so it rotates them in its epilogue.

A weight, bias or norm scale may be given as `BufferRows`: rows of a bigger buffer (a layer's
slice of stacked or packed weights, `statejax.model.layouts`), which the kernel reads in place
through its block index maps. Handed the slice itself, XLA would copy it out first: a
Pallas call takes whole buffers.

The kernels have no VJP: they are for inference steps (`steps`), not training.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import pallas as pl

from statejax import platform
from statejax.errors import InputError
from statejax.model import rope

from . import paged_flash as pf
from . import tuned

__all__ = ["ACTIVATIONS", "BufferRows", "LinearBlocks", "Rotary", "blocks_for",
           "default_linear_blocks", "fused_linear", "fused_linear_reference", "rotary_fits",
           "tuned_shape"]

ACTIVATIONS = (None, "silu_mul")
# Programs to aim for: about one wave over a Hopper GPU's SMs, each streaming its own strip.
_TARGET_PROGRAMS = 128
# Bytes of one weight tile per K step (per weight), as the decode kernel's K/V steps.
_W_TILE_BYTES = 16 * 1024
# Shared memory the pipelined tiles may take (x and weight tiles x stages), well under
# Hopper's 227 KiB a block (SMEM_LIMIT): bigger sets failed to compile.
SMEM_LIMIT = 227 * 1024
_SMEM_BUDGET = 160 * 1024


@struct.dataclass
class BufferRows:
    """Rows [first, first + count) of a [R, W] buffer: a [count, W] operand read in place.

    A weight [N = count, K = W]; a norm scale or bias [W] is one row (count 1). The kernel's
    index maps add `first` (a weight's: a multiple of its `block_n`) to the strip they read.

    Attributes:
      buffer: [R, W] the whole buffer (a jit argument, or a free reshape of one).
      first, count: static rows.
    """

    buffer: jax.Array
    first: int = struct.field(pytree_node=False)
    count: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(count, W): the rows' shape, as an array's."""
        return (self.count, self.buffer.shape[1])

    @property
    def dtype(self):
        return self.buffer.dtype

    def value(self) -> jax.Array:
        """The rows as an array [count, W] (a slice: a copy where a kernel takes it)."""
        return jax.lax.slice_in_dim(self.buffer, self.first, self.first + self.count)


@struct.dataclass
class Rotary:
    """RoPE in the epilogue (HF's half-split layout, `model.rope.rotate`): each output head
    of `head_dim` columns of the weights flagged in `rotate`, rotated by its row's angles.

    Attributes:
      cos, sin: [M, head_dim / 2] float32, the angles of each row of x
        (`model.rope.rope_tables` of its token's position).
      rotate: static, one flag per weight (q, k, v: (True, True, False)).
    """

    cos: jax.Array
    sin: jax.Array
    rotate: tuple = struct.field(pytree_node=False)

    @property
    def head_dim(self) -> int:
        """D: columns per rotated head (twice the angles' width)."""
        return 2 * self.cos.shape[-1]


def rotary_fits(head_dim: int) -> bool:
    """Whether `Rotary` takes heads of `head_dim`: a power of two >= 32 (a program's two
    half-head strips are >= 16 rows, Triton's least for a dot)."""
    return head_dim >= 32 and pf._is_pow2(head_dim)


def _vector_shape(v) -> tuple[int, ...]:
    """A norm scale's or bias's shape: [W] for one `BufferRows` row, else its own."""
    return (v.shape[1],) if isinstance(v, BufferRows) and v.count == 1 else v.shape


def _vector(v) -> jax.Array:
    """A vector operand as an array [W] (the reference's view)."""
    return v.value()[0] if isinstance(v, BufferRows) else v


def _matrix(w) -> jax.Array:
    return w.value() if isinstance(w, BufferRows) else w


@dataclasses.dataclass(frozen=True)
class LinearBlocks:
    """Tiles of `fused_linear` (powers of two, >= 16: Triton's dot).

    Attributes:
      block_m: rows of x per program (a last tile past M is masked).
      block_n: output columns per program; divides every weight's N.
      block_k: the K step; divides K.
      num_warps, num_stages: Triton's (stages pipeline the K loop's loads).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def staged_bytes(self, weights_per_program: int = 1, itemsize: int = 2) -> int:
        """Shared memory of the K loop's pipelined tiles: an x tile [block_m, block_k] and
        `weights_per_program` weight tiles [block_n, block_k] per stage."""
        return ((self.block_m + weights_per_program * self.block_n) * self.block_k * itemsize
                * self.num_stages)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or not pf._is_pow2(value):
                raise InputError(f"LinearBlocks.{name}={value!r}; allowed: a power of two "
                                 ">= 16")


def default_linear_blocks(*, m: int, widths: tuple[int, ...], k: int, columns: int,
                          itemsize: int = 2, weights_per_program: int = 1,
                          block_n: int | None = None,
                          offsets: tuple[int, ...] = ()) -> LinearBlocks:
    """Tiles for x [m, k] times weights of N = `widths`, output `columns` wide, each program
    reading `weights_per_program` strips (2 for "silu_mul"): block_m the rows rounded up to a
    power of two (16..128); block_n the widest power of two (16..128) dividing every width
    that still gives ~`_TARGET_PROGRAMS` programs; block_k so a weight tile is ~16 KiB
    (64..512), the largest power of two dividing k at most that, halved while the staged
    tiles exceed `_SMEM_BUDGET`. A given `block_n` is kept (the rest follows from it).
    `offsets`: first rows of weights read in place (`BufferRows`), which block_n divides too."""
    block_m = min(128, max(16, pf._next_pow2(m)))
    m_blocks = -(-m // block_m)
    if block_n is None:
        block_n = 16
        while (block_n < 128 and all(w % (2 * block_n) == 0 for w in (*widths, *offsets))
               and m_blocks * columns // (2 * block_n) >= _TARGET_PROGRAMS):
            block_n *= 2
    block_k = min(512, max(64, _W_TILE_BYTES // (block_n * itemsize)))
    blocks = LinearBlocks(block_m=block_m, block_n=block_n, block_k=block_k)
    while blocks.block_k > 16 and (k % blocks.block_k or blocks.staged_bytes(
            weights_per_program, itemsize) > _SMEM_BUDGET):
        blocks = dataclasses.replace(blocks, block_k=blocks.block_k // 2)
    return blocks


def tuned_shape(x_MxK, weights, activation: str | None = None) -> dict:
    """A call's shape as `kernels.tuned` records "linear" tiles: rows M, k K, n output
    columns, weights, strips (weight strips a program reads), itemsize."""
    widths = tuple(w.shape[0] for w in weights)
    paired = activation == "silu_mul"
    return dict(rows=x_MxK.shape[0], k=x_MxK.shape[1],
                n=widths[0] if paired else sum(widths), weights=len(widths),
                strips=2 if paired else 1, itemsize=x_MxK.dtype.itemsize)


def _tiles_fit(tiles: dict, widths, k: int, offsets, head_dim: int | None) -> bool:
    """Measured tiles suit a call: block_k divides K, block_n each width, and the rows a
    strip reads (block_n, half of it with RoPE: then 32 <= block_n <= head_dim) each
    in-place weight's first row."""
    bn = tiles["block_n"]
    strip = bn if head_dim is None else bn // 2
    return (k % tiles["block_k"] == 0 and all(w % bn == 0 for w in widths)
            and all(f % strip == 0 for f in offsets)
            and (head_dim is None or 32 <= bn <= head_dim))


def blocks_for(x_MxK, weights, activation: str | None = None,
               block_n: int | None = None, head_dim: int | None = None,
               measured: bool = True) -> LinearBlocks:
    """`default_linear_blocks` of a call: x [M, K], weights [N_i, K] arrays or `BufferRows`
    (their output width and strips per program from `activation`); `block_n` kept if given.
    With a rotary `head_dim`, strips of half-head pairs: block_n between 32 (two 16-row
    strips, Triton's least) and the head, its halves dividing the weights' first rows.

    Without a given `block_n` and with `measured`, the tiles `kernels/tuned/` holds for this
    call's shape (`tuned_shape`) on the GPU model compiled for come first, where they suit
    it (the fastest of the step profile's tiles grid, recorded only where they beat these
    defaults; nothing in interpret mode)."""
    widths = tuple(w.shape[0] for w in weights)
    paired = activation == "silu_mul"
    offsets = tuple(w.first for w in weights if isinstance(w, BufferRows))
    shape = dict(m=x_MxK.shape[0], widths=widths, k=x_MxK.shape[1],
                 columns=widths[0] if paired else sum(widths), itemsize=x_MxK.dtype.itemsize,
                 weights_per_program=2 if paired else 1)
    if measured and block_n is None:
        found = tuned.lookup(
            "linear", tuned_shape(x_MxK, weights, activation), x_MxK.shape[0],
            device_kind=platform.device_kind(),
            usable=lambda bs: _tiles_fit(bs, widths, x_MxK.shape[1], offsets, head_dim))
        if found is not None:
            return LinearBlocks(**found.block_sizes)
    if head_dim is not None and block_n is None:
        block_n = max(32, min(head_dim, default_linear_blocks(**shape, offsets=offsets).block_n))
        while block_n > 32 and any(f % (block_n // 2) for f in offsets):
            block_n //= 2
    return default_linear_blocks(**shape, block_n=block_n, offsets=offsets)


def _validate_rotary(x_MxK, widths, rotary, residual, activation, blocks):
    if not isinstance(rotary, Rotary):
        raise InputError(f"rotary must be a Rotary, got {type(rotary).__name__}")
    m = x_MxK.shape[0]
    d = rotary.head_dim
    if activation is not None or residual is not None:
        raise InputError("rotary takes outputs side by side: no activation, no residual")
    if len(rotary.rotate) != len(widths):
        raise InputError(f"rotary.rotate needs one flag per weight ({len(widths)}), got "
                         f"{rotary.rotate}")
    for name, t in (("cos", rotary.cos), ("sin", rotary.sin)):
        if t.shape != (m, d // 2) or t.dtype != jnp.float32:
            raise InputError(f"rotary.{name} must be float32 [M, head_dim / 2] = [{m}, "
                             f"{d // 2}], got {t.dtype}{list(t.shape)}")
    if not rotary_fits(d) or any(n % d for n in widths):
        raise InputError(f"rotary head_dim={d} must be a power of two >= 32 dividing every "
                         f"weight's N {widths}")
    if blocks is not None and not (32 <= blocks.block_n <= d):
        raise InputError(f"with rotary, block_n={blocks.block_n} must be in [32, head_dim="
                         f"{d}] (half-head strips of >= 16 rows)")


def _validate(x_MxK, weights, norm_scale_K, bias, residual, activation, blocks):
    for v in (*weights, norm_scale_K, *(bias or ())):
        if isinstance(v, BufferRows) and (
                v.buffer.ndim != 2 or v.first < 0 or v.count < 1
                or v.first + v.count > v.buffer.shape[0]):
            raise InputError(f"BufferRows: rows [{v.first}, {v.first + v.count}) of a buffer "
                             f"{v.buffer.shape}; allowed: rows inside a 2-D buffer")
    if x_MxK.ndim != 2:
        raise InputError(f"x must be [M, K], got shape {x_MxK.shape}")
    m, k = x_MxK.shape
    if not isinstance(weights, tuple | list) or not weights:
        raise InputError(f"weights must be a non-empty tuple of [N, K] arrays, got "
                         f"{type(weights).__name__}")
    for i, w in enumerate(weights):
        if len(w.shape) != 2 or w.shape[1] != k or w.dtype != x_MxK.dtype:
            raise InputError(f"weights[{i}] must be [N, K={k}] in x's dtype {x_MxK.dtype}, "
                             f"got {w.shape} {w.dtype}")
    if activation not in ACTIVATIONS:
        raise InputError(f"activation={activation!r}; allowed: {ACTIVATIONS}")
    widths = tuple(w.shape[0] for w in weights)
    if activation == "silu_mul" and (len(weights) != 2 or widths[0] != widths[1]):
        raise InputError(f"activation='silu_mul' takes two weights (gate, up) of one width, "
                         f"got widths {widths}")
    n_out = widths[0] if activation == "silu_mul" else sum(widths)
    if norm_scale_K is not None and _vector_shape(norm_scale_K) != (k,):
        raise InputError(f"norm_scale must be [K={k}] (or one BufferRows row of K), got "
                         f"{norm_scale_K.shape}")
    if isinstance(norm_scale_K, BufferRows) and norm_scale_K.dtype != x_MxK.dtype:
        raise InputError(f"norm_scale as BufferRows must be in x's dtype {x_MxK.dtype}, got "
                         f"{norm_scale_K.dtype}")
    if bias is not None:
        if activation is not None or len(bias) != len(weights):
            raise InputError("bias takes one [N_i] array per weight, without an activation")
        for i, (b, n) in enumerate(zip(bias, widths, strict=True)):
            if _vector_shape(b) != (n,):
                raise InputError(f"bias[{i}] must be [{n}] (or one BufferRows row of {n}), "
                                 f"got {b.shape}")
    if residual is not None and (residual.shape != (m, n_out) or
                                 residual.dtype != x_MxK.dtype):
        raise InputError(f"residual must be [M, N] = [{m}, {n_out}] in {x_MxK.dtype}, got "
                         f"{residual.shape} {residual.dtype}")
    if blocks is not None:
        if not isinstance(blocks, LinearBlocks):
            raise InputError(f"blocks must be LinearBlocks, got {type(blocks).__name__}")
        if k % blocks.block_k or any(n % blocks.block_n for n in widths):
            raise InputError(f"{blocks} must tile K={k} and every weight's N {widths}: "
                             "block_k dividing K, block_n dividing each N")
    return widths, n_out


def _check_aligned(weights, rows: int):
    """Weights read in place start at a multiple of the `rows` a strip reads (block_n, or
    block_n / 2 with rotary)."""
    for i, w in enumerate(weights):
        if isinstance(w, BufferRows) and w.first % rows:
            raise InputError(f"weights[{i}] starts at row {w.first} of its buffer; read in "
                             f"place its first row must be a multiple of the {rows} rows a "
                             "strip reads")


def _rms(x_ref, k: int, block_k: int, eps: float, valid):
    """Per-row 1 / RMS of x_ref [bm, K] in float32, read in K steps: [bm, 1]."""
    def body(step, total):
        xk = pf.read_rows(x_ref, valid, pl.ds(pl.multiple_of(step * block_k, block_k), block_k))
        xk = xk.astype(jnp.float32)
        return total + jnp.sum(xk * xk, axis=1, keepdims=True)

    total = jax.lax.fori_loop(0, k // block_k, body,
                              jnp.zeros((x_ref.shape[0], 1), jnp.float32))
    return jax.lax.rsqrt(total / k + eps)


def _kernel(*refs, firsts, activation, has_norm, has_bias, has_residual, eps, block_k,
            rotate, outputs, rows):
    """Program (i, j): y[i-rows, j-columns] from the weight(s) whose columns j falls in.

    Refs: x, the norm scale, each weight's strip (two with `rotate`: a head's first-half
    rows and their partners), each bias likewise, the residual, cos and sin, aliased poison
    inputs (not read), then the `outputs` output refs. `rows`: M where the last row tile
    overhangs it (its loads and stores masked), else None.
    """
    refs = list(refs)
    o_refs = refs[len(refs) - outputs:]
    x_ref = refs.pop(0)
    scale_ref = refs.pop(0) if has_norm else None
    per_weight = 2 if rotate else 1
    w_refs = [[refs.pop(0) for _ in range(per_weight)] for _ in firsts]
    b_refs = [[refs.pop(0) for _ in range(per_weight)] for _ in firsts] if has_bias else None
    r_ref = refs.pop(0) if has_residual else None
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rotate else (None, None)
    bm, k = x_ref.shape
    dtype = x_ref.dtype
    valid = None if rows is None else (
        pl.program_id(0) * bm + jnp.arange(bm, dtype=jnp.int32) < rows)[:, None]
    rms = _rms(x_ref, k, block_k, eps, valid) if has_norm else None

    def accumulate(weights):
        def body(step, accs):
            ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
            xk = pf.read_rows(x_ref, valid, ks)
            if has_norm:  # llama.RMSNorm: normalise in f32, round, then scale
                scale = scale_ref[:, ks] if scale_ref.ndim == 2 else scale_ref[ks][None, :]
                xk = (xk.astype(jnp.float32) * rms).astype(dtype) * scale
            # HIGHEST: float32 operands take the IEEE path on Triton, not TF32.
            return tuple(acc + jax.lax.dot_general(
                xk, w[:, ks], (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32) for acc, w in zip(accs, weights, strict=True))

        zeros = tuple(jnp.zeros((bm, w.shape[0]), jnp.float32) for w in weights)
        return jax.lax.fori_loop(0, k // block_k, body, zeros)

    def finish(o_ref, y):
        if has_residual:
            y = pf.read_rows(r_ref, valid) + y
        pf.write_rows(o_ref, y.astype(o_ref.dtype), valid)

    if activation == "silu_mul":
        gate, up = accumulate([w_refs[0][0], w_refs[1][0]])
        # silu of the rounded gate, in float32 (Triton divides no bf16), then rounded again.
        gate = gate.astype(dtype).astype(jnp.float32)
        finish(o_refs[0], jax.nn.silu(gate).astype(dtype) * up.astype(dtype))
        return

    def one_weight(w):
        ys = [acc.astype(dtype) for acc in accumulate(w_refs[w])]
        if has_bias:
            ys = [y + (b if b.ndim == 2 else b[None, :]).astype(dtype)
                  for y, b in zip(ys, (r[...] for r in b_refs[w]), strict=True)]
        o_ref = o_refs[w if outputs > 1 else 0]
        if not rotate:
            finish(o_ref, ys[0])
            return
        lo, hi = ys
        if rotate[w]:  # model.rope.rotate: in float32 from the rounded outputs, rounded
            lo32, hi32, cos, sin = (lo.astype(jnp.float32), hi.astype(jnp.float32),
                                    pf.read_rows(cos_ref, valid), pf.read_rows(sin_ref, valid))
            lo, hi = (lo32 * cos - hi32 * sin).astype(dtype), (hi32 * cos + lo32 * sin).astype(
                dtype)
        # The block [bm, 2, bn / 2]: the two halves of a head's columns.
        half_valid = None if valid is None else valid[:, :, None]
        pf.write_rows(o_ref, lo[:, None, :], half_valid, pl.ds(0, 1), slice(None))
        pf.write_rows(o_ref, hi[:, None, :], half_valid, pl.ds(1, 1), slice(None))

    if len(firsts) == 1:
        one_weight(0)
        return
    # Each program computes columns of one weight: a branch per weight, so a program
    # reads only its own weight's strip.
    j = pl.program_id(1)
    bounds = (*firsts, None)
    for w, (first, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        mine = j >= first if end is None else (j >= first) & (j < end)
        pl.when(mine)(functools.partial(one_weight, w))


@functools.partial(jax.jit, static_argnames=("activation", "norm_eps", "blocks", "interpret",
                                             "poison_outputs", "split_outputs", "name"))
def fused_linear(x_MxK, weights, *, norm_scale_K=None, norm_eps: float = 1e-5, bias=None,
                 residual_MxN=None, activation: str | None = None, rotary: Rotary | None = None,
                 split_outputs: bool = False, blocks: LinearBlocks | None = None,
                 interpret: bool, poison_outputs: bool = False,
                 name: str = "statejax_fused_linear"):
    """`epilogue(norm(x) . W^T)` in one Pallas kernel (module docstring).

    Args:
      x_MxK: activations; M any size (a last row tile past M is masked).
      weights: tuple of [N_i, K] weights in x's dtype, arrays or `BufferRows` (read in
        place); with `activation="silu_mul"` exactly two of one width (gate, up).
      norm_scale_K: optional RMSNorm scale [K] (or a one-row `BufferRows` in x's dtype): x
        is normalised first (`llama.RMSNorm`).
      norm_eps: the RMSNorm epsilon.
      bias: optional tuple of [N_i] biases (arrays or one-row `BufferRows`), one per weight
        (no activation).
      residual_MxN: optional [M, N] in x's dtype, added last.
      activation: None (outputs side by side) or "silu_mul".
      rotary: optional `Rotary`: the flagged weights' outputs rotated per head, after the
        bias (no activation or residual; every N_i a multiple of its head_dim, a power of
        two >= 32).
      split_outputs: return one output per weight instead of them side by side (no
        activation or residual).
      blocks: tiles; default `blocks_for` this call.
      interpret: run in Pallas interpret mode (CPU); compiled needs a GPU.
      poison_outputs: test hook: the outputs start NaN-filled (aliased), so an element the
        kernel does not write stays NaN.
      name: the kernel's name, as a GPU profiler trace shows it (`statejax.perf.device_trace`);
        the model names each of a block's four calls (`statejax_fused_linear_qkv` ...).

    Returns:
      y [M, N] in x's dtype: N = N_1 (silu_mul) or N_1 + N_2 + ...; with `split_outputs` a
      tuple of [M, N_i].
    """
    pf.check_backend("triton", interpret)
    widths, n_out = _validate(x_MxK, weights, norm_scale_K, bias, residual_MxN, activation,
                              blocks)
    if rotary is not None:
        _validate_rotary(x_MxK, widths, rotary, residual_MxN, activation, blocks)
    if split_outputs and (activation is not None or residual_MxN is not None):
        raise InputError("split_outputs gives each weight its own output: no activation, no "
                         "residual")
    m, k = x_MxK.shape
    d = None if rotary is None else rotary.head_dim
    bs = blocks or blocks_for(x_MxK, weights, activation, head_dim=d)
    strip_rows = bs.block_n // 2 if rotary is not None else bs.block_n
    _check_aligned(weights, strip_rows)
    # A last row tile overhanging M is masked in the kernel, not padded by XLA (a launch
    # per operand: at a generated token's one row, four a layer).
    ragged = m % bs.block_m != 0
    # Programs j in [firsts[w], firsts[w + 1]) compute weight w's columns; with "silu_mul"
    # every program reads both weights' strip j.
    firsts = (0, 0) if activation == "silu_mul" else tuple(
        int(f) // bs.block_n for f in np.cumsum((0, *widths[:-1])))
    grid = (pl.cdiv(m, bs.block_m), n_out // bs.block_n)
    args = [x_MxK]
    in_specs = [pl.BlockSpec((bs.block_m, k), lambda i, j: (i, 0))]
    if norm_scale_K is not None:
        scale = (norm_scale_K if isinstance(norm_scale_K, BufferRows)
                 else norm_scale_K.astype(x_MxK.dtype))
        _add_vector(args, in_specs, scale, k, lambda j: 0)

    # The strip of a weight (or its bias) that program j reads, clamped to the weight's;
    # with rotary, its two half-strips (in strips of strip_rows: head h's first-half strip
    # s is strip 2 * per_head * h + s, its partner per_head strips later).
    strips = [lambda j, f=first, n=w.shape[0] // bs.block_n: jnp.clip(j - f, 0, n - 1)
              for w, first in zip(weights, firsts, strict=True)]
    if rotary is None:
        parts = [[strip] for strip in strips]
    else:
        per_head = d // bs.block_n  # programs per head
        half = lambda s, upper: lambda j: (s(j) // per_head * 2 * per_head + upper * per_head
                                           + s(j) % per_head)
        parts = [[half(strip, 0), half(strip, 1)] for strip in strips]
    for w, indices in zip(weights, parts, strict=True):
        in_place = isinstance(w, BufferRows)
        row0 = w.first // strip_rows if in_place else 0  # in strips of the buffer's rows
        for index in indices:
            args.append(w.buffer if in_place else w)
            in_specs.append(pl.BlockSpec((strip_rows, k),
                                         lambda i, j, s=index, r=row0: (r + s(j), 0)))
    if bias is not None:
        for b, indices in zip(bias, parts, strict=True):
            for index in indices:
                _add_vector(args, in_specs, b, strip_rows, index)
    if residual_MxN is not None:
        args.append(residual_MxN)
        in_specs.append(pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j: (i, j)))
    if rotary is not None:
        for table in (rotary.cos, rotary.sin):
            args.append(table)
            in_specs.append(pl.BlockSpec((bs.block_m, strip_rows),
                                         lambda i, j: (i, j % per_head)))

    # Outputs: [M, N] blocks [bm, bn]; with rotary [M, N / D, 2, D / 2] (a free
    # reshape) blocks [bm, 2, bn / 2]: the program's two half-strips of one head.
    columns = [(n, strip) for n, strip in zip(widths, strips, strict=True)] if (
        split_outputs) else [(n_out, lambda j: j)]
    out_specs, out_shapes = [], []
    for n, index in columns:
        if rotary is None:
            out_shapes.append((m, n))
            out_specs.append(pl.BlockSpec((bs.block_m, bs.block_n),
                                          lambda i, j, s=index: (i, s(j))))
        else:
            out_shapes.append((m, n // d, 2, d // 2))
            out_specs.append(pl.BlockSpec(
                (bs.block_m, None, 2, strip_rows),
                lambda i, j, s=index: (i, s(j) // per_head, 0, s(j) % per_head)))
    out_shape = [jax.ShapeDtypeStruct(shape, x_MxK.dtype) for shape in out_shapes]
    aliases = {}
    if poison_outputs:
        aliases = {len(args) + o: o for o in range(len(out_shape))}
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        in_specs += out_specs
    kernel = functools.partial(
        _kernel, firsts=firsts, activation=activation,
        has_norm=norm_scale_K is not None, has_bias=bias is not None,
        has_residual=residual_MxN is not None, eps=float(norm_eps), block_k=bs.block_k,
        rotate=None if rotary is None else tuple(rotary.rotate), outputs=len(out_shape),
        rows=m if ragged else None)
    ys = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pf.triton_compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret, name=name,
    )(*args)
    ys = [y.reshape(m, -1) for y in ys]
    return tuple(ys) if split_outputs else ys[0]


def _add_vector(args, in_specs, v, block: int, index):
    """Appends vector operand v and its spec: blocks of `block` elements, block `index(j)`
    for program j; a `BufferRows` row is read in place as a [1, block] block of its buffer."""
    if isinstance(v, BufferRows):
        args.append(v.buffer)
        in_specs.append(pl.BlockSpec((1, block), lambda i, j: (v.first, index(j))))
    else:
        args.append(v)
        in_specs.append(pl.BlockSpec((block,), lambda i, j: (index(j),)))


def fused_linear_reference(x_MxK, weights, *, norm_scale_K=None, norm_eps: float = 1e-5,
                           bias=None, residual_MxN=None, activation: str | None = None,
                           rotary: Rotary | None = None, split_outputs: bool = False):
    """Plain-JAX `fused_linear`, rounding as the model's modules (`llama.RMSNorm`,
    `llama.Linear`, `model.rope.rotate`, the block's residual add). Returns y [M, N] in x's
    dtype (a tuple of [M, N_i] with `split_outputs`)."""
    dtype = x_MxK.dtype
    x = x_MxK
    weights = [_matrix(w) for w in weights]
    bias = None if bias is None else [_vector(b) for b in bias]
    if norm_scale_K is not None:
        norm_scale_K = _vector(norm_scale_K)
        x32 = x.astype(jnp.float32)
        rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + norm_eps)
        x = (x32 * rms).astype(dtype) * norm_scale_K.astype(dtype)[None, :]
    # HIGHEST: the kernel multiplies float32 in IEEE f32; XLA's default on a GPU is TF32,
    # about 1e-3 off.
    outs = [jnp.dot(x, w.T, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST).astype(dtype) for w in weights]
    if bias is not None:
        outs = [y + b.astype(dtype)[None, :] for y, b in zip(outs, bias, strict=True)]
    if rotary is not None:
        d, m = rotary.head_dim, x.shape[0]
        cos, sin = rotary.cos[:, None, :], rotary.sin[:, None, :]
        outs = [rope.rotate(y.reshape(m, -1, d), cos, sin).reshape(m, -1) if r else y
                for y, r in zip(outs, rotary.rotate, strict=True)]
    if split_outputs:
        return tuple(outs)
    y = jax.nn.silu(outs[0]) * outs[1] if activation == "silu_mul" else jnp.concatenate(
        outs, axis=1)
    return y if residual_MxN is None else residual_MxN + y
