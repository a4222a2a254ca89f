"""Where a lone query's time goes, read off a step profile's rows (`statejax.perf.step_profile`).

The end-to-end target is a lone `Session.query` within 1.3x of its floor (the weights and the
session's K/V read once at the measured copy bandwidth). The profile times the same
query five ways; their differences split `session_query` into parts that add up to it:

| part | rows |
|---|---|
| floor | `floor_ms` of `query_step` |
| device call beyond its floor | `query_step` (calls pipelined, so dispatch overlaps) - floor |
| dispatch not overlapped | `query_step_sync` (one call at a time) - `query_step` |
| host transfers | `query_step_host_io` (the question in, the answer out) - `query_step_sync` |
| Python around the call | `session_query` - `query_step_host_io` |

Newer profiles also time the session's call through jit's dispatch
(`query_step_host_io_jit`, where the other rows call the compiled executable); with that row
the last part splits in two: jit's call path (`query_step_host_io_jit` -
`query_step_host_io`) and the session's own Python (`session_query` -
`query_step_host_io_jit`).

Each row is a median of its own calls, so a part can come out slightly negative where two
rows are within their spread; parts are reported as measured, not clamped. Where the
profile traced the device call's kernels (`query_kernels`), `kernel_parts` splits the call
by kernel kind, and the time no kernel ran.
"""

import json
import os

from matplotlib.figure import Figure

from statejax.errors import InputError

TARGET_OVER_FLOOR = 1.3  # the end-to-end target: a lone query within 1.3x of its floor
# (part, the row it is measured to, the row before it); the floor comes from the first row.
PARTS = (
    ("device call beyond its floor", "query_step", None),
    ("dispatch not overlapped", "query_step_sync", "query_step"),
    ("host transfers", "query_step_host_io", "query_step_sync"),
    ("Python around the call", "session_query", "query_step_host_io"),
)

# With the row of the session's call made through jit, the last part splits in two.
JIT_ROW = "query_step_host_io_jit"
JIT_PART, SESSION_PART = "jit's call path", "Session.query's own Python"


def load_results(workdir: str) -> dict:
    """Reads results.json from a step profile's --workdir (`experiments/step_profile.py`)."""
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _rows(results: dict) -> dict:
    return {row["component"]: row for row in results["rows"] if "ms" in row}


def contexts(results: dict) -> list[str]:
    """Row suffixes ("" for `config.context`, "@32768" ...) with every row `parts` needs."""
    rows = _rows(results)
    names = [name for _, name, _ in PARTS]
    suffixes = [name.removeprefix("session_query") for name in rows
                if name.startswith("session_query")]
    return [s for s in suffixes if all(n + s in rows for n in names)]


def parts(results: dict, suffix: str = "") -> list[tuple[str, float]]:
    """[(part, ms)]: the floor, then the parts of `PARTS` (the last split in two where the
    profile has `JIT_ROW`); they sum to `session_query`.

    Args:
      results: a step profile's results (`load_results`).
      suffix: which query rows: "" (the profile's `context`), "@32768", "[packed]" ...
    """
    rows = _rows(results)
    missing = [name + suffix for _, name, _ in PARTS if name + suffix not in rows]
    if missing:
        raise InputError(f"the profile has no rows {missing}; rows with every part: "
                         f"{contexts(results) or 'none'}")
    floor = rows["query_step" + suffix]["floor_ms"]
    out = [("floor", floor)]
    for part, name, before in PARTS:
        start = floor if before is None else rows[before + suffix]["ms"]
        out.append((part, rows[name + suffix]["ms"] - start))
    jit = rows.get(JIT_ROW + suffix)
    if jit is not None:  # the Python part, split at the session's call made through jit
        python = out.pop()[1]
        jit_path = jit["ms"] - rows["query_step_host_io" + suffix]["ms"]
        out += [(JIT_PART, jit_path), (SESSION_PART, python - jit_path)]
    return out


