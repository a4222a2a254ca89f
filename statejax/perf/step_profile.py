"""Profile of a query step: each weight group and each part of a lone query vs its read floor.

A query at batch 1 must read every weight once, so the weights at the copy bandwidth are its
floor (the end-to-end target: a lone query within 1.3x of it). Each row is one jitted call
(all layers chained, so per-call launch cost is amortised as in the real step):

- pieces: `attn_projections` (q/k/v/o, norms, RoPE; attention replaced by the identity),
  `mlp`, `embed_logits`, `step_without_attention`, `step_with_attention` (causal over the
  question only), and `decode_token` (one generated token of a generating query);
- the query path, which splits a lone query's time into device rate, dispatch, latency,
  transfers and Python: `query_step` (`steps.query` on device-resident inputs, calls
  pipelined), `query_step_dispatch` (host time of one call until it returns),
  `query_step_sync` (one call at a time), `query_step_host_io` (as `Session.query` calls it:
  one packed array in, one out; `_call`: until the call returns; `_unpacked`: three arrays
  each way; `_jit`: through jit's dispatch) and `session_query` (end to end);
- the query rows again per `config.extra_contexts` (`query_step@32768` ...), per
  `config.linear_rows` (`[linear=pallas]`: the fused linear kernels) and per
  `config.layout_rows` (`[packed]`, `[stacked]`: `statejax.model.layouts`);
- `fused_linear[call,bn=N]`: each fused linear call once on every layer's weights, per entry
  of `config.linear_tile_rows` (`fused_linear_tiles`);
- `weights_in_N_gemms`: the same `config.chain_mib` of weights read by N dependent GEMMs, so
  the rows differ only in how many kernels read them: what a kernel boundary costs.

Each row reports ms, the bytes it must read (weights, plus the session's K/V for query rows),
the fraction of the copy bandwidth measured in the same run, and the kernels its optimised
HLO launches (at a few microseconds each, hundreds of launches alone exceed the floor). The
query steps of `config.trace_steps` get a kernel table from a profiler trace
(`device_trace.kernel_breakdown`), those of `config.trace_lone_steps` a host-event table
(`device_trace.trace_lone_calls`); with `config.trace_pieces` each piece also carries its
kernels' device time, since calls of one small kernel are paced by the host's dispatch. Past
profiles and what they showed: `docs/results.md`. The launcher is `experiments/step_profile.py`.
"""

import datetime
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from statejax import steps
from statejax.budget import Budget
from statejax.cache import FullView
from statejax.model.config import preset
from statejax.model.layouts import LAYOUTS, lay_out
from statejax.model.llama import LINEAR_IMPLS, Attention, Mlp, Transformer, init_params
from statejax.perf import device_trace, fused_linear_tiles, lone_query, roofline, step_census
from statejax.perf.query_call import QUERY_PER_CALL_ARGS
from statejax.serving.packing import pack_question, unpack_answer
from statejax.serving.session import Session, generation_width
from statejax.tokenizer import ByteTokenizer

# The attention kernels' KV step at the 1B shape's D = 64 (`paged_flash.kv_block`).
_KV_BLOCK = 128

