"""Where a compiled step's device time goes: its kernels, from a jax profiler trace.

A step time above its memory floor is either kernels running slowly or the device idling
between them (launches, host work). `kernel_breakdown` runs a compiled call a few times under
`jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`) and sums the executed
XLA ops: on a GPU the kernel events of the device planes (CUPTI; each carries the HLO op that
launched it), elsewhere the host's XLA op events (CPU: the ops of the thunk runtime). Set
against the step's untraced time, the kernel sum says how much is idle. Caveat: under the
profiler XLA may launch kernels one by one instead of replaying a CUDA graph, so the traced
span is not the step time; kernel durations are.

A lone call (one waited for before the next) also waits for the host: `trace_lone_calls`
breaks its time down by host thread and event (dispatch, transfers, waits, Python).

Kinds (`KINDS`): `pallas` (statejax's kernels and other Pallas calls), `gemm` (cuBLAS / cuBLASLt
/ XLA GEMM fusions), `copy` (memcpy / memset), `other` (every other fused kernel).
"""

import collections
import dataclasses
import glob
import os
import re
import tempfile

import jax
import numpy as np

KINDS = ("pallas", "gemm", "copy", "other")
# Timelines a profiler may derive from the kernels onto a device plane (op and module spans,
# steps, launch stats): the same time again, so never summed (tsl's xplane_schema names).
DERIVED_LINES = frozenset({"Steps", "TensorFlow Name Scope", "TensorFlow Ops",
                           "Framework Name Scope", "Framework Ops", "XLA Modules", "XLA Ops",
                           "Async XLA Ops", "Launch Stats", "Source code"})
_GEMM_MARKS = ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul", "dot")


@dataclasses.dataclass(frozen=True)
class KernelEvent:
    """One executed kernel (GPU) or XLA op (CPU)."""

    name: str  # the kernel's name (GPU) or the op's (CPU)
    hlo_op: str  # the HLO instruction it ran for ("" if the trace does not say)
    start_ns: float
    duration_ns: float


def kind(event: KernelEvent) -> str:
    """The `KINDS` entry of an event, from its kernel and HLO op names."""
    text = f"{event.name} {event.hlo_op}".lower()
    if any(mark in text for mark in ("statejax", "pallas", "mosaic")):
        return "pallas"
    if "memcpy" in text or "memset" in text:
        return "copy"
    if any(mark in text for mark in _GEMM_MARKS):
        return "gemm"
    return "other"


def kernel_events(profile: jax.profiler.ProfileData) -> list[KernelEvent]:
    """Executed kernels of a trace: device-plane events where the trace has a device plane
    ("/device:..."; its stream lines, not `DERIVED_LINES`), else host events that carry an
    `hlo_op` stat (XLA on CPU). Only leaves:
    an event enclosing later events of its line (a loop or call op around its body's ops, on
    CPU) is dropped, so no time counts twice."""
    device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
    events = []
    for plane in device_planes or profile.planes:
        for line in plane.lines:
            if device_planes and line.name in DERIVED_LINES:
                continue
            line_events = []
            for event in line.events:
                stats = dict(event.stats)
                if device_planes or "hlo_op" in stats:
                    line_events.append(KernelEvent(event.name, str(stats.get("hlo_op", "")),
                                                   event.start_ns, event.duration_ns))
            events += _leaves(line_events)
    return events


def _leaves(events: list[KernelEvent]) -> list[KernelEvent]:
    """Events of one line that enclose no later event (a parent starts first: ties sort the
    longer first). Enclose, not overlap: on Hopper a kernel may start before the one ahead of
    it on its stream ends (programmatic dependent launch), and both are kernels; dropping
    overlapped events lost most of a step's kernels (`docs/results.md`)."""
    ordered = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))

    def encloses(e, nxt):
        return nxt.start_ns + nxt.duration_ns <= e.start_ns + e.duration_ns

    return [e for i, e in enumerate(ordered)
            if i + 1 == len(ordered) or not encloses(e, ordered[i + 1])]


