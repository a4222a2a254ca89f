"""Kernel time of a compiled step from a profiler trace (`statejax.perf.device_trace`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.profiler import ProfileData

from statejax.perf import device_trace

# Two calls of a step on a GPU, as CUPTI records them (event name = the kernel, stat hlo_op =
# the HLO instruction), a derived "XLA Ops" line over the same time and a host plane whose
# XLA-op events must not count beside them.
_GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 1
    name: "Stream #7(Compute)"
    timestamp_ns: 1000
    %s
  }
  lines {
    id: 2
    name: "XLA Ops"
    timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 190000000 stats { metadata_id: 1
      str_value: "derived_span" } }
  }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_bf16bf16_bf16f32" } }
  event_metadata { key: 2 value { id: 2 name: "statejax_paged_flash" } }
  event_metadata { key: 3 value { id: 3 name: "loop_add_fusion" } }
  event_metadata { key: 4 value { id: 4 name: "MemcpyD2D" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
planes {
  id: 2
  name: "/host:CPU"
  lines {
    id: 1
    name: "python"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 99000000 stats { metadata_id: 1
      str_value: "host_op" } }
  }
  event_metadata { key: 1 value { id: 1 name: "host_op" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""
# (kernel metadata id, hlo_op, start us, duration us) per call; the second call 100 us later.
_CALL = [(1, "gemm_fusion.1", 0, 40), (2, "pallas_call.2", 41, 10), (3, "add.3", 52, 2),
         (2, "pallas_call.4", 55, 10), (1, "gemm_fusion.1", 66, 20), (4, "copy.5", 87, 3)]


def _gpu_profile() -> ProfileData:
    events = []
    for call in range(2):
        for meta, op, start, dur in _CALL:
            events.append(f'events {{ metadata_id: {meta} offset_ps: {(start + 100 * call) * 10**6}'
                          f' duration_ps: {dur * 10**6} stats {{ metadata_id: 1 str_value: '
                          f'"{op}" }} }}')
    return ProfileData.from_text_proto(_GPU_TRACE % "\n    ".join(events))


def test_gpu_kernels_are_summed_per_call_by_kind_and_op():
    events = device_trace.kernel_events(_gpu_profile())
    assert len(events) == 12  # the device plane only
    b = device_trace.breakdown(events, calls=2, top=3)
    assert b["kernels"] == 6 and b["kernel_ms"] == pytest.approx(0.085)
    assert b["busy_ms"] == pytest.approx(0.085)  # one stream: nothing overlaps
    assert b["span_ms"] == pytest.approx(0.190 / 2)  # first start to last end, per call
    assert b["by_kind"] == {
        "pallas": {"kernels": 2, "ms": pytest.approx(0.020)},
        "gemm": {"kernels": 2, "ms": pytest.approx(0.060)},
        "copy": {"kernels": 1, "ms": pytest.approx(0.003)},
        "other": {"kernels": 1, "ms": pytest.approx(0.002)}}
    # Ops ranked by time per call; the two launches of gemm_fusion.1 are one op.
    assert [(t["op"], t["kind"], t["kernels"]) for t in b["top"]] == [
        ("gemm_fusion.1", "gemm", 2), ("pallas_call.2", "pallas", 1),
        ("pallas_call.4", "pallas", 1)]
    assert b["top"][0]["ms"] == pytest.approx(0.060)
    assert b["top"][0]["us_each"] == pytest.approx(30)
    # By kernel name: the two Pallas launches (two HLO ops) are one kernel.
    assert [(t["kernel"], t["kind"], t["kernels"]) for t in b["top_kernels"]] == [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm", 2), ("statejax_paged_flash", "pallas", 2),
        ("MemcpyD2D", "copy", 1)]
    assert b["top_kernels"][1]["ms"] == pytest.approx(0.020)
    assert b["top_kernels"][1]["us_each"] == pytest.approx(10)


def test_kernels_inside_a_cuda_graph_are_told_apart_by_name():
    """Inside a CUDA graph every kernel's HLO op is the graph's; names, without XLA's
    numeric suffixes, group them by kind of kernel across layers."""
    ev = lambda name, start, dur: device_trace.KernelEvent(  # noqa: E731
        name, "command_buffer_1", start, dur)
    events = [ev("loop_add_fusion_3", 0, 2000), ev("gemm_fusion_dot.4", 2000, 9000),
              ev("loop_add_fusion_12", 11000, 4000), ev("input_reduce_fusion", 15000, 1000)]
    b = device_trace.breakdown(events, calls=1)
    assert [(t["op"], t["kernels"]) for t in b["top"]] == [("command_buffer_1", 1),
                                                           ("command_buffer_1", 3)]
    assert [(t["kernel"], t["kernels"], t["us_each"]) for t in b["top_kernels"]] == [
        ("gemm_fusion_dot", 1, pytest.approx(9)), ("loop_add_fusion", 2, pytest.approx(3)),
        ("input_reduce_fusion", 1, pytest.approx(1))]
    assert device_trace.kernel_family("gemm_fusion_dot_2.1") == "gemm_fusion_dot"
    assert device_trace.kernel_family("sm90_xmma_gemm") == "sm90_xmma_gemm"


def test_enclosing_events_do_not_count_twice():
    ev = lambda start, dur, op: device_trace.KernelEvent(op, op, start, dur)  # noqa: E731
    # A loop op around its body's two ops, then an op after it, on one line.
    line = [ev(0, 100, "while"), ev(0, 40, "a"), ev(50, 30, "b"), ev(120, 5, "c")]
    assert [e.hlo_op for e in device_trace._leaves(line)] == ["a", "b", "c"]
    assert device_trace._leaves([]) == []


def test_kernels_overlapping_their_successor_all_count():
    """On Hopper a kernel may start before the one ahead of it ends (programmatic dependent
    launch): overlapping is not enclosing, every kernel counts, busy time once."""
    ev = lambda start, dur, op: device_trace.KernelEvent(op, op, start, dur)  # noqa: E731
    line = [ev(0, 40_000, "gemm.1"), ev(39_000, 10_000, "add.2"), ev(48_500, 5_000, "gemm.3"),
            ev(53_000, 2_000, "add.4")]
    assert [e.hlo_op for e in device_trace._leaves(line)] == [
        "gemm.1", "add.2", "gemm.3", "add.4"]
    b = device_trace.breakdown(device_trace._leaves(line), calls=1)
    assert b["kernels"] == 4 and b["kernel_ms"] == pytest.approx(0.057)
    assert b["busy_ms"] == pytest.approx(0.055)  # [0, 55) us


def test_overlapping_kernels_are_busy_time_once():
    """Ops on several threads (a CPU) or kernels on several streams overlap: their sum can
    exceed the step; the busy time counts each instant once."""
    ev = lambda start, dur: device_trace.KernelEvent("k", "op", start, dur)  # noqa: E731
    events = [ev(0, 40_000), ev(10_000, 20_000), ev(35_000, 15_000), ev(70_000, 10_000)]
    b = device_trace.breakdown(events, calls=1)
    assert b["kernel_ms"] == pytest.approx(0.085)
    assert b["busy_ms"] == pytest.approx(0.060)  # [0, 50) and [70, 80) us


def test_a_cpu_trace_counts_the_ops_of_every_call():
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum(axis=0) * 2.0)
    x = jnp.ones((128, 128))
    b = device_trace.kernel_breakdown(f, (x,), calls=3)
    assert b["kernels"] >= 1 and b["kernels"] == int(b["kernels"])  # the same ops each call
    assert 0 < b["kernel_ms"] and sum(v["kernels"] for v in b["by_kind"].values()) == (
        b["kernels"])


def test_breakdown_of_nothing_and_bad_calls():
    assert device_trace.breakdown([], calls=1)["kernels"] == 0
    with pytest.raises(ValueError, match="calls=0"):
        device_trace.breakdown([], calls=0)


# Two lone calls as the host planes record them (µs): the caller's thread ("main") nests
# jax's dispatch and a wait inside each call's `LONE_CALL` window; two threads of one pool
# run the completion; an event outside the windows must not count; a device plane holds a
# kernel per call and one between the calls.
_HOST_EVENTS = {  # thread: [(name, start, duration)]
    "main": [("statejax_lone_call", 0, 100), ("PjitFunction(step)", 5, 40),
             ("ParseArguments", 6, 4), ("PjitFunction(step)", 12, 20), ("Execute", 14, 10),
             ("$numpy asarray", 50, 45), ("command_buffer::execute", 16, 2),
             ("statejax_lone_call", 200, 100), ("PjitFunction(step)", 205, 40),
             ("ParseArguments", 206, 4), ("PjitFunction(step)", 212, 20), ("Execute", 214, 10),
             ("$numpy asarray", 250, 45),
             ("between calls", 150, 20)],
    "pool/81": [("completion", 96, 3)],
    "pool/-82": [("completion", 296, 3)],
    "Steps": [("step", 0, 300)],  # a derived timeline, not a thread: never counted
}
_DEVICE_KERNELS = [(60, 30), (170, 10), (260, 30)]  # (start, duration) µs


def _lone_calls_profile() -> ProfileData:
    names = sorted({n for events in _HOST_EVENTS.values() for n, _, _ in events})
    meta = {n: i + 1 for i, n in enumerate(names)}
    lines = []
    for i, (thread, events) in enumerate(_HOST_EVENTS.items()):
        body = " ".join(f"events {{ metadata_id: {meta[n]} offset_ps: {s * 10**6} "
                        f"duration_ps: {d * 10**6} }}" for n, s, d in events)
        lines.append(f'lines {{ id: {i + 1} name: "{thread}" {body} }}')
    host_meta = " ".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
                         for n, i in meta.items())
    kernels = " ".join(f"events {{ metadata_id: 1 offset_ps: {s * 10**6} duration_ps: "
                       f"{d * 10**6} }}" for s, d in _DEVICE_KERNELS)
    return ProfileData.from_text_proto(f"""
