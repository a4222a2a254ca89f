"""The fused linear calls of one block over a grid of tiles: which stream the weights fastest.

Each row makes one call of `kernels/fused_linear.py` (norm + q/k/v, o + residual, norm +
gate/up + silu-mul, down + residual) once per layer's weights in one program, as a step does,
so the weights come from memory and not from a cache one layer's would fit in. The step
profile (`statejax.perf.step_profile`, `configs/step_profile.py:gpu-linear`) times the rows; each
row's output is checked against the reference (`tile_error`), and each call's fastest matching
tiles are recorded in this GPU model's table (`record_linear_tiles`), which the fused kernels'
defaults read (`fused_linear.blocks_for`).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from statejax import platform
from statejax.kernels import fused_linear, tuned
from statejax.model import rope
from statejax.perf import roofline


class TilePiece(NamedTuple):
    """One row of `linear_tiles`: fn(*args) makes the call once per weight set.

    Attributes:
      fn, args, nbytes: the jitted program, its args (x, weight sets, keywords), the bytes
        of all the weight sets.
      call: "qkv", "o", "gate_up" or "down"; activation: the call's.
      blocks: its tiles; is_default: whether they are `fused_linear.blocks_for`'s rule.
      shape: the call's `fused_linear.tuned_shape` (what a measured entry is keyed by).
    """

    fn: object
    args: tuple
    nbytes: int
    call: str
    activation: str | None
    blocks: object
    is_default: bool
    shape: dict


def linear_tiles(cfg, tokens: int, tiles, copies: int | None = None) -> dict:
    """{name: `TilePiece`}: each fused linear call of one block
    (`kernels/fused_linear.py`: norm + q/k/v (+ RoPE, three outputs, as the model calls it),
    o + residual, norm + gate/up + silu-mul, down + residual) on `tokens` rows of random
    inputs, made once on each of `copies` (default: the model's layers) distinct weight sets
    in one program, as a step makes it once per layer: the weights stream from memory, not
    from a cache that one set would fit in, and one dispatch serves all (fn(x, weight_sets,
    keywords) -> [the call's output per set]; the bytes: all the sets').

    `tiles`: one row per call per entry, each a strip width N (block_n; the other tiles
    `default_linear_blocks` of it: `fused_linear[down,bn=16]` ...) or a tuple (block_n,
    block_k, num_warps, num_stages) with None where the default's is kept
    (`fused_linear[down,bn=16,bk=512,w=8,s=4]`, its tiles in full). Entries that do not fit a
    call are left out (a strip width or block_k not dividing its weights; with RoPE a strip
    outside 32 to head_dim; tiles whose pipelined stages exceed a Hopper block's shared
    memory, `fused_linear.SMEM_LIMIT`), as are entries that come to tiles a row already has."""
    dtype = cfg.jnp_dtype
    copies = copies or cfg.num_layers
    e, f = cfg.embed_dim, cfg.mlp_dim
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    keys = iter(jax.random.split(jax.random.key(3), 8 + 8 * copies))
    arr = lambda *shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)
    sets = lambda *shapes: [tuple(arr(*shape) for shape in shapes) for _ in range(copies)]
    x_e, x_q, x_f, scale = arr(tokens, e), arr(tokens, q), arr(tokens, f), jnp.ones((e,), dtype)
    qkv = dict(norm_scale_K=scale)
    # q/k/v as the model calls it: with RoPE in the epilogue (half-head strips of 32 to
    # head_dim columns) and three outputs, where the model does (`llama.Attention`).
    rotated = fused_linear.rotary_fits(cfg.head_dim) and not cfg.qk_norm
    if rotated:
        cos, sin = rope.rope_tables(jnp.arange(tokens), jnp.asarray(
            rope.inverse_frequencies(cfg)))
        qkv["rotary"] = fused_linear.Rotary(cos, sin, rotate=(True, True, False))
    calls = {  # name: (x, weight sets, activation, keywords)
        "qkv": (x_e, sets((q, e), (kv, e), (kv, e)), None, qkv),
        "o": (x_q, sets((e, q)), None, dict(residual_MxN=x_e)),
        "gate_up": (x_e, sets((f, e), (f, e)), "silu_mul", dict(norm_scale_K=scale)),
        "down": (x_f, sets((e, f)), None, dict(residual_MxN=x_e)),
    }
    interpret = not platform.compiling_for_gpu()
    pieces = {}
    for name, (x, weight_sets, activation, keywords) in calls.items():
        rotary = "rotary" in keywords
        weights = weight_sets[0]
        head_dim = cfg.head_dim if rotary else None
        rule = fused_linear.blocks_for(x, weights, activation, head_dim=head_dim,
                                       measured=False)
        seen = set()
        for tile in tiles:
            block_n, block_k, warps, stages = (
                (tile, None, None, None) if isinstance(tile, int) else tuple(tile))
            if block_n is not None and (any(w.shape[0] % block_n for w in weights) or (
                    rotary and not 32 <= block_n <= cfg.head_dim)):
                continue
            blocks = fused_linear.blocks_for(x, weights, activation, block_n,
                                             head_dim=head_dim, measured=False)
            if block_k is not None and x.shape[1] % block_k:
                continue
            changes = dict(block_k=block_k, num_warps=warps, num_stages=stages)
            blocks = dataclasses.replace(blocks, **{k: v for k, v in changes.items()
                                                    if v is not None})
            staged = blocks.staged_bytes(2 if activation else 1, x.dtype.itemsize)
            if blocks in seen or staged > fused_linear.SMEM_LIMIT:
                continue
            seen.add(blocks)
            label = f"bn={blocks.block_n}" if isinstance(tile, int) else (
                f"bn={blocks.block_n},bk={blocks.block_k},w={blocks.num_warps},"
                f"s={blocks.num_stages}")
            call = functools.partial(fused_linear.fused_linear, activation=activation,
                                     blocks=blocks, interpret=interpret,
                                     split_outputs=rotary,
                                     name=f"statejax_fused_linear_{name}")
            fn = jax.jit(lambda x, weight_sets, keywords, call=call: [
                call(x, weights, **keywords) for weights in weight_sets])
            pieces[f"fused_linear[{name},{label}]"] = TilePiece(
                fn, (x, weight_sets, keywords), roofline.tree_nbytes(weight_sets), name,
                activation, blocks, blocks == rule,
                fused_linear.tuned_shape(x, weights, activation))
    return pieces


# Elementwise tolerance of a tile's output against the reference: |y - ref| <= tol (1 + |ref|)
# (as the kernel benchmark's `_MATCH_TOLERANCE`).
_TILE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def tile_error(piece: TilePiece) -> tuple[float, bool]:
    """(max |y - ref| / (1 + |ref|) over the call's outputs on every weight set, whether
    within `_TILE_TOLERANCE` of its dtype): a tile is recorded only if it computes the call
    (`fused_linear_reference`, float32 products at HIGHEST precision)."""
    x, weight_sets, keywords = piece.args
    got = piece.fn(*piece.args)
    worst = 0.0
    for ys, weights in zip(got, weight_sets, strict=True):
        want = fused_linear.fused_linear_reference(
            x, weights, activation=piece.activation,
            split_outputs=isinstance(ys, tuple | list), **keywords)
        for y, ref in zip(jax.tree.leaves(ys), jax.tree.leaves(want), strict=True):
            y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
            worst = max(worst, float(np.max(np.abs(y - ref) / (1 + np.abs(ref)))))
    return worst, worst <= _TILE_TOLERANCE[jnp.dtype(x.dtype).name]


def record_linear_tiles(results: dict, pieces: dict, directory: str) -> list[dict]:
    """Per fused call, the fastest tiles by kernel time (`kernel_ms`) whose output matched,
    written into `directory`'s `kernels.tuned` table of this device as a "linear" entry (ms
    and the rule's `default_ms` per call: a lookup keeps the rule where it was faster).
    Returns the entries written."""
    rows = {r["component"]: r for r in results["rows"]}
    kind = jax.devices()[0].device_kind
    written = []
    for call in dict.fromkeys(p.call for p in pieces.values()):
        timed = [(rows[n]["kernel_ms"] / len(p.args[1]), n, p) for n, p in pieces.items()
                 if p.call == call and n in rows and rows[n].get("matches")
                 and rows[n].get("kernel_ms")]
        if not timed:
            continue
        ms, name, best = min(timed, key=lambda t: t[0])
        default_ms = next((t[0] for t in timed if t[2].is_default), None)
        entry = dict(kernel="linear", shape=best.shape, window=best.shape["rows"],
                     backend="triton", block_sizes=dataclasses.asdict(best.blocks),
                     dtype=results["dtype"], ms=ms, default_ms=default_ms, row=name,
                     source=f"experiments/step_profile.py, {results['device']}, "
                            f"jax {results['jax_version']}, {results['date']}")
        tuned.record(entry, device_kind=kind, directory=directory)
        written.append(entry)
    return written
