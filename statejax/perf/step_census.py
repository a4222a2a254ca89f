"""Kernels a session's steps launch on a GPU, counted from their compiled programs on any
machine: the query (`steps.query`) and the data append (`steps.append`).

Each step is compiled for a compile-only GPU target (`statejax.perf.gpu_target`: what the card would
run, minus autotuning) at abstract inputs, so the Llama-3.2-1B shape at 32k cells compiles on a
laptop. Each top-level instruction of the optimised entry computation that launches work is
sorted into a kind:

- `gemm`: XLA's GEMM fusions and cuBLAS calls (weights are read here),
- `pallas`: statejax's attention kernels (Triton or Mosaic GPU custom calls),
- `fusion`: every other fused kernel (norms, RoPE, residuals, split-K reductions, merges,
  page-table arithmetic, cache writes),
- `other`: copies, loops, other library calls (e.g. top-k). A loop counts once here; its
  body (one generated token) is counted apart: `per_token` kernels, and `token_writes`,
  intermediates as large as a weight written per token (a product materialised before its
  reduction, say), which a one-token step should never need.

On the GPU each is at least one kernel launch (XLA records them into a CUDA graph); at even a
few microseconds apiece, hundreds of them are a large share of the time in which a 1B model's
weights can be read (`docs/results.md`). The launcher is `experiments/step_census.py`.
"""

import collections
import datetime
import functools
import itertools
import math
import re
import time

import jax
import jax.numpy as jnp

from statejax import steps
from statejax.errors import InputError
from statejax.model.config import preset
from statejax.model.layouts import LAYOUTS, lay_out
from statejax.model.llama import LINEAR_IMPLS, init_params
from statejax.perf import gpu_target, roofline
from statejax.perf.query_call import APPEND_PER_CALL_ARGS, QUERY_PER_CALL_ARGS, QUERY_SCALAR_ARGS
from statejax.state import SessionState

KINDS = ("gemm", "pallas", "fusion", "other")
# Step arguments a session passes anew per call ("per_call_readers") and, for the query, the
# scalars it keeps on the device ("scalar_readers"), by position (`statejax.steps`).
_PER_CALL = {"query": {"per_call_readers": QUERY_PER_CALL_ARGS,
                       "scalar_readers": QUERY_SCALAR_ARGS},
             "append": {"per_call_readers": APPEND_PER_CALL_ARGS}}
# Entry-computation instructions that launch nothing.
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
              "after-all", "partition-id", "replica-id"}
_INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")


def _kind(line: str) -> str:
    if " fusion(" in line:
        return "gemm" if re.search(r"calls=%?\S*gemm", line) else "fusion"
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if target:
        name = target.group(1)
        if "triton" in name or "mosaic" in name:
            return "pallas"
        if "gemm" in name or "matmul" in name:
            return "gemm"
    return "other"


def kernel_kinds(hlo_text: str) -> dict[str, int]:
    """{kind: launches} of the entry computation of optimised HLO text (`KINDS`, "total")."""
    return _kinds(_entry(hlo_text))


