"""Command-buffer (CUDA graph) replays and updates per step-profile row, from its log.

  python -m experiments.command_buffer_log --log=WORK/step_profile.log   # into WORK/step_profile

The log is the step profile's stdout and stderr together, written with
`TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0` on a GPU
(`experiments/gpu_session.sh` does both). Writes command_buffers.json and command_buffers.md
to --workdir (default: the log's path without its extension, where the device script's profile
wrote its results) and prints the table (`statejax.perf.command_buffer_log`).
"""

import json
import os

from absl import flags

from experiments import launch
from statejax.perf import command_buffer_log

_LOG = flags.DEFINE_string("log", None, "The step profile's log.", required=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where results are written (default: the log's path without its "
    "extension, e.g. WORK/step_profile.log -> WORK/step_profile).")


def main(argv):
    del argv
    workdir = _WORKDIR.value or launch.beside_log(_LOG.value)
    with open(_LOG.value, errors="replace") as f:
        rows = command_buffer_log.rows(f.read())
    table = command_buffer_log.markdown(rows)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "command_buffers.json"), "w") as f:
        json.dump(dict(log=os.path.abspath(_LOG.value), rows=rows), f, indent=1)
    with open(os.path.join(workdir, "command_buffers.md"), "w") as f:
        f.write("# Command-buffer replays and updates per step-profile row\n\n" + table)
    print(table)


if __name__ == "__main__":
    launch.run(main)