def breakdown(events: list[KernelEvent], calls: int, top: int = 12) -> dict:
    """Per-call totals of `events` recorded over `calls` identical calls.

    Returns:
      {"kernels": launches per call, "kernel_ms": summed durations per call, "busy_ms": time
       with at least one kernel running per call (kernels on several streams, or a CPU's ops
       on several threads, overlap: the sum can exceed the step), "span_ms": first start to
       last end over the calls / calls, "by_kind": {kind: {"kernels", "ms"}},
       "top": the `top` HLO ops by time, [{"op", "kind", "kernels", "ms", "us_each"}],
       "top_kernels": the same by kernel name, numeric suffixes dropped (`kernel_family`),
       [{"kernel", "kind", "kernels", "ms", "us_each"}]: inside a CUDA graph every kernel's
       HLO op is the graph's (`command_buffer_1`), so only the names tell kernels apart}.
    """
    if calls < 1:
        raise ValueError(f"calls={calls}; allowed: >= 1")
    if not events:
        return {"kernels": 0, "kernel_ms": 0.0, "busy_ms": 0.0, "span_ms": 0.0, "by_kind": {},
                "top": [], "top_kernels": []}
    by_kind = {k: {"kernels": 0, "ms": 0.0} for k in KINDS}
    by_op = collections.defaultdict(lambda: [0, 0.0])
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        k = kind(e)
        by_kind[k]["kernels"] += 1
        by_kind[k]["ms"] += e.duration_ns / 1e6
        for totals in (by_op[(e.hlo_op or e.name, k)], by_name[(kernel_family(e.name), k)]):
            totals[0] += 1
            totals[1] += e.duration_ns / 1e6
    for totals in by_kind.values():
        totals["kernels"] /= calls
        totals["ms"] /= calls

    def ranked(groups, key):
        return [{key: name, "kind": k, "kernels": n / calls, "ms": ms / calls,
                 "us_each": 1e3 * ms / n}
                for (name, k), (n, ms) in sorted(groups.items(), key=lambda g: -g[1][1])[:top]]

    start = min(e.start_ns for e in events)
    end = max(e.start_ns + e.duration_ns for e in events)
    return {
        "kernels": len(events) / calls,
        "kernel_ms": sum(e.duration_ns for e in events) / 1e6 / calls,
        "busy_ms": _busy_ns(events) / 1e6 / calls,
        "span_ms": (end - start) / 1e6 / calls,
        "by_kind": by_kind,
        "top": ranked(by_op, "op"),
        "top_kernels": ranked(by_name, "kernel"),
    }


def kernel_family(name: str) -> str:
    """A kernel's name without XLA's numeric suffixes (`loop_add_fusion_12` ->
    `loop_add_fusion`, `gemm_fusion_dot.4` -> `gemm_fusion_dot`): one entry per kind of
    kernel, not one per layer."""
    return re.sub(r"([._]\d+)+$", "", name) or name


def _busy_ns(events: list[KernelEvent]) -> float:
    """Time covered by at least one event: overlapping events count once."""
    busy, covered_to = 0.0, -float("inf")
    for start, end in sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events):
        if end > covered_to:
            busy += end - max(start, covered_to)
            covered_to = end
    return busy


def trace(fn, args, *, calls: int, logdir: str | None = None) -> jax.profiler.ProfileData:
    """Runs `fn(*args)` once untraced (compile, warm up), then `calls` times back to back
    under the profiler; returns the trace."""
    jax.block_until_ready(fn(*args))

    def back_to_back():
        jax.block_until_ready([fn(*args) for _ in range(calls)])
    return _profile(back_to_back, logdir)


def _profile(body, logdir: str | None = None) -> jax.profiler.ProfileData:
    """The trace of `body()` run under `jax.profiler.trace`."""
    logdir = logdir or tempfile.mkdtemp(prefix="statejax_trace_")
    with jax.profiler.trace(logdir):
        body()
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {logdir}")
    return jax.profiler.ProfileData.from_file(paths[-1])


def kernel_breakdown(fn, args, *, calls: int = 5, top: int = 12) -> dict:
    """`breakdown` of `calls` back-to-back calls of `fn(*args)` (a jitted or compiled fn), with
    "source": "device" (kernels of a device plane) or "host" (XLA ops on the host)."""
    profile = trace(fn, args, calls=calls)
    source = "device" if any(p.name.startswith("/device:") for p in profile.planes) else "host"
    return breakdown(kernel_events(profile), calls, top) | {"source": source}


# --- The host side of a lone call ---------------------------------------------------------
# A lone query waits for more than its device work (`docs/results.md`): dispatch, transfers,
# completion events picked up by host threads, Python. The host planes of a trace hold those as
# nested events per thread (jax's dispatch `PjitFunction(...)`, PjRt's execute and transfer
# steps, the runtime's threads; Python frames as "$file:line name" when the profiler traces
# Python), so the events' self time, per thread and name, says where a lone call's time goes.

LONE_CALL = "statejax_lone_call"  # the annotation around each call `lone_call_breakdown` times
# Host events that say how XLA ran its CUDA graphs in the traced calls: replays and updates
# ("command_buffer::execute", "command_buffer::update"), or the graph replaced by its kernels
# launched one by one, which XLA does under a profiler unless
# --xla_enable_command_buffers_during_profiling (then the trace's dispatch is not the
# untraced call's). Counted per call whatever their self time.
GRAPH_MARKS = ("command_buffer::", "CommandBuffer disabled")


@dataclasses.dataclass(frozen=True)
class HostEvent:
    """One event of a host thread, with its time outside its enclosed events (`self_ns`);
    `outermost`: no event of its name encloses it (so its duration counts once)."""

    thread: str
    name: str
    start_ns: float
    duration_ns: float
    self_ns: float
    outermost: bool = True


