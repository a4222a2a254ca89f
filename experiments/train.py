"""Trains one rung of the capability ladder; resumes from --workdir's latest checkpoint.

  python -m experiments.train --config=configs/train.py:ladder-s      # into runs/ladder-s
  python -m experiments.train --config=configs/train.py:test          # seconds

Writes checkpoints/, metrics.jsonl, results.json (held-out accuracy per question type) and
export/ (a shipped-model folder, see statejax.pretrained) into --workdir (default
runs/<variant>, e.g. runs/ladder-s, runs/ladder-s-quick: a continued rung reads its base
rung's folder, see configs/train.py).
"""

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from experiments import launch
from statejax.train import trainer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "train.py"),
    "Training config (configs/train.py[:ladder-s|:ladder-m|:ladder-l|:ladder-l-long|:test]"
    "[,quick]).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints and results go here (default: runs/<config variant>, e.g. "
    "runs/ladder-s; rerun with the same folder to resume).")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Stop after this many total steps (resume later).")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    trainer.quiet_checkpoint_logs()
    config = _CONFIG.value
    workdir = _WORKDIR.value or launch.rung_workdir(config.variant)
    _, results = trainer.train(config, workdir, stop_after=_STOP_AFTER.value)
    if results:
        summary = {name: ev["accuracy"] for name, ev in results["serving"].items()}
        print(json.dumps({"steps": results["steps"], "serving_accuracy": summary}, indent=2))


if __name__ == "__main__":
    launch.run(main)
