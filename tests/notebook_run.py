"""Executes a notebook of notebooks/ as a user would, for the tests that check its outputs."""

import os
import pathlib

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(name: str, results_dir) -> list:
    """Runs notebooks/`name` from the repo root with STATEJAX_RESULTS=`results_dir`; returns
    its code cells' outputs (nbformat output nodes)."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    env = {**os.environ, "STATEJAX_RESULTS": str(results_dir)}
    env.pop("MPLBACKEND", None)  # the inline backend must emit the figure
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute(cwd=str(ROOT),
                                                                            env=env)
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
