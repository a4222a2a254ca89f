"""Profile of a query step outside attention: each weight group vs its read floor.

  python -m experiments.step_profile                                   # CPU, cpu-small f32
  python -m experiments.step_profile --config=configs/step_profile.py:gpu

What is timed: `statejax.perf.step_profile`. Writes results.json and results.md to --workdir
(default runs/step_profile/<variant>).
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from experiments import launch
from statejax.perf import step_profile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "step_profile.py"),
    "Profile config (configs/step_profile.py[:gpu|:gpu-linear|:tiny|:tiny-linear]).")
_WORKDIR = flags.DEFINE_string("workdir", None, launch.workdir_help("step_profile"))


def _write(results: dict, workdir: str) -> str:
    """Writes results.json and results.md to `workdir`; returns the markdown."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    markdown = step_profile.results_markdown(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    return markdown


def _on_progress(workdir: str):
    """After each row (and the kernel trace): print new rows and rewrite the results, so a
    timeout keeps what was measured."""
    printed = 0

    def progress(results: dict):
        nonlocal printed
        for row in results["rows"][printed:]:
            print(json.dumps(row), flush=True)
        printed = len(results["rows"])
        _write(results, workdir)

    return progress


def main(argv):
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value or launch.default_workdir("step_profile", config.variant)
    print(_write(step_profile.run(config, on_row=_on_progress(workdir)), workdir))


if __name__ == "__main__":
    launch.run(main)
