"""The Pallas attention kernels timed against the device's measured peaks and baselines.

Launched by `experiments/kernel_bench.py` (absl; configs in `configs/kernel_bench.py`).
For every shape of the config: the median time of our kernel; the bytes that must move (Q, the
K/V cells each session attends to read once, the output written once) per second, as a
fraction of the copy bandwidth measured in the same run (a device-to-device copy, read +
write); FLOP/s as a fraction of the bf16 matmul rate measured in the same run; and, on a GPU,
the time of comparable baselines (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`,
`jax.nn.dot_product_attention(implementation="cudnn")`, the XLA reference, and for cascade
the append kernel over R rows whose tables alias the shared pages). A baseline that fails is
recorded with its error; our kernels raise. `write_results` writes results.json and
results.md; `record_tuned` records the fastest matching tiles in `kernels/tuned/`.
"""

import dataclasses
import datetime
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from statejax import attention
from statejax.kernels import append_attention as aa
from statejax.kernels import append_attention_mgpu as mg
from statejax.kernels import cascade_attention as ca
from statejax.kernels import decode_attention as da
from statejax.kernels import decode_attention_mgpu as dm
from statejax.kernels import dispatch, tuned
from statejax.perf import roofline

_XLA_SCORES_LIMIT = 8 << 30  # skip the XLA reference when its score matrix exceeds this
# A decode or cascade row's output and lse match the reference when every element is within
# tol x (1 + |reference|): only matching tiles may be recorded as measured.
_MATCH_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def measure_peaks(cfg) -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s) of this device."""
    timing = dict(warmup=cfg.warmup, repeats=cfg.repeats)
    return {"copy_bytes_per_s": roofline.copy_bandwidth(cfg.copy_mib, **timing),
            "matmul_flop_per_s": roofline.matmul_rate(cfg.matmul_size, **timing),
            "copy_mib": cfg.copy_mib, "matmul_size": cfg.matmul_size}


def _paged_inputs(key, *, rows, cells, t, h, k, d, page_size, dtype):
    """q [rows, t, h, d] and a shuffled pool holding `cells` cells per row."""
    pages = math.ceil(cells / page_size)
    keys = jax.random.split(key, 4)
    q = jax.random.normal(keys[0], (rows, t, h, d), dtype)
    shape = (rows * pages, page_size, k, d)
    k_pool = jax.random.normal(keys[1], shape, dtype)
    v_pool = jax.random.normal(keys[2], shape, dtype)
    table = jax.random.permutation(keys[3], rows * pages).reshape(rows, pages).astype(jnp.int32)
    return q, k_pool, v_pool, table


def _attention_traffic(*, rows, cells, t, h, k, d, itemsize):
    """(bytes, flops) of T tokens per row attending to `cells` K/V cells (the last T causal)."""
    io = 2 * rows * t * h * d * itemsize
    kv = rows * cells * k * d * 2 * itemsize
    scores = rows * h * (t * (cells - t) + t * (t + 1) // 2)
    return io + kv, 4 * d * scores


def _seconds(cfg, fn, *args) -> float:
    """Seconds per call of fn(*args) (first argument: the queries). `cfg.chain_calls` >= 2:
    device time, from that many chained calls in one program minus one call
    (`roofline.device_seconds_per_call`); 0: the median of pipelined Python calls, which for
    kernels of a few microseconds measures dispatch."""
    timing = dict(warmup=cfg.warmup, repeats=cfg.repeats)
    if cfg.chain_calls:
        return roofline.device_seconds_per_call(fn, *args, calls=cfg.chain_calls, **timing)
    return roofline.median_seconds(fn, *args, **timing)


def timing_label(cfg) -> str:
    """How `_seconds` times, for the results' header."""
    if cfg.chain_calls:
        return (f"device time per call: ({cfg.chain_calls} chained calls in one program - one "
                f"call) / {cfg.chain_calls - 1}, medians of {cfg.repeats} samples")
    return f"median of {cfg.repeats} samples of 5 pipelined calls (includes dispatch)"


def check_against_reference(got, want, dtype) -> dict:
    """{max_abs_err: of the output, matches: output and lse within `_MATCH_TOLERANCE`}.

    got, want: (out, lse) of a kernel and of its reference on the same inputs."""
    tol = _MATCH_TOLERANCE[jnp.dtype(dtype).name]
    pairs = [(np.asarray(g, np.float32), np.asarray(w, np.float32)) for g, w in zip(got, want,
                                                                                    strict=True)]
    matches = all(bool(np.all(np.abs(g - w) <= tol * (1 + np.abs(w)))) for g, w in pairs)
    out, ref = pairs[0]
    return dict(max_abs_err=float(np.max(np.abs(out - ref))), matches=matches)


