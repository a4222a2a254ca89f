"""What every launcher shares: a default workdir per config variant, and a `--help` that exits 0.

Each variant gets its own folder, so a test-size run (`:tiny`) never overwrites the main run's
results; `--workdir` still overrides it.
"""

import os
import sys

from absl import app

RUNS = "runs"
# absl's help flags; absl exits 1 after printing them, which scripts read as a failure.
_HELP_FLAGS = frozenset({"help", "?", "helpshort", "helpfull", "helpxml"})


def variant_dir(variant: str) -> str:
    """A config variant as one folder name: "ladder-s,quick" -> "ladder-s-quick"."""
    if not variant:
        raise ValueError("a config needs a non-empty `variant` to name its default workdir")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in variant)


def default_workdir(experiment: str, variant: str) -> str:
    """runs/<experiment>/<variant>, relative to where the launcher runs (the repo root)."""
    return os.path.join(RUNS, experiment, variant_dir(variant))


def rung_workdir(variant: str) -> str:
    """runs/<variant> for a training rung (runs/ladder-s, runs/ladder-s-quick): the rungs'
    folders are the names continued rungs start from (configs/train.py)."""
    return os.path.join(RUNS, variant_dir(variant))


def beside_log(log: str) -> str:
    """A log's results folder, its path without the extension: WORK/step_profile.log ->
    WORK/step_profile (where the device script's profile wrote)."""
    return os.path.splitext(log)[0]


def workdir_help(experiment: str) -> str:
    """The `--workdir` flag's help text, naming the default."""
    return (f"Where results are written (default: {RUNS}/{experiment}/<config variant>, so "
            "each variant keeps its own results).")


def asked_for_help(argv: list[str]) -> bool:
    """True when `argv` (flags only, no program name) holds one of absl's help flags."""
    for arg in argv:
        if arg == "--":
            return False
        if arg.startswith("-"):
            name, _, value = arg.lstrip("-").partition("=")
            if name in _HELP_FLAGS and value.lower() not in ("false", "0"):
                return True
    return False


def run(main) -> None:
    """`absl.app.run(main)`, except that asking for help exits 0, as `--help` does elsewhere."""
    try:
        app.run(main)
    except SystemExit as e:
        if e.code == 1 and asked_for_help(sys.argv[1:]):
            raise SystemExit(0) from None
        raise