def _launches(computation: str):
    """(name, result type, opcode, line) of each instruction of `computation` that launches
    work (`_NO_LAUNCH` aside)."""
    for line in computation.splitlines():
        # Tuples of six or more elements print `/*index=5*/` comments: an `=` inside the
        # result type (loops and calls of the generation step have such results).
        line = _INDEX_COMMENT.sub("", line)
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\(", line)
        if m and m.group(3) not in _NO_LAUNCH:
            yield m.group(1), m.group(2), m.group(3), line


def _updates_in_place(name: str) -> bool:
    """Whether a launch is a cache update whose result is the whole (aliased) buffer though
    it writes a few rows: scatter and dynamic-update-slice fusions."""
    return "dynamic_update_slice" in name or "scatter" in name


def _kinds(computation: str) -> dict[str, int]:
    counts = collections.Counter(_kind(line) for *_, line in _launches(computation))
    return {kind: counts[kind] for kind in KINDS} | {"total": sum(counts.values())}


def pallas_names(hlo_text: str) -> dict[str, int]:
    """{kernel name: launches} of the entry computation's Pallas calls, by the name each call
    site gives its kernel (`pallas_call(name=...)`, e.g. `statejax_cascade_shared`): what a
    GPU profiler trace shows them as (`statejax.perf.device_trace`)."""
    names = collections.Counter()
    for *_, line in _launches(_entry(hlo_text)):
        if _kind(line) == "pallas":
            found = re.search(r'op_name="[^"]*?([\w.-]+)/pallas_call"', line)
            names[found.group(1) if found else "?"] += 1
    return dict(sorted(names.items()))


def distinct_pallas(hlo_text: str) -> int:
    """Distinct Pallas kernels in the whole program, loop bodies included (same kernel config =
    one compile: XLA compiles identical Triton calls once, so this is what the step's compile
    pays for)."""
    configs = set()
    for line in hlo_text.splitlines():
        if _kind(line) == "pallas":
            config = re.search(r"backend_config=(.*)$", line)
            configs.add(config.group(1) if config else line)
    return len(configs)


def large_copies(hlo_text: str, cfg) -> int:
    """Entry-computation copies and transposes with at least as many elements as a k/v
    projection weight: weights or cells re-laid-out on every call."""
    smallest = cfg.embed_dim * cfg.num_kv_heads * cfg.head_dim
    count = 0
    for line in _entry(hlo_text).splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* (\S+)\(", line)
        if m and ("transpose" in m.group(1) or m.group(3) == "copy"):
            count += math.prod(int(x) for x in m.group(2).split(",") if x) >= smallest
    return count


def generation_loop(hlo_text: str) -> str | None:
    """The instructions of one turn of the step's own loop in the entry computation (the
    generation loop: its condition and body), or None when the entry has no loop.

    Of several entry loops, the step's own is the one its jitted function made (op_name
    `jit(<step>)/while`): a loop of a nested jit, such as the rolled random-bits loop of
    `jax.random` on a CPU, is not a turn."""
    loops = [line for line in _entry(hlo_text).splitlines() if " while(" in line]
    if not loops:
        return None
    if len(loops) > 1:
        own = [line for line in loops if re.search(r'op_name="jit\([^)/]*\)/while"', line)]
        if len(own) != 1:
            raise ValueError(f"{len(loops)} loops in the entry computation, {len(own)} of "
                             "them the step's own (op_name jit(<step>)/while): which one is "
                             "the generation loop is unclear")
        loops = own
    loop = re.search(r"condition=%([\w.-]+), body=%([\w.-]+)", loops[0])
    return "".join(_computation(hlo_text, name) for name in loop.groups())


def input_readers(hlo_text: str, parameters) -> int:
    """Launches of the entry computation that read any of the entry `parameters` (their
    numbers), directly or through views (bitcasts, tuple elements): on a GPU the CUDA-graph
    nodes XLA re-points before a replay in which those inputs came in new buffers
    (`statejax.perf.command_buffer_log`), e.g. a session's per-call inputs."""
    wanted = {int(p) for p in parameters}
    tainted: set[str] = set()
    readers = 0
    for line in _entry(hlo_text).splitlines():
        line = _INDEX_COMMENT.sub("", line)
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\((.*)$", line)
        if m is None:
            continue
        name, opcode, rest = m.groups()
        if opcode == "parameter":
            if int(re.match(r"(\d+)", rest).group(1)) in wanted:
                tainted.add(name)
            continue
        if not tainted.isdisjoint(re.findall(r"%([\w.-]+)", rest)):
            if opcode in _NO_LAUNCH:
                tainted.add(name)  # a view of the parameter, not a launch
            else:
                readers += 1
    return readers


def _entry_parameters(hlo_text: str) -> int:
    return len(re.findall(r" parameter\(\d+\)", _entry(hlo_text)))


def per_token_kernels(hlo_text: str) -> int:
    """Launches per turn of the generation loop (one generated token); 0 without a loop."""
    turn = generation_loop(hlo_text)
    return 0 if turn is None else _kinds(turn)["total"]


def token_writes(hlo_text: str, cfg) -> int:
    """Instructions of a generation-loop turn that write as many elements as a k/v
    projection weight or more, in-place cache updates aside: in a one-token step only the
    weights themselves are that large, so these are re-laid-out weights or products
    materialised before their reduction (each a weight's worth of extra traffic per token)."""
    turn = generation_loop(hlo_text) or ""
    smallest = cfg.embed_dim * cfg.num_kv_heads * cfg.head_dim
    count = 0
    for name, result, _, _ in _launches(turn):
        if not _updates_in_place(name):
            sizes = [math.prod(int(x) for x in dims.split(",") if x)
                     for dims in re.findall(r"\w\[([\d,]*)\]", result)]
            count += max(sizes, default=0) >= smallest
    return count


# Bytes per element of HLO primitive types (the 8-bit float types all start with "f8").
_ITEMSIZE = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8,
                 u64=8, f64=8, c64=8, c128=16)


def _type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO result type, a tuple's elements summed: `(f32[2,3]{1,0}, s32[])` = 28."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", hlo_type):
        itemsize = 1 if dtype.startswith("f8") else _ITEMSIZE.get(dtype)
        if itemsize is None:
            raise ValueError(f"unknown HLO element type {dtype!r} in {hlo_type!r}")
        total += itemsize * math.prod(int(x) for x in dims.split(",") if x)
    return total


def written_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: bytes} the entry computation's kernels write to device memory (`KINDS`,
    "total"): intermediates, each read again at least once, so traffic above the step's
    floor (weights and cells read once) of nearly twice the total (the step's own outputs,
    a few hundred KB, are read by the host instead). On a 32-token query they are mostly
    split-K partial sums (GEMMs) and flash-decoding partials (Pallas).

    Not counted: in-place updates of cells (scatter / dynamic-update-slice fusions: their
    result is the whole buffer, their write a few rows) and loops (their result is the
    carried state; a turn's kernels run inside). Compile-only targets choose GEMM tilings
    without autotuning, so split-K partials may differ on the card."""
    written = collections.Counter()
    for name, result, op, line in _launches(_entry(hlo_text)):
        if op != "while" and not _updates_in_place(name):
            written[_kind(line)] += _type_bytes(result)
    return {kind: written[kind] for kind in KINDS} | {"total": sum(written.values())}


def _entry(hlo_text: str) -> str:
    entry = re.search(r"^ENTRY .*?\n(.*?)^}", hlo_text, re.M | re.S)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry.group(1)


def _computation(hlo_text: str, name: str) -> str:
    body = re.search(rf"^%{re.escape(name)} .*?\n(.*?)^}}", hlo_text, re.M | re.S)
    if body is None:
        raise ValueError(f"no computation {name} in the HLO text")
    return body.group(1)


@functools.cache
def _abstract_params(cfg):
    """Parameter shapes of `cfg` (traced once per config, not once per compiled step)."""
    return jax.eval_shape(lambda: init_params(cfg))


@functools.cache
def _abstract_laid_out(cfg, layout: str):
    """`_abstract_params` in a weights layout (`statejax.model.layouts.LAYOUTS`)."""
    return jax.eval_shape(lambda p: lay_out(p, layout), _abstract_params(cfg))


def _abstract_state(cfg, cells: int) -> SessionState:
    cells_ = jax.ShapeDtypeStruct((cfg.num_layers, 1, cells, cfg.num_kv_heads, cfg.head_dim),
                                  cfg.jnp_dtype)
    return SessionState(k=cells_, v=cells_, lengths=jax.ShapeDtypeStruct((1,), jnp.int32))


def abstract_query_args(cfg, *, context: int, tokens: int, branch_cells: int,
                        max_new_cap: int):
    """Abstract inputs of `steps.query` for one session row of `context` cells and one branch.

    Returns:
      (args, static) with args as ShapeDtypeStructs: `steps.query(*args, **static)`.
    """
    params = _abstract_params(cfg)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (params, _abstract_state(cfg, context), i32(), i32(1, tokens), i32(1), i32(1), i32(),
            jax.ShapeDtypeStruct((), jnp.float32), key, i32())
    static = dict(cfg=cfg, window=context, branch_cells=branch_cells, max_new_cap=max_new_cap)
    return args, static


def abstract_append_args(cfg, *, context: int, chunk: int):
    """Abstract inputs of `steps.append` of a `chunk`-token chunk to one row of `context` cells.

    Returns:
      (args, static): `steps.append(*args, **static)`.
    """
    params = _abstract_params(cfg)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    args = (params, _abstract_state(cfg, context), i32(1, chunk), i32(1))
    return args, dict(cfg=cfg, window=context)


def donated_buffers(hlo_text: str) -> int:
    """Outputs that alias an input buffer (updated in place) in optimised HLO text."""
    header = hlo_text.split("\n", 1)[0]
    return len(re.findall(r"\((\d+), \{[\d,]*\}, (?:may|must)-alias\)", header))


def _compile(step_fn, device, args, static) -> tuple[str, float]:
    """(optimised HLO text, seconds to trace, lower and compile on this host)."""
    start = time.perf_counter()
    text = gpu_target.compile_for(step_fn, device, *args, **static).as_text()
    return text, time.perf_counter() - start


def _row(step, context, impl, text, cfg, **extra) -> dict:
    kinds = kernel_kinds(text)
    written_mb = {kind: n / 2**20 for kind, n in written_bytes(text).items()}
    return dict(step=step, context=context, impl=impl, **extra, written_mb=written_mb,
                distinct_pallas=distinct_pallas(text), pallas_names=pallas_names(text),
                per_layer=kinds["total"] / cfg.num_layers, large_copies=large_copies(text, cfg),
                donated=donated_buffers(text), per_token=per_token_kernels(text),
                token_writes=token_writes(text, cfg), **kinds)


def run(config) -> dict:
    """Compiles the steps for `config.target` and counts their kernels: the query at each
    (context, impl, max_new_cap), the append of each chunk size at each (context, impl), for
    each weight layout of `config.layouts` (`model.layouts.LAYOUTS`) and each `linear_impl`
    of `config.linear_impls` (`model.llama.LINEAR_IMPLS`); stacked and packed weights with
    "xla" run first-token queries only (`steps.generates`).

    Returns:
      {"rows": [{step, context, impl, linear_impl, layout, args (argument buffers),
       max_new_cap | chunk,
       compile_s, distinct_pallas, pallas_names, total, per_layer, gemm, pallas, fusion, other,
       large_copies, donated, per_token, token_writes, written_mb, per_call_readers
       (launches reading the inputs a session passes anew per call: `input_readers`),
       scalar_readers (query: those reading the scalars the session keeps on the
       device)}], "target", "model", "dtype", "tokens", "layers",
      "floor_mb", "jax_version", "date"}. `compile_s`: seconds to trace, lower and compile on
      this host (steps compile in the order of the rows: a later one may reuse caches).
      `distinct_pallas`, `pallas_names`, `large_copies`, `donated` (buffers updated in
      place), `per_token` (kernels) and `token_writes`: see the functions of those names;
      `written_mb`: `written_bytes` in MiB by kind. `floor_mb`: {context: MiB a query step
      must read} (`roofline.query_floor_bytes`).
    """
    cfg = preset(config.model, dtype=config.dtype)
    device = gpu_target.target_device(config.target)
    layouts = config.get("layouts", ("per_layer",))
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise InputError(f"layouts {sorted(unknown)}; allowed: {LAYOUTS}")
    linear_impls = config.get("linear_impls", ("xla",))
    if set(linear_impls) - set(LINEAR_IMPLS):
        raise InputError(f"linear_impls {linear_impls}; allowed: {LINEAR_IMPLS}")
    rows = []

    def add(step, name, context, args, static, **extra):
        for layout in layouts:
            laid_out = (_abstract_laid_out(cfg, layout), *args[1:])
            # Entry parameter numbers: the params' leaves, the state's 3, then argument 2 on.
            first_input = len(jax.tree.leaves(laid_out[0])) + 3 - 2
            for impl, linear_impl in itertools.product(config.impls, linear_impls):
                if extra.get("max_new_cap", 1) > 1 and not steps.generates(laid_out[0],
                                                                           linear_impl):
                    continue  # steps.query refuses the generation loop
                text, secs = _compile(step, device, laid_out,
                                      static | dict(impl=impl, linear_impl=linear_impl))
                if _entry_parameters(text) != len(jax.tree.leaves(laid_out)):
                    raise ValueError("the compiled step dropped an argument: parameter "
                                     "numbers no longer match the arguments")
                readers = {key: input_readers(text, [first_input + i for i in inputs])
                           for key, inputs in _PER_CALL[name].items()}
                rows.append(_row(name, context, impl, text, cfg, layout=layout,
                                 linear_impl=linear_impl,
                                 args=len(jax.tree.leaves(laid_out)), compile_s=secs,
                                 **readers, **extra))

    for context in config.contexts:
        for cap in config.max_new_caps:
            add(steps.query, "query", context, *abstract_query_args(
                cfg, context=context, tokens=config.tokens, branch_cells=config.branch_cells,
                max_new_cap=cap), max_new_cap=cap)
        for chunk in config.append_chunks:
            add(steps.append, "append", context,
                *abstract_append_args(cfg, context=context, chunk=chunk), chunk=chunk)
    floor_mb = {context: roofline.query_floor_bytes(cfg, context, config.tokens) / 2**20
                for context in config.contexts}
    return dict(target=f"{device.device_kind} (compile-only, no autotuning)",
                model=config.model, dtype=config.dtype, tokens=config.tokens,
                layers=cfg.num_layers, floor_mb=floor_mb, jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                rows=rows)


def _written(mb: dict[str, float]) -> str:
    return f"{mb['total']:.1f} ({mb['gemm']:.1f} / {mb['pallas']:.1f})"


def results_markdown(results: dict) -> str:
    """A markdown table: one row per compiled step."""
    lines = [
        f"# Kernels per step: {results['model']} ({results['dtype']}), batch 1", "",
        f"- target: {results['target']}; jax {results['jax_version']}; {results['date']}",
        f"- {results['layers']} layers, compiled at abstract inputs. query: `steps.query`, a "
        f"{results['tokens']}-token question as a branch, then up to `width` tokens (1 = first "
        "token only, no generation loop); append: `steps.append` of a `width`-token chunk",
        "- large copies: entry-level copies / transposes as large as a k/v weight or more; "
        "donated: state buffers updated in place; per token: kernels of one turn of the "
        "generation loop; token writes: intermediates that large written per token; compile "
        "s: trace + lower + compile on the host that ran this (a CPU); Pallas compiled: "
        "distinct Pallas kernels in the whole program, generation loop included (XLA compiles "
        "identical Triton calls once); written MiB: what the step's kernels write (all / by "
        "GEMMs: outputs and split-K partial sums / by Pallas: attention outputs and "
        "flash-decoding partials), each byte read again: traffic above the floor of nearly "
        "twice that; the query's floor "
        "(weights and cells read once): " + ", ".join(
            f"{mb:.0f} MiB at {context}" for context, mb in results["floor_mb"].items()), "",
        "- input readers: launches that read the inputs a session passes anew per call (the "
        "question's arrays; the chunk), which a GPU's CUDA graph re-points every call, and "
        "for the query those reading the scalars the session keeps on the device", "",
        "- impl: the attention's (`statejax.cache.IMPLS`), then the blocks' linear layers' "
        "where not XLA (`linear pallas`: kernels/fused_linear.py)", "",
        "| step | context | impl | weights (argument buffers) | width | compile s | Pallas "
        "compiled | kernels | per layer | gemm | pallas | fusion | other | large copies | "
        "donated | per token | token writes | written MiB (gemm / pallas) | input readers "
        "(per call / scalars) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|",
    ]
    for r in results["rows"]:
        width = r["max_new_cap"] if r["step"] == "query" else r["chunk"]
        weights = (f"{r['layout'].replace('_', ' ')} ({r['args']})" if "layout" in r
                   else "per layer")  # results written before layouts: per layer
        impl = r["impl"] + ("" if r.get("linear_impl", "xla") == "xla"
                            else f", linear {r['linear_impl']}")
        lines.append(f"| {r['step']} | {r['context']} | {impl} | {weights} | {width} | "
                     f"{r['compile_s']:.1f} | {r['distinct_pallas']} | {r['total']} | "
                     f"{r['per_layer']:.1f} | {r['gemm']} | {r['pallas']} | {r['fusion']} | "
                     f"{r['other']} | {r['large_copies']} | {r['donated']} | {r['per_token']} | "
                     f"{r['token_writes']} | {_written(r['written_mb'])} | "
                     f"{_readers(r)} |")
    return "\n".join(lines) + "\n"


def _readers(row: dict) -> str:
    if "per_call_readers" not in row:  # results written before the readers were counted
        return ""
    scalars = row.get("scalar_readers")
    return f"{row['per_call_readers']}" + ("" if scalars is None else f" / {scalars}")