planes {{ id: 1 name: "/host:CPU" {" ".join(lines)} {host_meta} }}
planes {{ id: 2 name: "/device:GPU:0" lines {{ id: 1 name: "Stream #7(Compute)" {kernels} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "gemm_fusion" }} }} }}
""")


def test_host_events_carry_their_self_time():
    events = device_trace.host_events(_lone_calls_profile())
    first = {(e.name, e.start_ns / 1e3): e for e in events if e.thread == "main"}
    # The outer dispatch: 40 µs less what it encloses directly (4 + 20).
    outer = first[("PjitFunction(step)", 5)]
    assert outer.self_ns == pytest.approx(16e3) and outer.outermost
    inner = first[("PjitFunction(step)", 12)]
    assert inner.self_ns == pytest.approx(10e3) and not inner.outermost
    # The window encloses everything of its call: 100 - 40 - 45.
    assert first[("statejax_lone_call", 0)].self_ns == pytest.approx(15e3)
    assert not any(e.thread.startswith("/device") for e in events)  # host planes only
    assert not any(e.thread == "Steps" for e in events)


def test_lone_calls_break_down_by_thread_and_event():
    profile = _lone_calls_profile()
    b = device_trace.lone_call_breakdown(device_trace.host_events(profile),
                                         device_trace.kernel_events(profile))
    assert b["calls"] == 2 and b["call_ms"] == pytest.approx(0.1)
    assert b["kernel_busy_ms"] == pytest.approx(0.03)  # not the kernel between the calls
    # The pool's two threads as one; the event between the calls in no thread's time.
    assert b["threads"] == pytest.approx({"main": 0.085, "pool": 0.003})
    assert list(b["threads"]) == ["main", "pool"]
    rows = {(t["thread"], t["event"]): t for t in b["top"]}
    assert ("main", "between calls") not in rows and ("main", "statejax_lone_call") not in rows
    assert rows[("main", "$numpy asarray")] == pytest.approx(
        dict(thread="main", event="$numpy asarray", count=1, self_ms=0.045, ms=0.045))
    dispatch = rows[("main", "PjitFunction(step)")]
    # Two nested events per call; the inner one's time counts once in "ms".
    assert (dispatch["count"], dispatch["self_ms"], dispatch["ms"]) == pytest.approx(
        (2, 0.026, 0.040))
    assert [t["event"] for t in b["top"]][0] == "$numpy asarray"  # most self time first
    # The first call replayed a CUDA graph, the second did not.
    assert b["graph_events"] == {"command_buffer::execute": 0.5}
    assert len(device_trace.lone_call_breakdown(device_trace.host_events(profile), [],
                                                top=2)["top"]) == 2
    with pytest.raises(ValueError, match="statejax_lone_call"):
        device_trace.lone_call_breakdown([], [])


def test_a_cpu_trace_of_lone_calls_finds_the_dispatch():
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum(axis=0) * 2.0)
    x = jnp.ones((128, 128))
    b = device_trace.trace_lone_calls(lambda: np.asarray(f(x)), calls=3)
    assert b["calls"] == 3 and b["source"] == "host"
    assert 0 < b["kernel_busy_ms"] and 0 < b["call_ms"]
    dispatch = [t for t in b["top"] if t["event"].startswith("PjitFunction")]
    assert dispatch and dispatch[0]["count"] >= 1 and dispatch[0]["ms"] < 10 * b["call_ms"]
    # The calling thread's self time fits in the calls' windows (the mean: one call slowed by
    # a busy machine moves the median less than the per-call average).
    caller = dispatch[0]["thread"]
    assert 0 < b["threads"][caller] <= 1.5 * b["call_ms_mean"]