def _try(fn):
    """Runs a baseline; returns its seconds or the error it raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a baseline's failure is a result, not a crash
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _baselines_paged(cfg, kind, q, k_pool, v_pool, table, lengths, window):
    """Comparable baselines for decode/append over the same (gathered, contiguous) cells."""
    timed = functools.partial(_seconds, cfg)
    k = aa.gather_pages(k_pool, table, window)  # [B, S, K, D] contiguous copies
    v = aa.gather_pages(v_pool, table, window)
    b, t, h, _ = q.shape
    cells = int(lengths[0]) + t
    out = {}
    if kind == "decode" and t == 1:
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

        pad = -cells % 2048  # gqa: S divisible by k_splits (16) x block_k (128)
        kp = jnp.pad(k[:, :cells], ((0, 0), (0, pad), (0, 0), (0, 0)))
        vp = jnp.pad(v[:, :cells], ((0, 0), (0, pad), (0, 0), (0, 0)))
        seq = jnp.full((b,), cells, jnp.int32)
        out["jax_pallas_gqa_ms"] = _try(lambda: 1e3 * timed(
            jax.jit(jax_decode.gqa), q[:, 0], kp, vp, None, seq))
    kc, vc = k[:, :cells], v[:, :cells]
    out["cudnn_noncausal_ms"] = _try(lambda: 1e3 * timed(jax.jit(functools.partial(
        jax.nn.dot_product_attention, implementation="cudnn")), q, kc, vc))
    if b * h * t * cells * 4 <= _XLA_SCORES_LIMIT:
        q_pos = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        mask = jnp.arange(cells, dtype=jnp.int32)[None, None, :] <= q_pos[:, :, None]
        out["xla_reference_ms"] = _try(lambda: 1e3 * timed(jax.jit(attention.attend), q, kc,
                                                            vc, mask))
    return out


_decode_reference = jax.jit(da.decode_attention_reference, static_argnames="window")
_cascade_reference = jax.jit(ca.cascade_attention_reference)


def bench_paged(cfg, peaks, kind, shape, key, block_sizes=None, backend="triton") -> dict:
    """One decode or append shape: (B, S, T, H, K, D); `block_sizes` None = the defaults;
    `backend` "mosaic_gpu" (append only) times the Hopper variant."""
    b, s, t, h, k, d = shape
    dtype = jnp.dtype(cfg.dtype)
    q, k_pool, v_pool, table = _paged_inputs(key, rows=b, cells=s + t, t=t, h=h, k=k, d=d,
                                             page_size=cfg.page_size, dtype=dtype)
    lengths = jnp.full((b,), s, jnp.int32)
    window = table.shape[1] * cfg.page_size
    fn = dispatch.decode_attention if kind == "decode" else dispatch.append_attention
    defaults = block_sizes is None
    if kind == "decode" and backend == "triton" and defaults:
        # The tiles the default resolves to (a measured table's entry, on a GPU), recorded.
        block_sizes = da.default_block_sizes(batch=b, rows=t * (h // k), k_heads=k,
                                             head_dim=d, page_size=cfg.page_size,
                                             window=window, itemsize=dtype.itemsize)
    call = jax.jit(functools.partial(fn, window=window, block_sizes=block_sizes,
                                     interpret=cfg.interpret, backend=backend))
    seconds = _seconds(cfg, call, q, k_pool, v_pool, table, lengths)
    checked = {}
    if kind == "decode":  # its tiles may be recorded: check them (append's reference is big)
        checked = check_against_reference(
            call(q, k_pool, v_pool, table, lengths),
            _decode_reference(q, k_pool, v_pool, table, lengths, window=window),
            dtype)
    nbytes, flops = _attention_traffic(rows=b, cells=s + t, t=t, h=h, k=k, d=d,
                                       itemsize=dtype.itemsize)
    row = _row(kind, dict(sessions=b, context=s, t=t, heads=h, kv_heads=k, head_dim=d),
               seconds, nbytes, flops, peaks) | checked
    if isinstance(block_sizes, aa.BlockSizes):
        row.update(window=window, tiles=dataclasses.asdict(block_sizes))
    if cfg.baselines and defaults and backend == "triton":
        row.update(_baselines_paged(cfg, kind, q, k_pool, v_pool, table, lengths, window))
    return row


def branch_page_size(cfg, t: int) -> int:
    """Page size of the cascade rows' private pools: T cells, 16..cfg.page_size."""
    return min(cfg.page_size, max(16, 1 << (t - 1).bit_length()))