@struct.dataclass
class IdentityAttention:
    """A cache view whose attention returns q unchanged: the step minus attention."""

    one_qkv_buffer = False  # `statejax.cache.View`: q, k and v in three buffers

    def update_and_attend(self, layer, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        del layer, k_BxTxKxD, v_BxTxKxD
        return q_BxTxHxD, self


def components(cfg, params, tokens: int, linear_impl: str = "xla"):
    """{name: (jitted fn, args, weight bytes it must read)} at batch 1 x `tokens`, the linear
    layers by `linear_impl` (`statejax.model.llama.LINEAR_IMPLS`; "pallas": the fused kernels
    normalise their input by a unit scale, the norms' weights not being these pieces')."""
    x = jax.random.normal(jax.random.key(1), (1, tokens, cfg.embed_dim), cfg.jnp_dtype)
    ids = jax.random.randint(jax.random.key(2), (1, tokens), 0, cfg.vocab_size)
    positions = jnp.arange(tokens, dtype=jnp.int32)[None]
    last = jnp.full((1,), tokens - 1, jnp.int32)
    # Each piece takes exactly the weights it reads, so its bytes are those of its first arg.
    attn_w = [params[f"layer_{i}"]["attn"] for i in range(cfg.num_layers)]
    mlp_w = [params[f"layer_{i}"]["mlp"] for i in range(cfg.num_layers)]
    head = {k: v for k, v in params.items() if not k.startswith("layer_")}

    # The blocks' norms are not these pieces' weights: none (XLA), or a unit scale for the
    # fused kernels' prologue (the norm module they take returns its scale).
    no_norm = ((lambda x: jnp.ones(x.shape[-1:], x.dtype)) if linear_impl == "pallas"
               else (lambda x: x))

    def attn_projections(attn_w, x):
        for i, p in enumerate(attn_w):
            x, _ = Attention(cfg, i, linear_impl).apply(
                {"params": p}, x, positions, IdentityAttention(), no_norm)
        return x

    def mlp(mlp_w, x):
        for p in mlp_w:
            x = Mlp(cfg, linear_impl).apply({"params": p}, x, no_norm)
        return x

    def embed_logits(head, ids):
        return Transformer(cfg.replace(num_layers=0)).apply(
            {"params": head}, ids, positions, IdentityAttention(), last)[0]

    def step(view):
        return lambda params, ids: Transformer(cfg).apply({"params": params}, ids, positions,
                                                          view, last)[0]

    pieces = {
        "attn_projections": (attn_projections, (attn_w, x)),
        "mlp": (mlp, (mlp_w, x)),
        "embed_logits": (embed_logits, (head, ids)),
        "step_without_attention": (step(IdentityAttention()), (params, ids)),
        "step_with_attention": (step(FullView()), (params, ids)),
    }
    # An untied input embedding table is only gathered: its unread rows are not bytes the
    # pieces that take it must move.
    unread = cfg.weight_bytes - cfg.step_weight_bytes(tokens)
    return {name: (jax.jit(fn), args,
                   roofline.tree_nbytes(args[0]) - (unread if "embed" in args[0] else 0))
            for name, (fn, args) in pieces.items()}


def gemm_chain(e: int, tokens: int, total_bytes: int, gemms: int, dtype):
    """`gemms` dependent GEMMs reading `total_bytes` of weights between them.

    GEMM i multiplies its input [T, E], repeated m times along its features ([T, E·m]), by a
    weight [E, E·m] stored [out, in] as the model's, so every GEMM reads E·E·m weights and
    hands the next one [T, E]; weights of std 1/sqrt(E·m) keep the values in range.

    Returns:
      (jitted fn, (weights, x)): fn(weights, x) -> [T, E].
    """
    elements = total_bytes // jnp.dtype(dtype).itemsize
    if elements % (gemms * e * e):
        raise ValueError(f"{total_bytes} bytes of {jnp.dtype(dtype).name} weights do not split "
                         f"into {gemms} GEMMs of [{e}, {e} x m]; allowed: multiples of "
                         f"{gemms * e * e * jnp.dtype(dtype).itemsize} bytes")
    m = elements // (gemms * e * e)
    keys = jax.random.split(jax.random.key(3), gemms + 1)
    weights = [(jax.random.normal(k, (e, e * m)) / np.sqrt(e * m)).astype(dtype)
               for k in keys[1:]]
    x = jax.random.normal(keys[0], (tokens, e), dtype)

    def chain(weights, x):
        for w in weights:
            x = jax.lax.dot_general(jnp.tile(x, (1, m)), w, (((1,), (1,)), ((), ())))
        return x

    return jax.jit(chain), (weights, x)


def _time_compiled(fn, args, timing, **static) -> tuple[float, int, object]:
    """(median seconds, kernel launches, the compiled fn) of jitted `fn` at `args`, from one
    compilation."""
    compiled = fn.lower(*args, **static).compile()
    return (roofline.median_seconds(compiled, *args, **timing),
            step_census.kernel_kinds(compiled.as_text())["total"], compiled)


def query_path(cfg, params, config, context: int | None = None, linear_impl: str = "xla"):
    """The session's query path at `context` (default `config.context`) cells of random byte
    tokens, its linear layers by `linear_impl` (`statejax.model.llama.LINEAR_IMPLS`).

    Returns:
      (session, question [T] int32, args, static): the session (for `Session.query`) and
      the device call it makes per query, `steps.query(*args, **static)`, with its inputs
      already on the device.
    """
    context = config.context if context is None else context
    page = 16
    # Cells a whole number of 128-cell KV blocks, as the stream's budgets (33792 = 264 x 128):
    # the attention kernels then view them as 128-cell pages, one per KV step, as they do
    # there; at 1024 + 64 cells they read 64-cell pages, two per step.
    cells = -(-(context + 2 * config.tokens) // _KV_BLOCK) * _KV_BLOCK
    # The context goes in as one chunk: one append compile, not one per window it grows
    # through (seconds each at the 1B shape, in a device slot of a minute).
    whole = -(-context // page) * page
    budget = Budget(cells=cells, page_size=page,
                    chunk_sizes=tuple(sorted({16, 32, 64, 256, whole})),
                    question_cells=64, max_new_tokens=config.decode_tokens)
    session = Session(params, cfg, budget, ByteTokenizer(), impl=config.impl,
                      linear_impl=linear_impl)
    rng = np.random.default_rng(0)
    session.append(rng.integers(0, 256, context).astype(np.int32))
    question = rng.integers(0, 256, (1, config.tokens)).astype(np.int32)
    args = (params, session.state, jnp.int32(0), jnp.asarray(question),
            jnp.full((1,), config.tokens, jnp.int32), jnp.ones((1,), jnp.int32),
            jnp.int32(session.stop_token), jnp.float32(0.0), jax.random.key(0),
            jnp.int32(session.tokenizer.vocab_size))
    static = dict(cfg=cfg, window=budget.window_for(session.length),
                  branch_cells=budget.branch_cells,
                  max_new_cap=generation_width([1], budget), impl=config.impl,
                  linear_impl=linear_impl)
    return session, question[0], args, static


def host_inputs(args) -> tuple:
    """`query_path`'s args with the question's three arrays (`QUERY_PER_CALL_ARGS`:
    tokens, lengths, max_new) as host (numpy) values, as `Session.query` passes them; the
    params, the state, the scalars and the PRNG key stay on the device, as the session keeps
    them."""
    return tuple(jax.device_get(a) if i in QUERY_PER_CALL_ARGS else a
                 for i, a in enumerate(args))


def packed_host_inputs(args) -> tuple:
    """`query_path`'s args as `Session.query` passes them to `steps.query_packed`: the
    question's three arrays as one numpy array (`pack_question`), the rest as
    `host_inputs`."""
    request = pack_question(*jax.device_get(args[3:6]))
    return (*args[:3], request, *args[6:])


def fetch_generation(gen: steps.Generation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`query`'s answer on the host as three transfers: tokens [R, G] int32, num_tokens [R]
    int32, gaps [R, G] float32 (waits for the step)."""
    return jax.device_get((gen.tokens, gen.num_tokens, gen.gaps))


def _time_per_generated_token(args, static, width: int, timing) -> tuple[float, int]:
    """(median seconds per generated token, kernels per token) of the query at `args`
    generating `width` tokens: (t(width) - t(1)) / (width - 1) of one compiled program, the
    stop token disabled so no answer ends early."""
    if width < 2:
        raise ValueError(f"decode_tokens must be >= 2 to time a generated token, got {width}")
    static = dict(static, max_new_cap=width)
    never_stop = jnp.int32(-1)  # token ids are >= 0

    def with_max_new(n):
        return (*args[:5], jnp.full((1,), n, jnp.int32), never_stop, *args[7:])

    compiled = steps.query.lower(*with_max_new(width), **static).compile()
    all_tokens = roofline.median_seconds(compiled, *with_max_new(width), **timing)
    first_only = roofline.median_seconds(compiled, *with_max_new(1), **timing)
    return ((all_tokens - first_only) / (width - 1),
            step_census.per_token_kernels(compiled.as_text()))


def _median_wall_seconds(fn, *, warmup: int, repeats: int, after=lambda out: None) -> float:
    """Median host seconds of `fn()`; `after(out)` runs once the clock has stopped (e.g.
    waiting for the device, so the next call starts with nothing in flight)."""
    return _median_call_and_total_seconds(fn, after, warmup=warmup, repeats=repeats)[0]


def _median_call_and_total_seconds(call, finish, *, warmup: int, repeats: int):
    """(median host seconds until `call()` returns, median seconds of `finish(call())`), from
    the same calls, one at a time: where a lone call's time goes before and after the device
    work is queued.

    Each call's output is released before the next call, as a session releases its answer's
    device arrays once fetched: an output still alive during the next call puts that call's
    outputs at new addresses, and on a GPU XLA then re-points its CUDA graph's nodes before
    the replay (`docs/results.md`)."""
    for _ in range(1 + warmup):
        finish(call())
    calls, totals = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        calls.append(time.perf_counter() - start)
        finish(out)
        totals.append(time.perf_counter() - start)
        del out
    return float(np.median(calls)), float(np.median(totals))


def run(config, on_row=None) -> dict:
    """Measures the copy bandwidth, then every piece; returns the results dict.

    The query path comes first (the device call, `Session.query` end to end, one generated
    token), then the weight groups. `on_row(results)`, if given, sees the results after every
    row, so a run cut short keeps what it measured.
    """
    layouts = tuple(config.get("layout_rows", ()))
    if set(layouts) - set(LAYOUTS[1:]):
        raise ValueError(f"layout_rows {layouts}; allowed: some of {LAYOUTS[1:]}")
    linear_rows = tuple(config.get("linear_rows", ()))
    if set(linear_rows) - set(LINEAR_IMPLS):
        raise ValueError(f"linear_rows {linear_rows}; allowed: some of {LINEAR_IMPLS}")
    cfg = preset(config.model, dtype=config.dtype)
    params = init_params(cfg, seed=0)
    timing = dict(warmup=config.warmup, repeats=config.repeats)
    bandwidth = roofline.copy_bandwidth(config.copy_mib, **timing)
    device = jax.devices()[0]
    results = dict(device=f"{device.device_kind} ({device.platform})",
                   jax_version=jax.__version__,
                   date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   model=config.model, dtype=config.dtype, tokens=config.tokens,
                   context=config.context,
                   extra_contexts=list(config.get("extra_contexts", ())), impl=config.impl,
                   params=cfg.num_params, weight_bytes=cfg.weight_bytes,
                   copy_bytes_per_s=bandwidth, copy_mib=config.copy_mib, rows=[])

    def add(name, seconds, launches, nbytes, kernel_ms=None):
        row = dict(component=name, ms=1e3 * seconds, weight_bytes=nbytes,
                   floor_ms=1e3 * nbytes / bandwidth, gbytes_per_s=nbytes / seconds / 1e9,
                   frac_copy=nbytes / seconds / bandwidth, kernels=launches)
        if kernel_ms is not None:  # its kernels' device time per call, from a trace
            row["kernel_ms"] = kernel_ms
        results["rows"].append(row)
        if on_row is not None:
            on_row(results)

    traced_steps = tuple(config.get("trace_steps", ("",)))
    trace_pieces = config.get("trace_pieces", False)

    def trace_failed(key, error):
        # A profiler that fails is recorded, not raised: the rows after this one still count.
        results["trace_errors"] = {**results.get("trace_errors", {}),
                                   key: f"{type(error).__name__}: {str(error)[:300]}"}

    def breakdown(compiled, args, key):
        # Kernels' device time (a profiler trace): what is kernels, what is idle.
        try:
            return device_trace.kernel_breakdown(compiled, args, calls=config.trace_calls,
                                                 top=24)
        except Exception as e:  # noqa: BLE001 - any profiler failure
            trace_failed(key + " kernels", e)
            return None

    def trace_step(suffix):
        """`query_rows`' after_step: the query step's kernels, for the steps of
        `config.trace_steps` (by row suffix)."""
        if suffix not in traced_steps:
            return None

        def after_step(compiled, args):
            found = breakdown(compiled, args, "query_step" + suffix)
            if found is not None:
                results["query_kernels" + suffix] = found
            if on_row is not None:
                on_row(results)
        return after_step

    def trace_lone(suffix):
        """`query_rows`' after_lone: where the session's lone calls spend their time on the
        host (`device_trace.trace_lone_calls`), for the steps of `config.trace_lone_steps`
        (by row suffix)."""
        if suffix not in config.get("trace_lone_steps", ()):
            return None

        def after_lone(calls):
            for row, call in calls.items():
                try:
                    found = device_trace.trace_lone_calls(call, calls=config.trace_calls,
                                                          top=24)
                except Exception as e:  # noqa: BLE001 - any profiler failure
                    trace_failed(f"{row}{suffix} on the host", e)
                    continue
                results.setdefault("lone_calls" + suffix, {})[row] = found
            if on_row is not None:
                on_row(results)
        return after_lone

    def add_piece(name, fn, args, nbytes):
        """A jitted piece's row; with `config.trace_pieces` also its kernels' device time
        per call: a piece of one small kernel is timed by its host dispatch otherwise."""
        seconds, launches, compiled = _time_compiled(fn, args, timing)
        found = breakdown(compiled, args, name) if trace_pieces else None
        add(name, seconds, launches, nbytes, None if found is None else found["kernel_ms"])

    # `config.query_rows` False: only the pieces after (the fused calls' tiles, GEMM chains).
    with_query = config.get("query_rows", True)
    if with_query:
        args, static = query_rows(cfg, params, config, config.context, timing, add,
                                  after_step=trace_step(""), after_lone=trace_lone(""))
        results["query_args"] = len(jax.tree.leaves(args))  # argument buffers per call
        first_query = functools.partial(steps.query, *args, **static)
        add("decode_token", *_time_per_generated_token(args, static, config.decode_tokens, timing),
            _query_bytes(cfg, config, config.context))
        for name, (fn, args, nbytes) in components(cfg, params, config.tokens).items():
            add_piece(name, fn, args, nbytes)
        # The query rows again at larger sessions (names end in @cells): what grows with context.
        for context in config.get("extra_contexts", ()):
            query_rows(cfg, params, config, context, timing, add, suffix=f"@{context}",
                       after_step=trace_step(f"@{context}"),
                       after_lone=trace_lone(f"@{context}"))
        # The blocks' linear layers as fused Pallas kernels (kernels/fused_linear.py): the same
        # step in fewer kernels, writing no split-K partials.
        for linear_impl in linear_rows:
            suffix = f"[linear={linear_impl}]"
            other_args, other_static = query_rows(cfg, params, config, config.context, timing, add,
                                                  suffix=suffix, linear_impl=linear_impl,
                                                  after_step=trace_step(suffix),
                                                  after_lone=trace_lone(suffix))
            # Same session tokens and question: how far its next-token logits are from XLA's
            # (a kernel that is fast but wrong shows here).
            results[f"logits_diff{suffix}"] = logits_difference(
                first_query(), steps.query(*other_args, **other_static))
            pieces = components(cfg, params, config.tokens, linear_impl)
            for name in ("attn_projections", "mlp"):
                add_piece(name + suffix, *pieces[name])
            # With the weights laid out (the kernels read them in place): fewer argument buffers,
            # the same kernels (the census checks it).
            for layout in layouts:
                laid_suffix = f"[{layout},linear={linear_impl}]"
                laid_args, laid_static = query_rows(cfg, lay_out(params, layout), config,
                                                    config.context, timing, add,
                                                    suffix=laid_suffix, linear_impl=linear_impl,
                                                    after_step=trace_step(laid_suffix),
                                                    after_lone=trace_lone(laid_suffix))
                results[f"logits_diff{laid_suffix}"] = logits_difference(
                    first_query(), steps.query(*laid_args, **laid_static))
    tiles = fused_linear_tiles.linear_tiles(cfg, config.tokens, config.get("linear_tile_rows", ()))
    for name, piece in tiles.items():
        try:  # a grid's tiles may not compile (shared memory): the rows after still count
            max_err, matches = fused_linear_tiles.tile_error(piece)
            add_piece(name, piece.fn, piece.args, piece.nbytes)
            results["rows"][-1].update(max_err=max_err, matches=matches)
        except Exception as e:  # noqa: BLE001 - any compile or run failure of one tile
            results["tile_errors"] = {**results.get("tile_errors", {}),
                                      name: f"{type(e).__name__}: {str(e)[:300]}"}
            if on_row is not None:
                on_row(results)
    if tiles and config.get("tuned_dir"):
        results["tuned_tiles"] = fused_linear_tiles.record_linear_tiles(results, tiles,
                                                                         config.tuned_dir)
        if on_row is not None:
            on_row(results)
    # Kernel boundaries alone: the same bytes read by more, smaller GEMMs.
    for gemms in config.get("chain_gemms", ()):
        fn, args = gemm_chain(cfg.embed_dim, config.tokens, config.chain_mib * 2**20, gemms,
                              cfg.jnp_dtype)
        add_piece(f"weights_in_{gemms}_gemms", fn, args, config.chain_mib * 2**20)
    # Last, as stacked weights compile the slowest (`model.layouts`): the same program with
    # fewer argument buffers, so what differs is dispatch.
    for layout in layouts if with_query else ():
        laid_out_args, _ = query_rows(cfg, lay_out(params, layout), config, config.context,
                                      timing, add, suffix=f"[{layout}]",
                                      after_step=trace_step(f"[{layout}]"),
                                      after_lone=trace_lone(f"[{layout}]"))
        results[f"query_args_{layout}"] = len(jax.tree.leaves(laid_out_args))
    return results


def logits_difference(a: steps.Generation, b: steps.Generation) -> float:
    """max |a - b| of two queries' next-token logits [R, V] over max |a| (finite entries)."""
    a, b = (np.asarray(g.first_logits, np.float64) for g in (a, b))
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[finite] - b[finite]).max() / np.abs(a[finite]).max())


def _query_bytes(cfg, config, context: int) -> int:
    """Bytes a query must read: the step's weights and the K/V of context and question."""
    return (cfg.step_weight_bytes(config.tokens)
            + (context + config.tokens) * cfg.kv_bytes_per_token)


def query_rows(cfg, params, config, context: int, timing, add, suffix: str = "",
               after_step=None, linear_impl: str = "xla",
               after_lone=None) -> tuple[tuple, dict]:
    """Adds the query path's rows at a session of `context` cells, each name + `suffix`:
    `query_step` (pipelined calls), `query_step_dispatch`, `query_step_sync`,
    `query_step_host_io_call`, `query_step_host_io`, `query_step_host_io_unpacked`,
    `query_step_host_io_jit`, `session_query` (module docstring).
    `after_step(compiled, args)`, if given, runs right after `query_step` (the kernel trace,
    before the slower rows); `after_lone({row: call})`, if given, last, with the lone calls
    of `query_step_host_io` and `session_query` (each waits for its answer on the host: the
    host trace). `linear_impl`: as `query_path`.

    Returns:
      (args, static) of that query's device call (`query_path`).
    """
    session, question, args, static = query_path(cfg, params, config, context, linear_impl)
    nbytes = _query_bytes(cfg, config, context)
    seconds, launches, compiled = _time_compiled(steps.query, args, timing, **static)
    add("query_step" + suffix, seconds, launches, nbytes)
    if after_step is not None:
        after_step(compiled, args)
    add("query_step_dispatch" + suffix, _median_wall_seconds(
        lambda: compiled(*args), after=jax.block_until_ready, **timing), launches, nbytes)
    add("query_step_sync" + suffix, _median_wall_seconds(
        lambda: jax.block_until_ready(compiled(*args)), **timing), launches, nbytes)
    # As the session calls it: the question in as one numpy array, the answer out as one.
    packed_args = packed_host_inputs(args)
    packed = steps.query_packed.lower(*packed_args, **static).compile()
    packed_launches = step_census.kernel_kinds(packed.as_text())["total"]
    call_s, total_s = _median_call_and_total_seconds(
        lambda: packed(*packed_args), unpack_answer, **timing)
    add("query_step_host_io_call" + suffix, call_s, packed_launches, nbytes)
    add("query_step_host_io" + suffix, total_s, packed_launches, nbytes)
    # The same with the question's three arrays in and the answer's three out: what packing
    # the transfers saves.
    host_args = host_inputs(args)
    add("query_step_host_io_unpacked" + suffix, _median_call_and_total_seconds(
        lambda: compiled(*host_args), fetch_generation, **timing)[1], launches, nbytes)
    # The session's call as it makes it: through jit's dispatch with static arguments, not
    # the compiled executable; what the session adds beyond this is its own Python.
    add("query_step_host_io_jit" + suffix, _median_wall_seconds(
        lambda: unpack_answer(steps.query_packed(*packed_args, **static)), **timing),
        packed_launches, nbytes)
    add("session_query" + suffix, _median_wall_seconds(
        lambda: session.query(question, 1), **timing), None, nbytes)
    if after_lone is not None:
        after_lone({"query_step_host_io": lambda: unpack_answer(packed(*packed_args)),
                    "session_query": lambda: session.query(question, 1)})
    return args, static


def results_markdown(results: dict) -> str:
    """A markdown report: setup, then one row per component, then the kernels of each traced
    query step."""
    traced = any("kernel_ms" in r for r in results["rows"])
    lines = [
        f"# Query step profile: {results['model']} ({results['dtype']}), "
        f"{results['tokens']} tokens, batch 1", "",
        f"- device: {results['device']}; jax {results['jax_version']}; {results['date']}",
        f"- copy bandwidth measured in this run: {results['copy_bytes_per_s'] / 1e9:.1f} GB/s "
        f"(read + write of {results['copy_mib']} MiB); weights "
        f"{results['weight_bytes'] / 1e6:.1f} MB", "",
        f"- query rows: a session of {results.get('context', '?')} cells, attention impl "
        f"`{results.get('impl', 'reference')}`; their bytes add the session's K/V"
        + "".join(f"; rows @{c}: a session of {c} cells" for c in results.get(
            "extra_contexts", ()))
        + (f"; {results['query_args']} argument buffers per call" if "query_args" in results
           else "")
        + "".join(f" ({results[f'query_args_{layout}']} with the layers {layout}: rows "
                  f"[{layout}])" for layout in LAYOUTS[1:]
                  if f"query_args_{layout}" in results)
        + ("; rows [linear=pallas]: the blocks' linear layers by kernels/fused_linear.py "
           "(next-token logits off XLA's by "
           f"{results['logits_diff[linear=pallas]']:.2e} of their largest"
           + "".join(f"; [{layout},linear=pallas]: "
                     f"{results[f'logits_diff[{layout},linear=pallas]']:.2e}"
                     for layout in LAYOUTS[1:]
                     if f"logits_diff[{layout},linear=pallas]" in results) + ")"
           if "logits_diff[linear=pallas]" in results else ""), "",
        "| component | ms | MB read | floor ms | GB/s | % of copy bandwidth | kernels |"
        + (" kernel ms (trace) | % at kernel time |" if traced else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if traced else ""),
    ]
    for r in results["rows"]:
        kernels = "" if r.get("kernels") is None else r["kernels"]
        line = (f"| {r['component']} | {r['ms']:.3f} | {r['weight_bytes'] / 1e6:.1f} | "
                f"{r['floor_ms']:.3f} | {r['gbytes_per_s']:.1f} | "
                f"{100 * r['frac_copy']:.0f}% | {kernels} |")
        if traced:
            line += (f" {r['kernel_ms']:.3f} | {100 * r['floor_ms'] / r['kernel_ms']:.0f}% |"
                     if r.get("kernel_ms") else "  |  |")
        lines.append(line)
    if traced:
        lines += ["", "- kernel ms (trace): the piece's kernels' device time per call from a "
                  "profiler trace, without the host's dispatch, which paces a piece of one "
                  "small kernel timed by calls"]
    lines += _boundary_note(results["rows"])
    split = lone_query.tables(results, heading="###")  # where a lone query waits
    if split:
        lines += ["", "## Where a lone query's time goes (differences of the rows above, "
                  "`statejax.perf.lone_query`)", "", *split]
    ms = {r["component"]: r["ms"] for r in results["rows"]}
    for name, error in results.get("tile_errors", {}).items():
        lines += ["", f"- {name}: did not run: {error}"]
    for r in results["rows"]:
        if r.get("matches") is False:
            lines += ["", f"- {r['component']}: output off the reference by "
                      f"{r['max_err']:.3g} (relative), not recorded"]
    for e in results.get("tuned_tiles", ()):
        rule = ("" if e["default_ms"] is None else
                f" (the rule's tiles: {1e3 * e['default_ms']:.1f} µs"
                + ("; a lookup keeps the rule)" if e["default_ms"] < e["ms"] else ")"))
        lines += ["", f"- recorded: {e['row']}, {1e3 * e['ms']:.1f} µs per call{rule}"]
    for key in results:  # one kernel table per traced query step, in the rows' order
        if key.startswith("query_kernels") and not key.endswith("_error"):
            row = "query_step" + key[len("query_kernels"):]
            lines += ["", *_kernels_markdown(results[key], ms[row], row)]
    for key in results:  # the host side of the lone calls, per traced query step
        if key.startswith("lone_calls"):
            suffix = key[len("lone_calls"):]
            for row, found in results[key].items():
                lines += ["", *_lone_calls_markdown(found, ms.get(row + suffix), row + suffix)]
    errors = dict(results.get("trace_errors", {}))
    if "query_kernels_error" in results:  # results of older profiles
        errors["query_step kernels"] = results["query_kernels_error"]
    for name, error in errors.items():
        lines += ["", f"{name} trace failed: {error}"]
    return "\n".join(lines) + "\n"


def _boundary_note(rows: list[dict]) -> list[str]:
    """What one more kernel cost, from the fewest and most GEMMs of the `weights_in_N_gemms`
    rows (same bytes: an upper bound, as their split-K partials grow too)."""
    chain = [r for r in rows if r["component"].startswith("weights_in_")]
    if len(chain) < 2:
        return []
    few, many = min(chain, key=lambda r: r["kernels"]), max(chain, key=lambda r: r["kernels"])
    extra = many["kernels"] - few["kernels"]
    if extra <= 0:
        return []
    per_kernel_us = 1e3 * (many["ms"] - few["ms"]) / extra
    return ["", f"- kernel boundaries: the same weights in {many['kernels']} kernels took "
            f"{many['ms'] - few['ms']:+.3f} ms against {few['kernels']} kernels: "
            f"{per_kernel_us:.2f} µs per extra kernel"]


def _kernels_markdown(k: dict, step_ms: float, row: str = "query_step") -> list[str]:
    busy = k.get("busy_ms", k["kernel_ms"])  # results written before busy_ms: one stream
    lines = [
        f"## {row} by kernel (profiler trace)", "",
        f"- per call ({k['source']} events): {k['kernels']:.0f} kernels, {k['kernel_ms']:.3f} "
        f"ms of kernel time, {busy:.3f} ms with one or more running, against "
        f"{step_ms:.3f} ms untraced: {step_ms - busy:.3f} ms not in kernels (launch "
        f"gaps, host); traced span {k['span_ms']:.3f} ms (kernels may launch one by one "
        "under the profiler)", "",
        "| kind | kernels | ms |", "|---|---:|---:|",
        *[f"| {kind} | {v['kernels']:.0f} | {v['ms']:.3f} |" for kind, v in k["by_kind"].items()],
        "", "| op (most time) | kind | kernels | ms | µs each |", "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {t['op']} | {t['kind']} | {t['kernels']:.0f} | {t['ms']:.3f} | "
              f"{t['us_each']:.1f} |" for t in k["top"]]
    if k.get("top_kernels"):  # older profiles have none
        lines += ["", "| kernel (most time; numeric suffixes dropped) | kind | kernels | ms | "
                  "µs each |", "|---|---|---:|---:|---:|"]
        lines += [f"| {t['kernel']} | {t['kind']} | {t['kernels']:.0f} | {t['ms']:.3f} | "
                  f"{t['us_each']:.1f} |" for t in k["top_kernels"]]
    return lines


def _lone_calls_markdown(b: dict, untraced_ms: float | None, row: str) -> list[str]:
    """`device_trace.lone_call_breakdown` of a row's calls as markdown: the threads' self
    time, then the events with the most."""
    untraced = "" if untraced_ms is None else f" ({untraced_ms:.3f} ms untraced)"
    threads = "; ".join(f"{t} {ms:.3f} ms" for t, ms in b["threads"].items())
    lines = [
        f"## {row}, one call at a time, on the host (profiler trace)", "",
        f"- per call ({b['calls']} calls, {b['source']} kernels): {b['call_ms']:.3f} ms "
        f"traced{untraced}, {b['kernel_busy_ms']:.3f} ms of it with a kernel running",
        f"- self time per call by thread: {threads}",
        "- CUDA graphs per call: " + ("; ".join(f"{name} {n:g}" for name, n in b.get(
            "graph_events", {}).items()) or "no graph events (none, or XLA's do not show)"),
        "",
        "| thread | event (most self time) | per call | self ms | ms inside |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {t['thread']} | {t['event']} | {t['count']:g} | {t['self_ms']:.3f} | "
              f"{t['ms']:.3f} |" for t in b["top"]]
    return lines
