"""Test-only: compile a Mosaic GPU kernel down to sm_90a machine code on a machine with no GPU.

jax's CUDA plugin compiles a Mosaic GPU module (MLIR -> LLVM -> PTX -> ptxas) in its
`MosaicGpuCompile` entry point; of the CUDA driver it asks only the device's compute capability
before compiling, and loads the binary after. A stand-in `libcuda.so.1`, built here with the
system C compiler, answers for one H100 and refuses the load, so the whole compilation runs
and ptxas's report (registers per thread, spills) lands in `MOSAIC_GPU_DUMP_TO`.

This catches what lowering on the CPU cannot: a module Mosaic GPU fails to compile, register
spills, and register use that cannot launch (threads x registers > 64K per block).
"""

import ctypes
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

# The few driver calls MosaicGpuCompile makes; every other symbol is absent (the plugin's
# lazy loader then reports that call as failed, which nothing on this path makes).
_FAKE_LIBCUDA_C = r"""
#include <string.h>
typedef int CUresult;
static int context;
CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGet(int *d, int i) { *d = 0; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int d) {
  *v = attr == 75 ? 9 : attr == 76 ? 0 : attr == 16 ? 132 : 0;  /* sm_90, 132 SMs */
  return 0;
}
CUresult cuDeviceGetName(char *name, int len, int d) {
  strncpy(name, "NVIDIA H100 80GB HBM3", len);
  return 0;
}
CUresult cuCtxGetCurrent(void **c) { *c = &context; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxSetCurrent(void *c) { return 0; }
CUresult cuCtxPushCurrent_v2(void *c) { return 0; }
CUresult cuCtxPopCurrent_v2(void **c) { if (c) *c = &context; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { *c = &context; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stand-in libcuda: no GPU"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuModuleLoadData(void **m, const void *image) { return 100; }
CUresult cuModuleLoadDataEx(void **m, const void *image, unsigned n, void *o, void **v) {
  return 100;
}
"""

_REPORT = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                     r"Used (\d+) registers", re.S)


def _plugin_library() -> str | None:
    for version in (13, 12):
        name = f"jax_plugins.xla_cuda{version}"
        if importlib.util.find_spec("jax_plugins") and importlib.util.find_spec(name):
            module = __import__(name, fromlist=["_get_library_path"])
            return str(module._get_library_path())
    return None


def unavailable() -> str | None:
    """Why this machine cannot run the compilation, or None if it can."""
    if _plugin_library() is None:
        return "needs jax's CUDA plugin (CI's second leg installs it)"
    if shutil.which("cc") is None:
        return "needs a C compiler for the stand-in libcuda"
    return None


def build_fake_libcuda(directory: pathlib.Path) -> pathlib.Path:
    """Compiles the stand-in driver into `directory`/libcuda.so.1."""
    source = directory / "fake_libcuda.c"
    source.write_text(_FAKE_LIBCUDA_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"),
                    str(source)], check=True, capture_output=True)
    return directory


def compile_lowered_kernel() -> None:
    """In the subprocess: compile the one Mosaic GPU module lowered so far in this process."""
    from jax.experimental.mosaic.gpu import core  # noqa: PLC0415

    (module,) = core.KNOWN_KERNELS.values()
    compile_fn = ctypes.CDLL(_plugin_library()).MosaicGpuCompile
    compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_fn.restype = ctypes.c_void_p
    compile_fn(module, len(module))  # returns NULL: the stand-in driver refuses the load


def ptxas_report(code: str, workdir: pathlib.Path, *, timeout_s: float) -> dict:
    """Runs `code` (which lowers one kernel, then calls `compile_lowered_kernel()`) in a
    subprocess with the stand-in driver; returns ptxas's report.

    Returns:
      {"registers": per thread, "spill_stores": bytes, "spill_loads": bytes, "log": text}.
    Raises:
      AssertionError: the compilation produced no ptxas report.
    """
    tests_dir = pathlib.Path(__file__).parent
    driver = build_fake_libcuda(workdir)
    dump = workdir / "dump"
    dump.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MOSAIC_GPU_DUMP_TO": str(dump),
           "MOSAIC_GPU_DUMP_PTXAS": "1",
           "LD_LIBRARY_PATH": os.pathsep.join([str(driver), os.environ.get("LD_LIBRARY_PATH",
                                                                          "")]),
           "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    reports = [p.read_text() for p in dump.glob("*.ptxas")]
    assert proc.returncode == 0 and len(reports) == 1, (
        f"no ptxas report (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    match = _REPORT.search(reports[0])
    assert match, reports[0]
    stores, loads, registers = (int(x) for x in match.groups())
    return dict(registers=registers, spill_stores=stores, spill_loads=loads, log=reports[0])
