"""A lone query's time split by a step profile's rows (`statejax.perf.lone_query`)."""

import math
import pathlib

import pytest

from statejax.errors import InputError
from statejax.perf import lone_query
from tests import notebook_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
H200 = ROOT / "docs" / "results" / "step_profile_h200_1204" / "call1"


def _results(ms: dict, floor: float = 0.8, kernels=None) -> dict:
    rows = [dict(component=name, ms=value, floor_ms=floor) for name, value in ms.items()]
    out = dict(model="m", dtype="bfloat16", tokens=32, device="d", jax_version="j", date="t",
               rows=rows)
    if kernels:
        out["query_kernels"] = kernels
    return out


QUERY = {"query_step": 1.7, "query_step_dispatch": 0.4, "query_step_sync": 2.2,
         "query_step_host_io": 2.5, "session_query": 2.6}


def test_the_parts_are_the_rows_differences_and_add_up_to_the_query():
    split = dict(lone_query.parts(_results(QUERY)))
    assert list(split) == ["floor", "device call beyond its floor", "dispatch not overlapped",
                           "host transfers", "Python around the call"]
    assert split["floor"] == 0.8
    assert math.isclose(split["device call beyond its floor"], 0.9)
    assert math.isclose(split["dispatch not overlapped"], 0.5)
    assert math.isclose(split["host transfers"], 0.3)
    assert math.isclose(split["Python around the call"], 0.1)
    assert math.isclose(sum(split.values()), 2.6)


def test_a_part_within_the_rows_spread_stays_negative():
    """Medians of separate calls: a part is reported as measured, not clamped to zero."""
    split = dict(lone_query.parts(_results({**QUERY, "session_query": 2.4})))
    assert math.isclose(split["Python around the call"], -0.1)


def test_contexts_are_the_suffixes_with_every_row():
    ms = {**QUERY, **{name + "@32768": value + 1 for name, value in QUERY.items()},
          "query_step[packed]": 1.6, "query_step_sync[packed]": 2.0}  # no host rows
    results = _results(ms)
    assert lone_query.contexts(results) == ["", "@32768"]
    split = dict(lone_query.parts(results, "@32768"))
    assert math.isclose(split["device call beyond its floor"], 1.9)
    assert math.isclose(sum(split.values()), 3.6)
    with pytest.raises(InputError, match=r"no rows \['query_step_host_io\[packed\]', "
                                         r"'session_query\[packed\]'\].*\['', '@32768'\]"):
        lone_query.parts(results, "[packed]")
    md = lone_query.markdown(results)
    assert "## `session_query`: 2.600 ms, 3.25x its floor (target 1.3x: 1.040 ms)" in md
    assert "## `session_query@32768`: 3.600 ms" in md and "[packed]" not in md
    assert "| dispatch not overlapped | 0.500 | 19% |" in md


def test_the_traced_kernels_add_up_to_the_untraced_call():
    kernels = dict(kernels=5, kernel_ms=1.5, busy_ms=1.4, by_kind={
        "gemm": dict(kernels=3, ms=0.9), "pallas": dict(kernels=2, ms=0.6),
        "copy": dict(kernels=0, ms=0.0)})
    split = lone_query.kernel_parts(_results(QUERY, kernels=kernels), 1.7)
    assert [name for name, _ in split] == ["gemm kernels (3)", "pallas kernels (2)",
                                           "kernels overlapping each other",
                                           "no kernel running"]
    assert math.isclose(sum(ms for _, ms in split), 1.7)
    assert math.isclose(dict(split)["no kernel running"], 0.3)
    assert lone_query.kernel_parts(_results(QUERY), 1.7) is None
    md = lone_query.markdown(_results(QUERY, kernels=kernels))
    assert "| kernels overlapping each other | -0.100 |" in md


def test_the_committed_h200_profile_splits_as_results_md_says():
    """The committed H200 profile splits as docs/results.md's lone-query table says (pass A)."""
    results = lone_query.load_results(H200)
    split = dict(lone_query.parts(results))
    assert math.isclose(split["floor"] + split["device call beyond its floor"], 1.7167,
                        abs_tol=1e-4)
    assert round(split["dispatch not overlapped"], 2) == 0.47
    assert round(split["host transfers"], 1) == 1.0
    assert math.isclose(sum(split.values()), 3.5399, abs_tol=1e-4)


def test_the_notebook_plots_the_committed_profile():
    outputs = notebook_run.execute("lone_query_time.ipynb", H200)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) + o.get("text", "")
                   for o in outputs)
    assert "NVIDIA H200" in text and "3.540 ms, 4.31x its floor" in text


def test_the_plot_stacks_each_context_and_hatches_a_negative_part():
    ms = {**QUERY, **{name + "@32768": value + 1 for name, value in QUERY.items()},
          "session_query@32768": 3.4}  # Python around the call: -0.1 at 32768
    ax = lone_query.plot(_results(ms))
    bars = [p for p in ax.patches]
    assert len(bars) == 5 * 2  # five parts, two contexts
    tops = [b.get_y() + b.get_height() for b in bars[-2:]]
    assert [round(t, 6) for t in tops] == [2.6, 3.4]  # each bar ends at its session_query
    assert [b.get_hatch() for b in bars[-2:]] == [None, "xx"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["? cells", "32768 cells"]
    with pytest.raises(InputError, match="no context with every row"):
        lone_query.plot(_results({"query_step": 1.0}))


def test_the_jit_row_splits_the_python_part():
    """A profile that times the session's call through jit too splits the Python part into
    jit's call path and the session's own Python, still summing to the query."""
    split = dict(lone_query.parts(_results({**QUERY, "query_step_host_io_jit": 2.56})))
    assert "Python around the call" not in split
    assert math.isclose(split["jit's call path"], 0.06)
    assert math.isclose(split["Session.query's own Python"], 0.04)
    assert math.isclose(sum(split.values()), 2.6)
    ax = lone_query.plot(_results({**QUERY, "query_step_host_io_jit": 2.56}))
    assert len(ax.patches) == 6