def host_events(profile: jax.profiler.ProfileData) -> list[HostEvent]:
    """Every event of the trace's host planes ("/host:...", but its metadata), each with its
    self time: its duration minus that of the events it directly encloses on its line (a
    nested event is inside its parent's span; one that outlasts the event before it is not its
    child). Lines are threads; timelines derived from them (`DERIVED_LINES`) are skipped."""
    events = []
    for plane in profile.planes:
        if not plane.name.startswith("/host:") or plane.name == "/host:metadata":
            continue
        for line in plane.lines:
            if line.name in DERIVED_LINES:
                continue
            ordered = sorted(((e.name, e.start_ns, e.duration_ns) for e in line.events),
                             key=lambda e: (e[1], -e[2]))
            self_ns = [duration for _, _, duration in ordered]
            outermost = [True] * len(ordered)
            open_events = []  # indices of the events enclosing the current one, innermost last
            for i, (name, start, duration) in enumerate(ordered):
                while open_events and _end(ordered[open_events[-1]]) < start + duration:
                    open_events.pop()
                if open_events:
                    self_ns[open_events[-1]] -= duration
                outermost[i] = all(ordered[j][0] != name for j in open_events)
                open_events.append(i)
            events += [HostEvent(line.name, name, start, duration, max(own, 0.0), top)
                       for (name, start, duration), own, top
                       in zip(ordered, self_ns, outermost, strict=True)]
    return events


def _end(event: tuple) -> float:
    return event[1] + event[2]


def lone_call_breakdown(host: list[HostEvent], kernels: list[KernelEvent],
                        top: int = 24) -> dict:
    """Where calls marked `LONE_CALL` (each run alone, to its end) spent their time.

    Args:
      host: `host_events` of the trace; its `LONE_CALL` events are the calls' windows.
      kernels: `kernel_events` of the same trace (device kernels on a GPU).
      top: how many (thread, event) rows to keep.

    Returns:
      {"calls": windows found, "call_ms": median window (traced: the profiler's own cost
       included), "call_ms_mean": mean window, "kernel_busy_ms": time per call with a
       kernel running inside the windows
       (kernels placed by their start on the host's clock, on which the profiler puts a
       device plane's events),
       "threads": {thread: self ms per call inside the windows}, most first, threads of one
       pool as one (`thread_family`),
       "top": [{"thread", "event", "count", "self_ms", "ms"}] per call, by self time, "ms"
       the time inside the event (an event inside one of its name counted once): the
       events that start inside a window, but the windows themselves,
       "graph_events": {event: count per call} of the `GRAPH_MARKS` events}.
    """
    windows = sorted((e.start_ns, e.start_ns + e.duration_ns) for e in host
                     if e.name == LONE_CALL)
    if not windows:
        raise ValueError(f"no {LONE_CALL!r} event in the trace: run the calls inside "
                         f"jax.profiler.TraceAnnotation({LONE_CALL!r})")
    calls = len(windows)

    def inside(start):
        return any(lo <= start < hi for lo, hi in windows)

    threads = collections.defaultdict(float)
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for e in host:
        if e.name == LONE_CALL or not inside(e.start_ns):
            continue
        thread = thread_family(e.thread)
        threads[thread] += e.self_ns
        totals = groups[(thread, e.name)]
        totals[0] += 1
        totals[1] += e.self_ns
        totals[2] += e.duration_ns if e.outermost else 0.0
    graph_events = collections.Counter()
    for (_, name), (n, _, _) in groups.items():
        if any(mark in name for mark in GRAPH_MARKS):
            graph_events[name] += n / calls
    ranked = sorted(groups.items(), key=lambda g: -g[1][1])[:top]
    in_windows = [e for e in kernels if inside(e.start_ns)]
    return {
        "calls": calls,
        "call_ms": float(np.median([hi - lo for lo, hi in windows])) / 1e6,
        "call_ms_mean": float(np.mean([hi - lo for lo, hi in windows])) / 1e6,
        "kernel_busy_ms": _busy_ns(in_windows) / 1e6 / calls,
        "threads": {t: ns / 1e6 / calls for t, ns in sorted(threads.items(), key=lambda t: -t[1])},
        "top": [{"thread": thread, "event": name, "count": n / calls, "self_ms": own / 1e6 / calls,
                 "ms": total / 1e6 / calls} for (thread, name), (n, own, total) in ranked],
        "graph_events": dict(sorted(graph_events.items())),
    }


def thread_family(name: str) -> str:
    """A host thread's name without its pool's numeric id (`tf_XLAPjRtCpuClient/6282917`
    -> `tf_XLAPjRtCpuClient`): a pool's threads take turns, so they count as one."""
    return re.sub(r"[/._-]+\d+$", "", name) or name


def trace_lone_calls(call, *, calls: int = 5, top: int = 24) -> dict:
    """`lone_call_breakdown` of `call()` made `calls` times one after another under the
    profiler, each inside a `LONE_CALL` annotation; `call` must wait for its own result
    (e.g. fetch the answer to the host), so a window is the call's whole latency. One
    untraced call first (compile, warm up). Adds "source": "device" or "host" (as
    `kernel_breakdown`)."""
    call()

    def one_at_a_time():
        for _ in range(calls):
            with jax.profiler.TraceAnnotation(LONE_CALL):
                call()
    profile = _profile(one_at_a_time)
    source = "device" if any(p.name.startswith("/device:") for p in profile.planes) else "host"
    return lone_call_breakdown(host_events(profile), kernel_events(profile), top) | {
        "source": source}
