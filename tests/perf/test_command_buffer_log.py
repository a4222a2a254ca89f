"""The command-buffer log splits XLA's replay / update lines by the step profile's rows."""

import json
import os
import pathlib
import subprocess
import sys

from statejax.perf import command_buffer_log

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Lines as `xla/backends/gpu/runtime/command_buffer_thunk.cc` writes them in jax 0.11.2's
# CUDA plugin (as in docs/results/step_profile_h100_1128/; a glog prefix each), interleaved with the
# step profile's JSON rows and other output; one replay line in a newer XLA's form.
_XLA = "I1128 04:26:57.145694     616 command_buffer_thunk.cc:371] [0] "
_RECORD = "by recoding command buffer cmd sequence"
_LOG = "\n".join([
    _XLA + f"Initialize command buffer on device #0 {_RECORD}; num_commands=223",
    _XLA + "Initialized command buffer on device #0 in 2500 μs; num_commands=223",
    _XLA + "Execute command buffer; num_executions=1",
    _XLA + "Execute command buffer; num_executions=2",
    '{"component": "query_step", "ms": 1.8, "kernels": 223}',
    _XLA + f"Create/Update command buffer {_RECORD} after 2 executions since last "
    "update; num_commands=223; updated_allocs=5; is_first_record=false; needs_update=true",
    _XLA + "Updated command buffer in 300 μs; num_commands=223",
    _XLA + "Execute command buffer; num_executions=1",
    _XLA + f"Create/Update command buffer {_RECORD} after 1 executions since last "
    "update; num_commands=223; updated_allocs=7; is_first_record=false; needs_update=true",
    _XLA + "Updated command buffer in 500 μs; num_commands=223",
    _XLA + "Execute command buffer on device #0; num_executions=1",
    "W1128 01:00:00.000011  123 other.cc:1] Execute command buffer thunk as a regular thunk "
    "sequence because we detected active profiling session",
    '{"component": "session_query", "ms": 3.2, "kernels": null}',
    'not json {"component" but broken',
    _XLA + "Execute command buffer; num_executions=2",
]) + "\n"


def test_rows_count_replays_updates_and_their_time_per_row():
    rows = command_buffer_log.rows(_LOG)
    assert [r["row"] for r in rows] == ["query_step", "session_query", "(after the last row)"]
    first, second, tail = rows
    assert (first["executions"], first["updates"], first["initializations"]) == (2, 0, 1)
    assert first["init_us"] == [2500] and first["update_us"] == []
    assert (second["executions"], second["updates"]) == (2, 2)
    assert second["updated_allocs"] == [5, 7] and second["update_us"] == [300, 500]
    assert (tail["executions"], tail["updates"]) == (1, 0)
    table = command_buffer_log.markdown(rows)
    # session_query: 2 replays, 2 updates (1.00 per replay), median 400 µs, 400 µs per
    # replay, 6 buffers re-pointed (median of 5 and 7).
    assert "| session_query | 2 | 2 | 1.00 | 400 | 400 | 6 | 0 |" in table
    assert "| query_step | 2 | 0 | 0.00 |  | 0 |  | 1 (2500) |" in table


def test_a_log_without_command_buffer_lines_says_how_to_get_them():
    rows = command_buffer_log.rows('{"component": "query_step", "ms": 1.0}\nother\n')
    assert rows == [dict(row="query_step", executions=0, updates=0, updated_allocs=[],
                         update_us=[], initializations=0, init_us=[])]
    assert "TF_CPP_VMODULE=command_buffer_thunk=3" in command_buffer_log.markdown(rows)


def test_cli_writes_json_and_markdown(tmp_path):
    log = tmp_path / "step_profile.log"
    log.write_text(_LOG)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.command_buffer_log", f"--log={log}",
         f"--workdir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| session_query | 2 | 2 |" in proc.stdout
    saved = json.loads((tmp_path / "out" / "command_buffers.json").read_text())
    assert [r["updates"] for r in saved["rows"]] == [0, 2, 0]
    assert "| session_query | 2 | 2 |" in (tmp_path / "out" / "command_buffers.md").read_text()
