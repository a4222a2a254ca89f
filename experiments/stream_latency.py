"""Query latency vs accumulated context: all paths on one streamed session.

  python -m experiments.stream_latency                      # CPU run, a few minutes
  python -m experiments.stream_latency --config=configs/stream_latency.py:gpu
  python -m experiments.stream_latency --config=configs/stream_latency.py:tiny   # seconds

Writes results.json, results.md and latency_vs_context.png into --workdir (default
runs/stream_latency/<variant>: runs/stream_latency/cpu for the main run).
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import launch
from statejax.studies import flash_study, latency

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "stream_latency.py"),
    "Study config (configs/stream_latency.py[:gpu|:gpu-floor|:tiny]).")
_WORKDIR = flags.DEFINE_string("workdir", None, launch.workdir_help("stream_latency"))


def main(argv):
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value or launch.default_workdir("stream_latency", config.variant)
    # Written after each context too: a run cut short (a device call's limit) keeps its rows.
    results = latency.run_stream_latency(
        config, on_progress=lambda partial: latency.write_results(partial, workdir))
    if config.flash.enabled:  # the latency rows first: the flash study takes a while
        latency.write_results(results, workdir)
        results["flash"] = flash_study.run_flash_study(config.flash)
    paths = latency.write_results(results, workdir)
    print(latency.results_markdown(results))
    print(f"wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    launch.run(main)
