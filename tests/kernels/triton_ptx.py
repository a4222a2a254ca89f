"""Test-only: the PTX of a Pallas Triton kernel as XLA compiles it for an H100, on a CPU.

Compiling for the compile-only H100 (`statejax.perf.gpu_target`), XLA lowers each Triton kernel to
PTX and runs the `ptxas` it finds on the PATH. A stand-in `ptxas` first on the PATH copies the
PTX it is given aside and runs the real one, so the test can read what the card would run:
here, whether a KV loop's copies are pipelined (`kv_loops`).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

_STAND_IN = """#!/bin/sh
for a in "$@"; do
  case "$a" in -*) ;; *) [ -f "$a" ] && cp "$a" "$PTX_DUMP/$(basename "$a").ptx" ;; esac
done
exec {ptxas} "$@"
"""


def has_ptxas() -> bool:
    """Whether XLA will run a `ptxas` from the PATH (else it compiles PTX in-process, and
    nothing can be captured). Compiling for the H100 also needs jax's CUDA plugin."""
    return shutil.which("ptxas") is not None


def run_capturing_ptx(code: str, workdir: pathlib.Path, *, timeout_s: float) -> pathlib.Path:
    """Runs `code` (which compiles jitted functions with `gpu_target.compile_for`) in a
    subprocess whose ptxas copies each PTX it is given into `$PTX_DUMP` (at first
    `$PTX_DUMP_ROOT`, the folder returned; `code` may point it at subfolders it makes, one
    per compile, as the environment of the ptxas XLA starts)."""
    bin_dir, root = workdir / "bin", workdir / "ptx"
    bin_dir.mkdir()
    root.mkdir()
    stand_in = bin_dir / "ptxas"
    stand_in.write_text(_STAND_IN.format(ptxas=shutil.which("ptxas")))
    stand_in.chmod(0o755)
    repo = pathlib.Path(__file__).parents[2]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PTX_DUMP_ROOT": str(root),
           "PTX_DUMP": str(root),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(root.rglob("*.ptx")), f"no PTX reached the stand-in ptxas:\n{proc.stderr[-2000:]}"
    return root


def read_ptx(directory: pathlib.Path) -> dict[str, str]:
    """{kernel entry name: PTX} of the PTX files in `directory`."""
    kernels = {}
    for path in directory.glob("*.ptx"):
        text = path.read_text()
        kernels.update(dict.fromkeys(re.findall(r"\.entry (\w+)\(", text), text))
    return kernels


def kv_loops(ptx: str) -> list[dict]:
    """Each loop of `ptx` that waits for async copies and computes a softmax (a KV loop):
    {"waits": the N of its `cp.async.wait_group N`, "global_loads": its `ld.global`s}.

    A loop is the lines from a label to the last branch back to it. A KV loop whose waits
    are all 0 waits for every copy in flight at each step: the block it computes on was
    fetched while nothing else ran."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"(\$L__BB\d+_\d+):", line.strip()))}
    loops = []
    for label, start in labels.items():
        back = [i for i, line in enumerate(lines)
                if i > start and re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", line)]
        if not back:
            continue
        body = "\n".join(lines[start:back[-1] + 1])
        waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+);", body)]
        if waits and "ex2.approx" in body:
            loops.append({"waits": waits, "global_loads": len(re.findall(r"\bld\.global",
                                                                         body))})
    return loops
