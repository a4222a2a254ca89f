"""Kernels a query step launches on a GPU, counted from its compiled program on any machine.

The step is compiled for a compile-only GPU target (`statejax.gpu_target`: what the card would
run, minus autotuning) at abstract inputs, so the Llama-3.2-1B shape at 32k cells compiles on a
laptop. Each top-level instruction of the optimised entry computation that launches work is
sorted into a kind:

- `gemm`: XLA's GEMM fusions and cuBLAS calls (weights are read here),
- `pallas`: statejax's attention kernels (Triton or Mosaic GPU custom calls),
- `fusion`: every other fused kernel (norms, RoPE, residuals, split-K reductions, merges,
  page-table arithmetic, cache writes),
- `other`: copies, loops, other library calls (e.g. top-k). A loop counts once: its body
  (the generation steps) is not in the count.

On the GPU each is at least one kernel launch (XLA records them into a CUDA graph); at even a
few microseconds apiece, hundreds of them are a large share of the ~0.8 ms in which a 1B
model's weights can be read. The launcher is `experiments/step_census.py`.
"""

import collections
import datetime
import math
import re

import jax
import jax.numpy as jnp

from statejax import gpu_target, steps
from statejax.model.config import preset
from statejax.model.llama import init_params
from statejax.state import SessionState

KINDS = ("gemm", "pallas", "fusion", "other")
# Entry-computation instructions that launch nothing.
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
              "after-all", "partition-id", "replica-id"}


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
    """{kind: launches} of optimised HLO text (`KINDS`, plus "total")."""
    counts = collections.Counter()
    for line in _entry(hlo_text).splitlines():
        op = re.match(r"\s*(?:ROOT )?\S+ = [^=]*?\s([a-z][\w-]*)\(", line)
        if op and op.group(1) not in _NO_LAUNCH:
            counts[_kind(line)] += 1
    total = sum(counts.values())
    return {kind: counts[kind] for kind in KINDS} | {"total": total}


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


def _entry(hlo_text: str) -> str:
    entry = re.search(r"^ENTRY .*?\n(.*?)^}", hlo_text, re.M | re.S)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry.group(1)


def abstract_query_args(cfg, *, context: int, tokens: int, branch_cells: int,
                        max_new_cap: int):
    """Abstract inputs of `steps.query` for one session row of `context` cells and one branch.

    Returns:
      (args, static) with args as ShapeDtypeStructs: `steps.query(*args, **static)`.
    """
    params = jax.eval_shape(lambda: init_params(cfg))
    cells_shape = (cfg.num_layers, 1, context, cfg.num_kv_heads, cfg.head_dim)
    cells = jax.ShapeDtypeStruct(cells_shape, cfg.jnp_dtype)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    state = SessionState(k=cells, v=cells, lengths=i32(1))
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (params, state, i32(), i32(1, tokens), i32(1), i32(1), i32(),
            jax.ShapeDtypeStruct((), jnp.float32), key, i32())
    static = dict(cfg=cfg, window=context, branch_cells=branch_cells, max_new_cap=max_new_cap)
    return args, static


def run(config) -> dict:
    """Compiles the query step for `config.target` at each (context, impl, max_new_cap) and
    counts its kernels.

    Returns:
      {"rows": [{context, impl, max_new_cap, total, per_layer, gemm, pallas, fusion, other,
       large_copies}], "target", "model", "dtype", "tokens", "layers", "jax_version", "date"}.
      `large_copies`: see `large_copies`.
    """
    cfg = preset(config.model, dtype=config.dtype)
    device = gpu_target.target_device(config.target)
    rows = []
    for context in config.contexts:
        for cap in config.max_new_caps:
            args, static = abstract_query_args(cfg, context=context, tokens=config.tokens,
                                               branch_cells=config.branch_cells,
                                               max_new_cap=cap)
            for impl in config.impls:
                text = gpu_target.compile_for(steps.query, device, *args, **static,
                                              impl=impl).as_text()
                kinds = kernel_kinds(text)
                rows.append(dict(context=context, impl=impl, max_new_cap=cap,
                                 per_layer=kinds["total"] / cfg.num_layers,
                                 large_copies=large_copies(text, cfg), **kinds))
    return dict(target=f"{device.device_kind} (compile-only, no autotuning)",
                model=config.model, dtype=config.dtype, tokens=config.tokens,
                layers=cfg.num_layers, jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                rows=rows)


def results_markdown(results: dict) -> str:
    """A markdown table: one row per (context, impl)."""
    lines = [
        f"# Kernels per query step: {results['model']} ({results['dtype']}), "
        f"{results['tokens']}-token question, batch 1", "",
        f"- target: {results['target']}; jax {results['jax_version']}; {results['date']}",
        f"- {results['layers']} layers; the step is `steps.query` (question as a branch, then "
        "up to max_new_cap tokens; 1 = first token only, no generation loop), compiled at "
        "abstract inputs", "",
        "| context | impl | max_new_cap | kernels | per layer | gemm | pallas | fusion | other "
        "| large copies |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['context']} | {r['impl']} | {r['max_new_cap']} | {r['total']} | "
                     f"{r['per_layer']:.1f} | {r['gemm']} | {r['pallas']} | {r['fusion']} | "
                     f"{r['other']} | {r['large_copies']} |")
    return "\n".join(lines) + "\n"
