"""XLA's CUDA-graph (command buffer) log of a step-profile run, split by the profile's rows.

On a GPU, XLA records a step's kernels into command buffers (CUDA graphs) and replays them.
A replay whose buffers moved (a parameter, an output or a temporary at a new address) first
re-points the recorded nodes that use them ("updates" the command buffer,
`xla/backends/gpu/runtime/command_buffer_thunk.cc`): host time spent before the step's
kernels start. A query from `Session.query` passes fresh host inputs on every call where the
profile's pipelined rows reuse the same device arrays, so updates are one candidate for the
host time a lone query spends beyond its device call (`docs/results.md`).

With `TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0` XLA logs every replay
("Execute command buffer ..."), every update ("Update command buffer ... updated_allocs=K",
then "Updated command buffer in N μs") and every first recording ("Initialized command
buffer ... in N μs"). `experiments/step_profile.py` prints each row as a JSON line when it is
done, into the same log (stdout and stderr together, as `experiments/gpu_session.sh` keeps
them): the log lines before a row's JSON line belong to that row (its compile and warm-up
included).
"""

import json
import re

import numpy as np

# jax 0.11.2's plugin writes "[0] Execute command buffer; num_executions=N"; newer XLA adds
# "on device #N". The profiler's "Execute command buffer thunk as a regular thunk" is no replay.
_EXECUTE = re.compile(r"Execute command buffer(?: on device #\d+)?; num_executions=")
_UPDATE_ALLOCS = re.compile(r"Update command buffer.*updated_allocs=(\d+)")
_RECORDED_US = re.compile(r"(Initialized|Updated) command buffer.*? in (\d+)")


def _row_name(line: str) -> str | None:
    """The component of a step-profile row's JSON line, else None."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        row = json.loads(line[start:])
    except ValueError:
        return None
    return row.get("component") if isinstance(row, dict) else None


def _empty() -> dict:
    return dict(executions=0, updates=0, updated_allocs=[], update_us=[], initializations=0,
                init_us=[])


def rows(log_text: str) -> list[dict]:
    """Command-buffer activity per step-profile row, in the order of the log.

    Returns:
      [{"row", "executions", "updates", "updated_allocs": [K per update], "update_us": [µs per
      update], "initializations", "init_us": [µs per first recording]}]; lines after the last
      row go to a row named "(after the last row)" if they hold any activity.
    """
    out, current = [], _empty()
    for line in log_text.splitlines():
        name = _row_name(line)
        if name is not None:
            out.append(dict(row=name, **current))
            current = _empty()
        elif _EXECUTE.search(line):
            current["executions"] += 1
        elif (m := _UPDATE_ALLOCS.search(line)) is not None:
            current["updates"] += 1
            current["updated_allocs"].append(int(m.group(1)))
        elif (m := _RECORDED_US.search(line)) is not None:
            if m.group(1) == "Updated":
                current["update_us"].append(int(m.group(2)))
            else:
                current["initializations"] += 1
                current["init_us"].append(int(m.group(2)))
    if current["executions"] or current["updates"] or current["initializations"]:
        out.append(dict(row="(after the last row)", **current))
    return out


def _median(values) -> float | None:
    return float(np.median(values)) if values else None


def markdown(log_rows: list[dict]) -> str:
    """A table of `rows(...)`: replays, updates and their host time per row."""
    if not any(r["executions"] or r["updates"] or r["initializations"] for r in log_rows):
        return ("No command-buffer lines in the log: was it written with "
                "TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 on a GPU?\n")

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    lines = ["| row | replays | updates | updates per replay | µs per update (median) | "
             "update µs per replay | buffers re-pointed per update (median) | first "
             "recordings (µs, median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in log_rows:
        replays = r["executions"]
        per_replay = r["updates"] / replays if replays else None
        us_per_replay = sum(r["update_us"]) / replays if replays else None
        lines.append(
            f"| {r['row']} | {replays} | {r['updates']} | {fmt(per_replay, '.2f')} | "
            f"{fmt(_median(r['update_us']), '.0f')} | {fmt(us_per_replay, '.0f')} | "
            f"{fmt(_median(r['updated_allocs']), '.0f')} | {r['initializations']}"
            + (f" ({_median(r['init_us']):.0f})" if r["init_us"] else "") + " |")
    return "\n".join(lines) + "\n"
