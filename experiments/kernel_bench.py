"""Benchmarks the Pallas attention kernels against the device's measured peaks and baselines.

  python -m experiments.kernel_bench --config=configs/kernel_bench.py:gpu
  python -m experiments.kernel_bench --config=configs/kernel_bench.py:cpu    # interpret mode

What is timed: `statejax.perf.kernel_bench`. Writes results.json and results.md to --workdir
(default runs/kernel_bench/<variant>; after every shape, so a run cut short keeps its rows);
with the config's `tuned_dir`, records the fastest matching tiles in that GPU model's table
(`statejax.kernels.tuned`).
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import launch
from statejax.perf import kernel_bench

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "kernel_bench.py"),
    "Benchmark config (configs/kernel_bench.py[:gpu|:cpu]).")
_WORKDIR = flags.DEFINE_string("workdir", None, launch.workdir_help("kernel_bench"))


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or launch.default_workdir("kernel_bench", cfg.variant)
    results = kernel_bench.run(cfg, workdir)
    paths = list(kernel_bench.write_results(results, workdir).values())
    if cfg.get("tuned_dir"):
        paths += sorted(set(kernel_bench.record_tuned(results, cfg.tuned_dir, cfg,
                                                      tuple(cfg.record_backends) or None)))
    print(kernel_bench.results_markdown(results))
    print(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    launch.run(main)
