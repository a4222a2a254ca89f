"""Query latency vs accumulated context: stateful session vs request-driven baselines (paper 1).

One stream of synthetic OHLCV bars grows a session (frozen system prompt, then data batches of
`bars_per_update` bars) through `config.context_sizes`. At each size the same question
(~32 tokens, next-token logits: `max_new_tokens=1`) is timed on four paths:

- stateful: `Session.query` on the grown session: no re-prefill; its |q| tokens attend to all
  n cells (O(|q| * n) reads), every other part of the step is O(|q|);
- stateless: `StatelessEngine` re-prefills the whole history, then the question, O(n);
- prefix-cache: `PrefixCacheEngine` whose previous prompt is the context before the latest
  data batch; it reuses that prompt's full pages and recomputes the tail plus the question;
- flash hit: `StreamingSession.ask` of a registered question, answered from the cache.

Timings are wall clock with `jax.block_until_ready`, the median of `repeats` runs after
`warmup` runs of the identical call, so every shape is compiled before it is timed.
On a GPU each row also gets the query's memory floor (`floor_note` says why a CPU gets none).
The targets are checked only at the shapes they were set for (`config.targets_set_for`).
Importable from notebooks; `experiments/stream_latency.py` is the launcher.
"""

import datetime
import json
import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from statejax import platform
from statejax.budget import Budget
from statejax.data.market import format_bar, iter_synthetic_bars
from statejax.errors import InputError
from statejax.model.config import preset
from statejax.model.layouts import lay_out
from statejax.model.llama import init_params
from statejax.perf import roofline
from statejax.serving.session import Session
from statejax.serving.streaming import StreamingSession
from statejax.steps import generates
from statejax.studies import flash_study
from statejax.studies.baselines import PrefixCacheEngine, StatelessEngine
from statejax.tokenizer import ByteTokenizer

# Columns of the table and lines of the plot: (row key, label).
PATHS = (("stateful_query_ms", "stateful"), ("stateless_query_ms", "stateless"),
         ("prefix_cache_query_ms", "prefix-cache"), ("flash_hit_ms", "flash hit"))

CPU_FLOOR_NOTE = (
    "no floor on a CPU: its caches keep weights and cells between repeated queries, so a query "
    "reads them faster than the large copy that measures the bandwidth, and a floor a "
    "measurement beats is no lower bound")


def floor_note() -> str | None:
    """None where the query's floor is a lower bound (a GPU: the weights stream from device
    memory on every query), else why no floor is reported."""
    return None if jax.default_backend() == "gpu" else CPU_FLOOR_NOTE


def targets_note(config) -> str | None:
    """None when the targets were set for `config.variant`'s shape, else the line the report
    prints instead of PASS / FAIL."""
    allowed = tuple(config.get("targets_set_for", ()))
    if config.variant in allowed:
        return None
    shapes = (", ".join(allowed[:-1]) + " and " if len(allowed) > 1 else "") + "".join(
        allowed[-1:])
    return (f"targets set for the {shapes or 'no'} shapes; not checked at the "
            f"{config.variant} shape: ratios only")


def budget_from_config(config) -> Budget:
    """The one boundary from `config.budget` (a ConfigDict) to the typed `Budget`."""
    b = config.budget
    return Budget(cells=b.cells, page_size=b.page_size, chunk_sizes=tuple(b.chunk_sizes),
                  windows=tuple(b.windows) or None, question_cells=b.question_cells,
                  max_new_tokens=b.max_new_tokens)