def _private_block_sizes(cfg, shape) -> aa.BlockSizes:
    """The cascade's private part's default tiles for a (R, S, T, H, K, D) shape."""
    _, _, t, h, k, d = shape
    return aa.BlockSizes.for_append(rows=t * (h // k), head_dim=d,
                                    page_size=branch_page_size(cfg, t))


def cascade_block_sizes(cfg, shape, entry) -> ca.BlockSizes:
    """A `tune_cascade` grid entry (shared block_q, block_k, splits, warps; private block_q[;
    shared stages, default 2]) as tiles, the private part's other tiles as its default."""
    sq, sk, splits, warps, pq, *stages = entry
    return ca.BlockSizes(shared=aa.BlockSizes(sq, sk, splits, warps, *(stages or [2])),
                         private=dataclasses.replace(_private_block_sizes(cfg, shape),
                                                     block_q=pq))


def mosaic_cascade_block_sizes(cfg, shape, entry) -> ca.BlockSizes:
    """A `tune_cascade_mosaic` entry (block_k, max_concurrent_steps, splits of the shared
    part on the Mosaic decode kernel[, private block_q]) as tiles; the private part's other
    tiles (all, without a fourth element) as its default."""
    private = _private_block_sizes(cfg, shape)
    if len(entry) == 4:
        private = dataclasses.replace(private, block_q=entry[3])
    return ca.BlockSizes(shared=dm.MosaicDecodeBlockSizes(*entry[:3]), private=private)




_FORM_LABELS = {"paged": "shared cells in the shuffled pool",
                "cells": "contiguous session cells, as the model calls the kernels"}
CASCADE_FORMS = tuple(_FORM_LABELS)


def _paged_cascade_call(cfg, shape, key, block_sizes, backend):
    """A cascade row's call in the paged form: shared cells in a shuffled pool of
    `cfg.page_size`-cell pages, the branches' in a pool of `branch_page_size` pages.

    Returns:
      (call, args, reference args, shared window, tiles).
    """
    r, s, t, h, k, d = shape
    dtype = jnp.dtype(cfg.dtype)
    q, sk, sv, s_table = _paged_inputs(key, rows=1, cells=s, t=t, h=h, k=k, d=d,
                                       page_size=cfg.page_size, dtype=dtype)
    q = jax.random.normal(jax.random.fold_in(key, 1), (r, t, h, d), dtype)
    branch_ps = branch_page_size(cfg, t)
    _, bk, bv, b_table = _paged_inputs(jax.random.fold_in(key, 2), rows=r, cells=t, t=1, h=h,
                                       k=k, d=d, page_size=branch_ps, dtype=dtype)
    window = s_table.shape[1] * cfg.page_size
    defaults = ca.BlockSizes.for_mosaic if backend == "mosaic_gpu" else ca.BlockSizes.for_shape
    block_sizes = block_sizes or defaults(
        branches=r, tokens=t, group=h // k, k_heads=k, head_dim=d,
        shared_page_size=cfg.page_size, shared_window=window, private_page_size=branch_ps,
        itemsize=dtype.itemsize)
    call = jax.jit(functools.partial(ca.cascade_attention, interpret=cfg.interpret,
                                     block_sizes=block_sizes, backend=backend))
    args = (q, sk, sv, s_table[0], jnp.int32(s), bk, bv, b_table, jnp.zeros((r,), jnp.int32))
    return call, args, args, window, block_sizes


def _cells_cascade_call(cfg, shape, key, block_sizes, backend):
    """A cascade row's call in the form the model makes it (`cascade_attention_cells`): the
    session's cells contiguous, [2 layers, 1 row, S, K, D], the call reading layer 1's (at a
    page offset, as a step's layers do) as pages of one KV block; the branches' cells one
    K/V buffer [2, R, Tb, 2K, D] (Tb: T rounded up to 16) already holding the step's K and V,
    as a generating query's (a first-token query reads them from its q/k/v buffer instead,
    which a chain of timed calls cannot feed without a copy).

    Returns:
      (call, args, reference args, shared window, tiles).
    """
    r, s, t, h, k, d = shape
    dtype = jnp.dtype(cfg.dtype)
    tb = -(-t // 16) * 16
    keys = jax.random.split(key, 4)
    cells_k, cells_v = (jax.random.normal(kk, (2, 1, s, k, d), dtype) for kk in keys[:2])
    branch_kv = jax.random.normal(keys[2], (2, r, tb, 2 * k, d), dtype)
    q = jax.random.normal(keys[3], (r, t, h, d), dtype)
    lengths = jnp.zeros((r,), jnp.int32)  # the step's T tokens at [0, T) of each branch
    block_sizes = block_sizes or ca.BlockSizes.for_cells(
        branches=r, tokens=t, group=h // k, k_heads=k, head_dim=d, cells=s, branch_cells=tb,
        shared_window=s, itemsize=dtype.itemsize, backend=backend, interpret=cfg.interpret)

    @jax.jit
    def call(q, cells_k, cells_v, n, branch_kv, lengths):
        return ca.cascade_attention_cells(
            q, cells_k, cells_v, jnp.int32(0), n, branch_kv, None, lengths, layer=1,
            shared_window=s, block_sizes=block_sizes, interpret=cfg.interpret,
            backend=backend)

    # The reference's pools: layer 1's cells in 16-cell pages, in order.
    pools = [x.reshape(-1, 16, k, d) for x in (cells_k[1], cells_v[1], branch_kv[1, ..., :k, :],
                                               branch_kv[1, ..., k:, :])]
    reference = (q, pools[0], pools[1], jnp.arange(s // 16, dtype=jnp.int32), jnp.int32(s),
                 pools[2], pools[3], jnp.arange(r * tb // 16, dtype=jnp.int32).reshape(r, -1),
                 lengths)
    return call, (q, cells_k, cells_v, jnp.int32(s), branch_kv, lengths), reference, s, \
        block_sizes


def bench_cascade(cfg, peaks, shape, key, block_sizes=None, backend="triton") -> dict:
    """R branches of T tokens over S shared cells: (R, S, T, H, K, D), in
    `cfg.cascade_form` ("paged": `_paged_cascade_call`; "cells": the model's form,
    `_cells_cascade_call`); `block_sizes` None = the defaults (rows record the tiles they
    ran, as `tiles`, with the shared window, the backend, the form, and whether the output
    matched the reference); `backend` "mosaic_gpu" runs the shared part on the Mosaic GPU
    decode kernel."""
    form = cfg.get("cascade_form", "paged")
    if form not in CASCADE_FORMS:
        raise ValueError(f"cascade_form={form!r}; allowed: {CASCADE_FORMS}")
    r, s, t, h, k, d = shape
    dtype = jnp.dtype(cfg.dtype)
    make = _cells_cascade_call if form == "cells" else _paged_cascade_call
    call, args, reference_args, window, block_sizes = make(cfg, shape, key, block_sizes,
                                                           backend)
    seconds = _seconds(cfg, call, *args)
    checked = check_against_reference(call(*args), _cascade_reference(*reference_args), dtype)
    io = 2 * r * t * h * d * dtype.itemsize
    nbytes = io + (s + r * t) * k * d * 2 * dtype.itemsize
    flops = 4 * d * r * h * (t * s + t * (t + 1) // 2)
    row = _row("cascade", dict(sessions=r, context=s, t=t, heads=h, kv_heads=k, head_dim=d),
               seconds, nbytes, flops, peaks) | checked
    row.update(window=window, tiles=dataclasses.asdict(block_sizes), backend=backend,
               form=form)
    if cfg.baselines and form == "paged" and s % cfg.page_size == 0 and backend == "triton":
        # No sharing: the append kernel over R rows whose tables alias the shared pages.
        q, sk, sv, s_table = args[:4]
        pages_t = math.ceil(t / cfg.page_size)
        _, pk, pv, p_table = _paged_inputs(jax.random.fold_in(key, 3), rows=r,
                                           cells=pages_t * cfg.page_size, t=1, h=h, k=k, d=d,
                                           page_size=cfg.page_size, dtype=dtype)
        pool_k = jnp.concatenate([sk, pk])
        pool_v = jnp.concatenate([sv, pv])
        table = jnp.concatenate([jnp.broadcast_to(s_table, (r, s_table.shape[0])),
                                 p_table + sk.shape[0]], axis=1)
        lengths = jnp.full((r,), s, jnp.int32)
        append = jax.jit(functools.partial(aa.append_attention, interpret=cfg.interpret))
        row["append_aliased_rows_ms"] = _try(lambda: 1e3 * _seconds(
            cfg, append, q, pool_k, pool_v, table, lengths))
    return row


def all_work(cfg) -> list[tuple]:
    """(kind, shape, block sizes, backend) of every row, in order: each decode, append and
    cascade shape (then `cascade_targets`) with default Triton tiles, the Mosaic GPU rows
    (`mosaic_work`), the Triton grids (`tuning_work`)."""
    cascade = cfg.cascade + cfg.get("cascade_targets", ())
    return ([("decode", s, None, "triton") for s in cfg.decode]
            + [("append", s, None, "triton") for s in cfg.append]
            + [("cascade", s, None, "triton") for s in cascade]
            + mosaic_work(cfg) + tuning_work(cfg))


def tuning_work(cfg) -> list[tuple]:
    """(kind, shape, block sizes, backend) for the Triton tuning grids: `cfg.tune_decode` on
    `cfg.decode[0]`, `cfg.tune_append` on `cfg.append[0]` (the target shapes), then
    `cfg.tune_cascade` / `cfg.tune_cascade_second` on `cfg.cascade[0]` / `cfg.cascade[1]`,
    the shorter grid first: a time budget too short for both then still finishes one."""
    cascade_grids = sorted(
        (("cascade", cfg.cascade[:1], cfg.get("tune_cascade", ())),
         ("cascade", cfg.cascade[1:2], cfg.get("tune_cascade_second", ()))),
        key=lambda kind_shapes_grid: len(kind_shapes_grid[2]))
    work = []
    for kind, shapes, grid in (
            ("decode", cfg.decode[:1], cfg.tune_decode),
            ("append", cfg.append[:1], cfg.tune_append), *cascade_grids):
        if grid and not shapes:
            raise ValueError(f"a {kind} tuning grid needs the {kind} shape it runs on; the "
                             f"config's {kind} shapes are too few")
        for entry in grid:
            blocks = (cascade_block_sizes(cfg, shapes[0], entry) if kind == "cascade"
                      else aa.BlockSizes(*entry))
            work.append((kind, shapes[0], blocks, "triton"))
    return work


def tuned_entries(results: dict, backends: tuple[str, ...] | None = None) -> list[dict]:
    """Per decode or cascade shape timed with more than one set of tiles: the fastest tiles
    of each backend (Triton; for the cascade also the Mosaic GPU shared part; only those of
    `backends` when given) whose output matched the reference, as `statejax.kernels.tuned`
    entries (with the time, the default Triton tiles' time and where it was measured)."""
    by_shape = {}
    for row in results["rows"]:
        if row["kernel"] in ("decode", "cascade") and "tiles" in row and "ms" in row:
            key = tuple(row[k] for k in ("kernel", "sessions", "context", "t", "heads",
                                         "kv_heads", "head_dim"))
            by_shape.setdefault(key, []).append(row)
    entries = []
    itemsize = jnp.dtype(results["dtype"]).itemsize
    for (kernel, b, _, t, h, k, d), rows in by_shape.items():
        if len(rows) < 2:
            continue
        default = [r["ms"] for r in rows if r["blocks"] == "default" and r.get("matches", True)]
        shape = (dict(batch=b, rows=t * (h // k)) if kernel == "decode"
                 else dict(branches=b, tokens=t, group=h // k))
        for backend in tuned.BACKENDS[kernel]:
            if backends is not None and backend not in backends:
                continue
            candidates = [r for r in rows if r.get("backend", "triton") == backend
                          and r.get("matches", True)]
            if not candidates:
                continue
            best = min(candidates, key=lambda r: r["ms"])
            entries.append(dict(
                kernel=kernel, shape=shape | dict(k_heads=k, head_dim=d, itemsize=itemsize),
                window=best["window"], backend=backend, block_sizes=best["tiles"],
                dtype=results["dtype"], ms=best["ms"], default_ms=default[0] if default else None,
                frac_copy=best["frac_copy"], timing=results["timing"],
                source=f"experiments/kernel_bench.py :{results['variant']}, "
                       f"{results['device']}, jax {results['jax_version']}, {results['date']}"))
    return entries


def tiles_of(entry: dict) -> "ca.BlockSizes | aa.BlockSizes":
    """A tuned entry's block_sizes as the tiles object of its kernel and backend."""
    if entry["kernel"] == "decode":
        return aa.BlockSizes(**entry["block_sizes"])
    return ca.BlockSizes.from_dict(entry["block_sizes"], tuned.backend_of(entry))


def check_cells_form(cfg, entry: dict, key) -> dict:
    """A cascade entry's tiles run through `cascade_attention_cells`, the form the model's
    queries call (contiguous [L, B, C, K, D] cells viewed as pages of one KV block, at a
    layer's page offset), against the reference on fresh inputs of the entry's shape and
    window: `check_against_reference`'s {max_abs_err, matches}. The benchmark's rows run the
    paged form; an entry is recorded only if this form matches too."""
    shape, window = entry["shape"], entry["window"]
    r, t, k, d = shape["branches"], shape["tokens"], shape["k_heads"], shape["head_dim"]
    # Branch cells as a question's budget holds them (question + answer), a ragged shared length.
    dtype, tb, n = jnp.dtype(cfg.dtype), max(96, -(-t // 16) * 16), window - 7
    keys = jax.random.split(key, 5)
    cells = [jax.random.normal(kk, (2, 1, window, k, d), dtype) for kk in keys[:2]]
    branch = [jax.random.normal(kk, (2, r, tb, k, d), dtype) for kk in keys[2:4]]
    q = jax.random.normal(keys[4], (r, t, shape["group"] * k, d), dtype)
    lengths = jnp.zeros((r,), jnp.int32)  # the branch's first step: its T tokens at [0, T)
    got = ca.cascade_attention_cells(
        q, *cells, jnp.int32(0), jnp.int32(n), *branch, lengths, layer=1, shared_window=window,
        block_sizes=tiles_of(entry), interpret=cfg.interpret, backend=tuned.backend_of(entry))
    pools = [c[1].reshape(-1, 16, k, d) for c in (*cells, *branch)]
    want = _cascade_reference(
        q, pools[0], pools[1], jnp.arange(window // 16, dtype=jnp.int32), jnp.int32(n),
        pools[2], pools[3], jnp.arange(r * tb // 16, dtype=jnp.int32).reshape(r, -1), lengths)
    return check_against_reference(got, want, dtype)


def record_tuned(results: dict, directory: str, cfg=None,
                 backends: tuple[str, ...] | None = None) -> list[str]:
    """Writes `tuned_entries` (of `backends`, default all) into `directory`'s table for this
    run's device model, each replacing the entry of its kernel, shape, window and backend;
    with the run's `cfg`, cascade entries only if `check_cells_form` matches (a failure is
    printed)."""
    kind = results["device"].split(": ", 1)[1]
    paths = []
    for i, entry in enumerate(tuned_entries(results, backends)):
        if cfg is not None and entry["kernel"] == "cascade":
            try:
                checked = check_cells_form(cfg, entry, jax.random.key(1000 + i))
            except Exception as e:  # noqa: BLE001 - one entry's failure must not cost the rest
                checked = dict(matches=False, error=f"{type(e).__name__}: {e}"[:300])
            if not checked["matches"]:
                why = checked.get("error") or f"max abs err {checked['max_abs_err']:.3g}"
                print(f"not recorded: {entry['backend']} cascade tiles {entry['block_sizes']} "
                      f"for {entry['shape']}: the cells form does not match the reference "
                      f"({why})", flush=True)
                continue
            entry["cells_form_max_abs_err"] = checked["max_abs_err"]
        paths.append(str(tuned.record(entry, device_kind=kind, directory=directory)))
    return paths


def mosaic_work(cfg) -> list[tuple]:
    """The Mosaic GPU rows: the cascade with its shared part on the Mosaic decode kernel on
    every cascade shape of <= 128 shared rows, then `cfg.tune_cascade_mosaic` on the first;
    default tiles on every decode and append shape, then `cfg.tune_decode_mosaic` /
    `cfg.tune_append_mosaic` on the target shapes. They run after the default rows and before
    the Triton grids; a failure is recorded in its row (a new backend must not cost the other
    rows)."""
    if not cfg.mosaic:
        return []
    work = [("cascade", shape, None, "mosaic_gpu") for shape in cfg.cascade
            if shape[2] * shape[3] // shape[4] * shape[0] <= dm.MAX_ROWS]
    if cfg.cascade:
        work += [("cascade", cfg.cascade[0], mosaic_cascade_block_sizes(cfg, cfg.cascade[0], e),
                  "mosaic_gpu") for e in cfg.get("tune_cascade_mosaic", ())]
    work += [("decode", shape, None, "mosaic_gpu") for shape in cfg.decode]
    work += [("append", shape, None, "mosaic_gpu") for shape in cfg.append]
    work += [("decode", cfg.decode[0], dm.MosaicDecodeBlockSizes(*entry), "mosaic_gpu")
             for entry in cfg.tune_decode_mosaic]
    return work + [("append", cfg.append[0], mg.MosaicBlockSizes(*entry), "mosaic_gpu")
                   for entry in cfg.tune_append_mosaic]


def blocks_label(bs, backend: str = "triton") -> str:
    prefix = "" if backend == "triton" else f"{backend} "
    if bs is None:
        return prefix + "default"
    if isinstance(bs, mg.MosaicBlockSizes):
        return f"{prefix}q{bs.block_q} k{bs.block_k} c{bs.max_concurrent_steps}"
    if isinstance(bs, dm.MosaicDecodeBlockSizes):
        return f"{prefix}k{bs.block_k} c{bs.max_concurrent_steps} s{bs.num_splits}"
    if isinstance(bs, ca.BlockSizes):
        return (f"{prefix}shared {blocks_label(bs.shared)}, private q{bs.private.block_q} "
                f"k{bs.private.block_k} w{bs.private.num_warps}")
    return (f"{prefix}q{bs.block_q} k{bs.block_k} s{bs.num_splits} w{bs.num_warps} "
            f"st{bs.num_stages}" + (" preload" if bs.preload_pages else ""))


def _row(kind, shape, seconds, nbytes, flops, peaks) -> dict:
    return dict(kernel=kind, **shape, ms=1e3 * seconds, bytes=nbytes, flops=flops,
                gbytes_per_s=nbytes / seconds / 1e9,
                frac_copy=nbytes / seconds / peaks["copy_bytes_per_s"],
                tflop_per_s=flops / seconds / 1e12,
                frac_matmul=flops / seconds / peaks["matmul_flop_per_s"])


def run(cfg, workdir: str | None = None) -> dict:
    """Measures the peaks, then every configured shape (targets first).

    With `workdir`, results are rewritten after every shape, so a run cut short keeps what it
    measured. `cfg.time_budget_s` counts from here (the peaks included); a shape is not
    started when the slowest one so far would not fit in what is left, so the run ends
    inside its budget unless a shape takes longer than every one before it, and the caller's
    margin is left for writing and recording tiles."""
    deadline = time.monotonic() + cfg.get("time_budget_s", float("inf"))
    device = jax.devices()[0]
    results = dict(
        device=f"{device.platform}: {device.device_kind}",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax_version=jax.__version__, variant=cfg.variant, dtype=cfg.dtype,
        page_size=cfg.page_size, cascade_form=cfg.get("cascade_form", "paged"),
        interpret=cfg.interpret, timing=timing_label(cfg), rows=[])
    results.update(measure_peaks(cfg))
    key = jax.random.key(0)
    slowest_row_s = 0.0
    for i, (kind, shape, block_sizes, backend) in enumerate(all_work(cfg)):
        row_start = time.monotonic()
        if row_start + slowest_row_s > deadline:
            results["rows"].append(dict(kernel=kind, shape=list(shape),
                                        blocks=blocks_label(block_sizes, backend),
                                        skipped="time budget"))
            continue
        key_i = jax.random.fold_in(key, i)
        try:
            if kind == "cascade":
                row = bench_cascade(cfg, results, shape, key_i, block_sizes, backend)
            else:
                row = bench_paged(cfg, results, kind, shape, key_i, block_sizes, backend)
        except roofline.BelowResolution as e:  # a result of the timing, not of the kernel
            row = dict(kernel=kind, shape=list(shape), error=str(e))
        except Exception as e:
            if backend != "mosaic_gpu":
                raise  # our Triton kernels raise; a new backend must not cost the other rows
            row = dict(kernel=kind, shape=list(shape), error=f"{type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}")
        row["blocks"] = blocks_label(block_sizes, backend)
        slowest_row_s = max(slowest_row_s, time.monotonic() - row_start)
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        if workdir:
            write_results(results, workdir)
    return results


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def results_markdown(results: dict) -> str:
    """`run`'s results as markdown: device, date and jax version, a row per timed call, then
    the kernel targets."""
    lines = [
        f"# Attention kernel benchmark ({results['variant']})", "",
        f"- device: {results['device']}; date: {results['date']}; jax {results['jax_version']}",
        f"- dtype {results['dtype']}, page size {results['page_size']}, "
        f"interpret={results['interpret']}; cascade rows: "
        f"{_FORM_LABELS[results.get('cascade_form', 'paged')]}",
        f"- timing: {results.get('timing', 'median of pipelined calls (includes dispatch)')}",
        f"- measured copy bandwidth (read + write of {results['copy_mib']} MiB): "
        f"{results['copy_bytes_per_s'] / 1e12:.3f} TB/s",
        f"- measured bf16 matmul ({results['matmul_size']}^3): "
        f"{results['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s", "",
        "Bytes = Q + attended K/V cells read once + output once. "
        "Baselines in ms; `cudnn_noncausal` attends to the same cells without the causal tail. "
        "`vs reference`: decode and cascade outputs checked against the plain-JAX reference "
        "in the run (only matching tiles are recorded as measured).",
        "",
    ]
    base_keys = sorted({k for row in results["rows"] for k in row if k.endswith("_ms")})
    header = ["kernel", "B/R", "S", "T", "H", "K", "D", "blocks", "ms", "GB/s", "% copy", "TFLOP/s",
              "% matmul", "vs reference", *[k.removesuffix("_ms") for k in base_keys]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["rows"]:
        if "skipped" in row or "error" in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"error: {row['error']}"
            lines.append(f"| {row['kernel']} | {row['shape']} {row.get('blocks', '')} {why} |")
            continue
        cells = [row["kernel"], row["sessions"], row["context"], row["t"], row["heads"],
                 row["kv_heads"], row["head_dim"], row.get("blocks", ""), row["ms"],
                 row["gbytes_per_s"], 100 * row["frac_copy"], row["tflop_per_s"],
                 100 * row["frac_matmul"],
                 {True: "match", False: "MISMATCH"}.get(row.get("matches"), ""),
                 *[row.get(k, "") for k in base_keys]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines + ["", *target_lines(results)]) + "\n"


def target_lines(results: dict) -> list[str]:
    """The kernel targets, read off the rows that exist."""
    rows = [r for r in results["rows"]  # a row that did not match its reference is no result
            if "skipped" not in r and "error" not in r and r.get("matches", True)]

    def find(kind, **shape):
        """The fastest row of that shape (default or tuned blocks), or None."""
        hits = [r for r in rows if r["kernel"] == kind
                and all(r[k] == v for k, v in shape.items())]
        return min(hits, key=lambda r: r["ms"], default=None)

    out = ["## Targets"]
    dec = find("decode", sessions=8, context=16384, t=1, heads=32, kv_heads=8, head_dim=128)
    if dec:
        out.append(f"- decode 8 x 16k, H=32, K=8, D=128: {100 * dec['frac_copy']:.0f}% of copy "
                   f"bandwidth (target >= 75%), blocks {dec.get('blocks', 'default')}")
    app_ = find("append", sessions=8, context=8192, t=512, heads=32, head_dim=128)
    if app_:
        out.append(f"- append 8 x 512 over 8k, H=32, D=128: {100 * app_['frac_matmul']:.0f}% "
                   f"of the bf16 matmul rate (target >= 40%), blocks "
                   f"{app_.get('blocks', 'default')}")
    # Cascade: the fastest row of each shape (default or tuned tiles), R branches vs one.
    shape = ("context", "t", "heads", "kv_heads", "head_dim")
    fastest = {}
    for r in rows:
        key = (r["sessions"], *(r[k] for k in shape))
        if r["kernel"] == "cascade" and (key not in fastest or r["ms"] < fastest[key]["ms"]):
            fastest[key] = r
    for (sessions, *rest), many in fastest.items():
        one = fastest.get((1, *rest))
        if sessions > 1 and one is not None:
            out.append(f"- cascade over {one['context']} shared cells, T={one['t']}, "
                       f"D={one['head_dim']}: {sessions} branches take "
                       f"{many['ms'] / one['ms']:.2f}x one branch (target < 1.5x at 8)")
    return out


def write_results(results: dict, workdir: str) -> dict:
    """Writes `results` as `workdir/results.json` and `results.md`; returns {"json", "md"}
    paths."""
    os.makedirs(workdir, exist_ok=True)
    paths = {"json": os.path.join(workdir, "results.json"),
             "md": os.path.join(workdir, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(results_markdown(results))
    return paths

