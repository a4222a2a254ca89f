"""Profile of a query step outside attention (issue 3): each weight group vs its read floor.

  python -m experiments.step_profile                                   # CPU, cpu-small f32
  python -m experiments.step_profile --config=configs/step_profile.py:gpu --workdir=...

What is timed: `statejax.perf.step_profile`. Writes results.json and results.md to --workdir.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from statejax.perf import step_profile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "step_profile.py"),
    "Profile config (configs/step_profile.py[:gpu|:tiny]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/step_profile", "Where results are written.")


def _write(results: dict) -> str:
    """Writes results.json and results.md to --workdir; returns the markdown."""
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    markdown = step_profile.results_markdown(results)
    with open(os.path.join(_WORKDIR.value, "results.md"), "w") as f:
        f.write(markdown)
    return markdown


def _on_progress():
    """After each row (and the kernel trace): print new rows and rewrite the results, so a
    timeout keeps what was measured."""
    printed = 0

    def progress(results: dict):
        nonlocal printed
        for row in results["rows"][printed:]:
            print(json.dumps(row), flush=True)
        printed = len(results["rows"])
        _write(results)

    return progress


def main(argv):
    del argv
    print(_write(step_profile.run(_CONFIG.value, on_row=_on_progress())))


if __name__ == "__main__":
    app.run(main)
