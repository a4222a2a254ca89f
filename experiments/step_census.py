"""Kernels per query / append step on a GPU target, from the compiled programs.

  python -m experiments.step_census                     # Llama-3.2-1B, compiled for an H100
  python -m experiments.step_census --config=configs/step_census.py:tiny

Compiles for a compile-only GPU (`statejax.perf.gpu_target`), so it runs without one: it starts
jax on the CPU platform (the CUDA plugin registers then without CUDA libraries). Writes
results.json and results.md to --workdir (default runs/step_census/<variant>).
"""

import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from experiments import launch
from statejax.perf import step_census

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "step_census.py"),
    "Census config (configs/step_census.py[:tiny]).")
_WORKDIR = flags.DEFINE_string("workdir", None, launch.workdir_help("step_census"))


def main(argv):
    del argv
    jax.config.update("jax_platforms", "cpu")
    config = _CONFIG.value
    workdir = _WORKDIR.value or launch.default_workdir("step_census", config.variant)
    results = step_census.run(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    markdown = step_census.results_markdown(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    launch.run(main)