def kernel_parts(results: dict, untraced_ms: float) -> list[tuple[str, float]] | None:
    """[(part, ms)] of the traced device call (`query_kernels`) that sum to `untraced_ms` (the
    pipelined call's time): kernel time by kind (GEMMs, Pallas, copies, other), minus the
    time kernels overlapped each other, plus the time no kernel ran. None if the profile
    traced no kernels."""
    trace = results.get("query_kernels")
    if not trace or "by_kind" not in trace:
        return None
    out = [(f"{kind} kernels ({int(v['kernels'])})", v["ms"])
           for kind, v in trace["by_kind"].items() if v["kernels"]]
    return out + [("kernels overlapping each other", trace["busy_ms"] - trace["kernel_ms"]),
                  ("no kernel running", untraced_ms - trace["busy_ms"])]


def markdown(results: dict) -> str:
    """The profile's setup, `tables`, then the traced device call (`kernel_parts`)."""
    lines = [f"# Where a lone query's time goes: {results['model']} ({results['dtype']}), "
             f"{results['tokens']}-token question", "",
             f"- device: {results['device']}; jax {results['jax_version']}; {results['date']}",
             "", *tables(results)]
    step = _rows(results).get("query_step")
    kernels = kernel_parts(results, step["ms"]) if step else None
    if kernels:
        lines += ["## The device call (`query_step`) by its traced kernels", "",
                  "| part | ms |", "|---|---:|"]
        lines += [f"| {part} | {ms:.3f} |" for part, ms in kernels]
    return "\n".join(lines) + "\n"


def tables(results: dict, heading: str = "##") -> list[str]:
    """Markdown lines: a table per context (`contexts`) under a `heading`-level title, each
    part's ms and share of the query, the query against its floor and the 1.3x target. No
    lines where the profile has no lone-query rows."""
    lines = []
    for suffix in contexts(results):
        split = parts(results, suffix)
        total = sum(ms for _, ms in split)
        floor = split[0][1]
        lines += [f"{heading} `session_query{suffix}`: {total:.3f} ms, "
                  f"{total / floor:.2f}x its floor (target {TARGET_OVER_FLOOR}x: "
                  f"{TARGET_OVER_FLOOR * floor:.3f} ms)", "",
                  "| part | ms | share |", "|---|---:|---:|"]
        lines += [f"| {part} | {ms:.3f} | {100 * ms / total:.0f}% |" for part, ms in split]
        lines.append("")
    return lines


def plot(results: dict, ax=None):
    """One stacked bar per context (`contexts`): the parts of a lone query, with the 1.3x
    target of each marked; a negative part (rows within their spread) is hatched, drawn down
    from the parts below it. Returns the axes."""
    if ax is None:
        ax = Figure(figsize=(7, 4), layout="constrained").subplots()
    suffixes = contexts(results)
    if not suffixes:
        raise InputError("the profile has no context with every row of a lone query "
                         f"({[name for _, name, _ in PARTS]})")
    x = range(len(suffixes))
    bottoms = [0.0] * len(suffixes)
    split = [dict(parts(results, s)) for s in suffixes]
    for part in dict.fromkeys(name for one in split for name in one):
        values = [one.get(part, 0.0) for one in split]
        bars = ax.bar(x, values, bottom=bottoms, label=part)
        for bar, value in zip(bars, values, strict=True):
            if value < 0:  # drawn down from the parts below it: hatched, so it reads as less
                bar.set(hatch="xx", alpha=0.4)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    targets = [TARGET_OVER_FLOOR * one["floor"] for one in split]
    ax.scatter(x, targets, marker="_", s=900, color="black", zorder=3,
               label=f"target: {TARGET_OVER_FLOOR}x the floor")
    ax.set_xticks(list(x), [_label(results, s) for s in suffixes])
    ax.set(ylabel="ms", title=f"a lone Session.query: {results['model']} on "
                              f"{results['device']}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _label(results: dict, suffix: str) -> str:
    """The x label of a suffix: "1024 cells" for "", "32768 cells" for "@32768", the
    variant below the cells for "[packed]" ..."""
    context, _, variant = suffix.partition("[")
    cells = context.removeprefix("@") or results.get("context", "?")
    return f"{cells} cells" + ("\n[" + variant.replace(",", ",\n") if variant else "")
