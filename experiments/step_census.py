"""Kernels per query / append step on a GPU target, from the compiled programs (issue 3).

  python -m experiments.step_census                                    # Llama-3.2-1B, H100
  python -m experiments.step_census --config=configs/step_census.py:tiny --workdir=/tmp/sc

Compiles for a compile-only GPU (`statejax.perf.gpu_target`), so it runs without one: it starts jax
on the CPU platform (the CUDA plugin registers then without CUDA libraries). Writes
results.json and results.md to --workdir.
"""

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from statejax.perf import step_census

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "step_census.py"),
    "Census config (configs/step_census.py[:tiny]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/step_census", "Where results are written.")


def main(argv):
    del argv
    jax.config.update("jax_platforms", "cpu")
    results = step_census.run(_CONFIG.value)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    markdown = step_census.results_markdown(results)
    with open(os.path.join(_WORKDIR.value, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    app.run(main)