def _median_ms(fn, *, warmup: int, repeats: int, setup=None) -> float:
    """Median wall-clock ms of `fn()` (blocked until ready); `setup()` runs untimed before."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            jax.block_until_ready(setup())
        start = time.perf_counter()
        jax.block_until_ready(fn())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def _data_batches(tokenizer, bars_per_update: int, seed: int):
    """Yields (text, [N] int32 ids) of `bars_per_update` consecutive bars, forever."""
    bars = iter_synthetic_bars(seed=seed)
    while True:
        text = "".join(format_bar(next(bars)) for _ in range(bars_per_update))
        yield text, tokenizer.encode(text)


def model_summary(cfg) -> dict:
    """Shape and sizes of a `ModelConfig`, for results."""
    return {"preset": cfg.name, "dtype": cfg.dtype, "layers": cfg.num_layers,
            "width": cfg.embed_dim, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "mlp_dim": cfg.mlp_dim, "vocab": cfg.vocab_size,
            "params": cfg.num_params, "weight_bytes": cfg.weight_bytes,
            "kv_bytes_per_token": cfg.kv_bytes_per_token}


def run_stream_latency(config, on_progress=None) -> dict:
    """Runs the study described in the module docstring.

    Args:
      config: a ConfigDict from `configs/stream_latency.py`.
      on_progress: called with the results so far (`complete` False) after each context
        size, so a run cut short (a device call's time limit) keeps what it measured.

    Returns:
      {"rows": one dict per context size, "complete", "device", "host_cpus", "jax_version",
       "model", "date", "tokens_per_bar", "question_tokens", "runtime_s", "targets",
       "config"}. Row keys: target_tokens, context_tokens (the last batch boundary <= target),
      bars, the four `PATHS` latencies in ms, append_ms (one data batch), ingest_ms_per_bar,
      prefix_cache_reused_tokens, same_first_token (the paths agree), flash_refresh_ms
      (idle-time re-evaluation of the flash query, off the critical path), flash_items_behind;
      where `floor_note()` is None (a GPU), floor_ms (weights + K/V read once at the copy
      bandwidth measured in this run, before the contexts) and stateful_over_floor; with
      `config.roofline.peer_json`, also hf_kept_cache_ms (the HF peer's kept-cache query at
      the same target, read from its JSON) and hf_over_stateful. Results also hold
      "copy_bytes_per_s" (None without a floor), "floor_note", "targets_checked" and
      "targets_note".
    """
    start = time.perf_counter()
    cfg = preset(config.model, dtype=config.dtype)
    rc = config.roofline
    no_floor = floor_note()
    copy_bytes_per_s = None if no_floor else roofline.copy_bandwidth(
        rc.copy_mib, warmup=config.warmup, repeats=config.repeats)
    unchecked = targets_note(config)
    peer = load_peer(rc.peer_json) if rc.peer_json else None
    params = init_params(cfg, seed=config.seed)
    budget, tokenizer = budget_from_config(config), ByteTokenizer()
    question_tokens = int(tokenizer.encode(config.question).size)
    # Stacked or packed weights pass fewer argument buffers per call; with XLA's linear
    # layers they run first-token queries only (`model.layouts`, `steps.generates`).
    layout = config.get("weights_layout", "per_layer")
    kernels = dict(impl=config.impl, linear_impl=config.get("linear_impl", "xla"))
    laid_out = lay_out(params, layout)
    if config.flash_max_new_tokens > 1 and not generates(laid_out, kernels["linear_impl"]):
        raise ValueError(f"weights_layout={layout!r} with linear_impl="
                         f"{kernels['linear_impl']!r} runs first-token queries only; "
                         f"flash_max_new_tokens={config.flash_max_new_tokens} would generate")
    session = Session(laid_out, cfg, budget, tokenizer,
                      prefix=config.system_prompt, **kernels)
    # `baselines=False` (the GPU floor run) times only the stateful paths (and the floor).
    engines = (StatelessEngine(params, cfg, budget, tokenizer, **kernels),
               PrefixCacheEngine(params, cfg, budget, tokenizer, **kernels)
               ) if config.get("baselines", True) else (None, None)
    stream = StreamingSession(session)
    batches = _data_batches(tokenizer, config.bars_per_update, config.seed)
    rows, bars, data_tokens = [], 0, 0

    def results(complete: bool) -> dict:
        device = jax.devices()[0]
        return {
            "rows": list(rows),
            "complete": complete,
            "copy_bytes_per_s": copy_bytes_per_s,
            "copy_mib": None if no_floor else rc.copy_mib,
            "floor_note": no_floor,
            "peer": None if peer is None else {k: v for k, v in peer.items() if k != "rows"},
            "device": f"{device.device_kind} ({device.platform})",
            "host_cpus": os.cpu_count(),
            "jax_version": jax.__version__,
            "model": model_summary(cfg),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "tokens_per_bar": data_tokens / bars,
            "question_tokens": question_tokens,
            "runtime_s": time.perf_counter() - start,
            "targets": check_targets(rows, floor_bound=rc.floor_bound,
                                     peer_bound=rc.peer_bound, checked=unchecked is None),
            "targets_checked": unchecked is None,
            "targets_note": unchecked,
            "tuned_tiles": tuned_tiles(config.impl),
            "config": config.to_dict(),
        }

    try:
        stream.register(config.question, config.flash_max_new_tokens)
        pending = next(batches)
        for target in config.context_sizes:
            # Grow to the last batch boundary <= target; flash work waits (it is timed later).
            with stream.flash_paused():
                last, length = None, session.length
                while length + pending[1].size <= target:
                    stream.push(pending[0])
                    last, length = pending[1], length + pending[1].size
                    bars, data_tokens = bars + config.bars_per_update, data_tokens + last.size
                    pending = next(batches)
                if last is None:
                    raise InputError(f"context size {target} leaves no room for a data batch of "
                                     f"{pending[1].size} tokens after {length} tokens")
                stream.flush()
                row = _measure_paths(config, session, *engines, last)
            # Leaving the pause lets the worker re-evaluate the flash query (idle-time work).
            row.update(_measure_flash(config, stream))
            rows.append(_with_floor_and_peer({"target_tokens": int(target), "bars": bars, **row},
                                             cfg, question_tokens, copy_bytes_per_s, peer))
            if on_progress is not None and len(rows) < len(config.context_sizes):
                on_progress(results(complete=False))
    finally:
        stream.close()
    return results(complete=True)


def _with_floor_and_peer(row, cfg, question_tokens, copy_bytes_per_s, peer) -> dict:
    """`row` with its floor (unless `copy_bytes_per_s` is None) and the peer's time at its
    target (if measured) added."""
    if copy_bytes_per_s is not None:
        row["floor_ms"] = roofline.query_floor_ms(cfg, row["context_tokens"], question_tokens,
                                                  copy_bytes_per_s)
        row["stateful_over_floor"] = row["stateful_query_ms"] / row["floor_ms"]
    if peer is not None and row["target_tokens"] in peer["rows"]:
        # The peer runs at the target N itself; the session holds the whole bars that fit in
        # it (fewer tokens, e.g. 884 of 1024): the peer is timed at the larger context.
        row["hf_context_tokens"] = row["target_tokens"]
        row["hf_kept_cache_ms"] = peer["rows"][row["target_tokens"]]
        row["hf_over_stateful"] = row["hf_kept_cache_ms"] / row["stateful_query_ms"]
    return row


def tuned_tiles(impl: str) -> list[dict]:
    """The measured tiles the kernels read on the GPU model compiled for
    (`statejax.kernels.tuned`): which tiles a Pallas run's numbers came from. Empty for the
    reference attention or when no GPU is compiled for (interpret mode)."""
    device_kind = platform.device_kind()
    if impl == "reference" or device_kind is None:
        return []
    from statejax.kernels import tuned  # noqa: PLC0415 - the reference path needs no kernels

    keep = ("kernel", "shape", "window", "block_sizes", "ms", "source")
    return [{k: e.get(k) for k in keep} | {"backend": tuned.backend_of(e)}
            for e in tuned.entries(device_kind)]


def _measure_paths(config, session, stateless, prefix_cache, last) -> dict:
    """Times ingest and the three query paths at the session's current context.

    `last`: [N] ids of the latest data batch; `stateless` / `prefix_cache` None skip those
    baselines. Drives the session directly, so the streaming worker must be idle (flushed,
    flash evaluation paused).
    """
    timing = {"warmup": config.warmup, "repeats": config.repeats}
    question, n = config.question, session.length
    history = session.tokens
    before = history[:n - last.size]  # the previous prompt of the prefix-cache baseline
    row = {"context_tokens": n}
    # Ingest: rewind over the latest batch (metadata only) and append it again.
    row["append_ms"] = _median_ms(lambda: session.append(last),
                                  setup=lambda: session.truncate(before.size), **timing)
    row["ingest_ms_per_bar"] = row["append_ms"] / config.bars_per_update
    row["stateful_query_ms"] = _median_ms(lambda: session.query(question, 1), **timing)
    if stateless is None:
        return row
    row["stateless_query_ms"] = _median_ms(lambda: stateless.query(history, question, 1),
                                           **timing)
    row["prefix_cache_query_ms"] = _median_ms(
        lambda: prefix_cache.query(history, question, 1),
        setup=lambda: (prefix_cache.load(before), prefix_cache.session.state), **timing)
    row["prefix_cache_reused_tokens"] = prefix_cache.last_reused_tokens
    answers = (session.query(question, 1), stateless.query(history, question, 1),
               prefix_cache.query(history, question, 1))
    row["same_first_token"] = len({a.tokens[:1].tobytes() for a in answers}) == 1
    return row


def _measure_flash(config, stream) -> dict:
    """Waits for the flash re-evaluation (timed: off the critical path), then times `ask`."""
    start = time.perf_counter()
    stream.flush()
    refresh_ms = (time.perf_counter() - start) * 1e3
    hit = stream.ask(config.question)
    if not hit.hit:
        raise RuntimeError(f"the registered flash query missed: {hit}")
    return {"flash_refresh_ms": refresh_ms, "flash_items_behind": hit.items_behind,
            "flash_hit_ms": _median_ms(lambda: stream.ask(config.question),
                                       warmup=config.warmup, repeats=config.repeats)}


# ---------------------------------------------------------------------------- targets, report

def load_peer(path: str) -> dict:
    """The HF transformers peer's JSON (docs/gpu.md: how the device script writes it): its
    metadata, and "rows" as {context tokens N: kept-cache 32-token query ms}."""
    with open(path) as f:
        peer = json.load(f)
    try:
        rows = {int(r["N"]): float(r["hf_cache_append_ms"]) for r in peer["rows"]}
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path} is not an hf_peer.json (rows of N, hf_cache_append_ms): "
                         f"{e!r}") from e
    return {**peer, "rows": rows}


def check_targets(rows, *, floor_bound: float | None = None,
                  peer_bound: float | None = None, checked: bool = True) -> list[dict]:
    """The study's targets from the smallest and largest context rows.

    - stateful latency stays within 2x from the smallest to the largest context;
    - stateless latency grows more than 10x over the same range;
    - at the largest context stateless is at least 10x slower than stateful;
    - with `floor_bound` and rows holding a floor (GPU): stateful within that factor of the
      floor at every context;
    - with `peer_bound` (GPU, rows holding the peer): the HF kept-cache path at least that
      many times slower than stateful at every context it measured.

    Args:
      rows: the study's rows, smallest context first.
      floor_bound, peer_bound: the optional targets' bounds (None: not a target).
      checked: False at a shape the targets were not set for: each entry's "passed" is None.

    Returns:
      one {"name", "value", "op", "bound", "passed"} per target.
    """
    lo, hi = rows[0], rows[-1]
    checks = []
    if len(rows) > 1:  # a growth needs two contexts (a partial run may have one)
        checks.append(("stateful largest / smallest",
                       hi["stateful_query_ms"] / lo["stateful_query_ms"], "<=", 2.0))
    if len(rows) > 1 and "stateless_query_ms" in hi:  # absent when the baselines were skipped
        checks += [
            ("stateless largest / smallest",
             hi["stateless_query_ms"] / lo["stateless_query_ms"], ">", 10.0),
            ("stateless / stateful at largest",
             hi["stateless_query_ms"] / hi["stateful_query_ms"], ">=", 10.0),
        ]
    if floor_bound is not None and rows and all("stateful_over_floor" in r for r in rows):
        checks.append(("stateful / floor, worst context",
                       max(r["stateful_over_floor"] for r in rows), "<=", floor_bound))
    with_peer = [r for r in rows if "hf_over_stateful" in r]
    if peer_bound is not None and with_peer:
        checks.append(("HF kept-cache / stateful, worst context",
                       min(r["hf_over_stateful"] for r in with_peer), ">=", peer_bound))
    passes = {"<=": lambda v, b: v <= b, ">": lambda v, b: v > b, ">=": lambda v, b: v >= b}
    return [{"name": name, "value": value, "op": op, "bound": bound,
             "passed": bool(passes[op](value, bound)) if checked else None}
            for name, value, op, bound in checks]


def _layout_note(config: dict) -> str:
    # Results written before layouts had a `stack_layers` flag.
    layout = config.get("weights_layout", "stacked" if config.get("stack_layers") else
                        "per_layer")
    return layout.replace("_", " ")


def results_markdown(results: dict) -> str:
    """A markdown report: setup, one table row per context size, the targets."""
    m = results["model"]
    lines = [
        "# Query latency vs accumulated context",
        "",
        f"- device: {results['device']}, {results['host_cpus']} host CPUs, "
        f"jax {results['jax_version']}, {results['date']}",
        f"- attention impl `{results['config'].get('impl', 'reference')}`"
        f"{_tiles_note(results)}; linear layers "
        f"`{results['config'].get('linear_impl', 'xla')}`; weights "
        f"{_layout_note(results['config'])}; "
        f"model `{m['preset']}` ({m['dtype']}, "
        f"random weights): {m['layers']} layers, width "
        f"{m['width']}, {m['heads']} heads, {m['kv_heads']} kv heads, head dim {m['head_dim']}, "
        f"MLP {m['mlp_dim']}, vocab {m['vocab']}; {m['params'] / 1e6:.1f}M params, "
        f"{m['weight_bytes'] / 1e6:.1f} MB weights, {m['kv_bytes_per_token'] / 1024:.1f} KiB KV "
        "per token",
        f"- query: {results['question_tokens']} question tokens, next-token logits; "
        f"{results['tokens_per_bar']:.1f} tokens per bar, "
        f"{results['config']['bars_per_update']} bars per update; median of "
        f"{results['config']['repeats']} after {results['config']['warmup']} warm-up(s); "
        f"run took {results['runtime_s']:.0f} s",
        "",
    ]
    if not results.get("complete", True):  # written after each context: the run went on
        lines[-1:-1] = [f"- **partial**: {len(results['rows'])} of "
                        f"{len(results['config']['context_sizes'])} context sizes (the run "
                        "did not finish; targets over these rows)"]
    # None on a CPU; absent in results written before the floor.
    floor = results.get("copy_bytes_per_s") is not None
    if floor:
        lines[-1:-1] = [
            f"- floor = (weights + K/V of context and question) read once at the copy "
            f"bandwidth measured in this run: {results['copy_bytes_per_s'] / 1e9:.1f} GB/s "
            f"(read + write of {results['copy_mib']} MiB)"]
    elif results.get("floor_note"):
        lines[-1:-1] = [f"- {results['floor_note']}"]
    peer = any("hf_kept_cache_ms" in r for r in results["rows"])
    if peer:
        p = results["peer"]
        lines[-1:-1] = [f"- HF peer (same run): torch {p.get('torch')}, {p.get('device')}; "
                        "kept-cache = its DynamicCache path for the same 32-token query, at "
                        "its context N (shown as @N: the target context, which the session's "
                        "whole bars fill up to the row's context tokens)"]
    extra = (["floor ms", "stateful / floor"] if floor else []) + (
        ["HF kept-cache ms", "HF / stateful"] if peer else [])
    header = ["context tokens", *(f"{label} ms" for _, label in PATHS), "append ms/bar",
              "prefix reused tokens", *extra]
    lines += ["| " + " | ".join(header) + " |", "|---:" * len(header) + "|"]
    for r in results["rows"]:
        cells = [str(r["context_tokens"])] + [_ms(r[key]) if key in r else "–"
                                              for key, _ in PATHS]
        cells += [_ms(r["ingest_ms_per_bar"]), str(r.get("prefix_cache_reused_tokens", "–"))]
        if floor:
            cells += [_ms(r["floor_ms"]), f"{r['stateful_over_floor']:.2f}x"]
        if peer:
            at = f" @{r['hf_context_tokens']}" if "hf_context_tokens" in r else ""
            cells += ([_ms(r["hf_kept_cache_ms"]) + at, f"{r['hf_over_stateful']:.1f}x"]
                      if "hf_kept_cache_ms" in r else ["", ""])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    if results.get("targets_note"):
        lines += [f"({results['targets_note']})", ""]
    lines += ["| target | measured | bound | result |", "|---|---:|---|---|"]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "not checked"}[t["passed"]]
        lines.append(f"| {t['name']} | {t['value']:.2f}x | {t['op']} {t['bound']:g}x | "
                     f"{verdict} |")
    if "flash" in results:  # the launcher adds the flash-query study when enabled
        lines += ["", flash_study.flash_markdown(results["flash"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _tiles_note(results: dict) -> str:
    if results["config"].get("impl", "reference") == "reference":
        return ""
    entries = results.get("tuned_tiles") or []
    if not entries:
        return " (kernel tiles: the shape rules)"
    return (f" (kernel tiles: {len(entries)} measured entries of kernels/tuned/ for this GPU, "
            "else the shape rules)")


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.1f}"


def plot_latency(results: dict, ax=None):
    """Draws latency vs context tokens (log-log), one line per path; returns the axes."""
    if ax is None:
        ax = Figure(figsize=(6, 4), layout="constrained").subplots()
    x = [r["context_tokens"] for r in results["rows"]]
    for key, label in PATHS:
        if all(key in r for r in results["rows"]):  # baselines may have been skipped
            ax.plot(x, [r[key] for r in results["rows"]], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="accumulated context (tokens)",
           ylabel="query latency (ms)",
           title=f"{results['model']['preset']} on {results['device']}")
    ax.set_xticks(x, [str(v) for v in x])
    ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide otherwise
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax


def write_results(results: dict, workdir: str) -> dict:
    """Writes results.json, results.md and latency_vs_context.png into `workdir`.

    Returns:
      {"json", "md", "png"}: the paths written.
    """
    os.makedirs(workdir, exist_ok=True)
    paths = {ext: os.path.join(workdir, name) for ext, name in (
        ("json", "results.json"), ("md", "results.md"), ("png", "latency_vs_context.png"))}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(results_markdown(results))
    plot_latency(results).figure.savefig(paths["png"], dpi=120)
    return paths


def load_results(workdir: str) -> dict:
    """Reads results.json from a directory written by `write_results`."""
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)
