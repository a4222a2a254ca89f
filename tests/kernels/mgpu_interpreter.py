"""Test-only: lets jax's Mosaic GPU interpreter run statejax's Mosaic kernels on CPU.

jax 0.10's GPU interpreter (`InterpretGPUParams`) simulates warpgroups, shared memory, TMA
copies and barriers, but its wgmma takes neither a transposed shared-memory operand
(`ref.transpose`, our q @ k^T) nor a register operand (our p @ v). `patched()` swaps in a
wgmma callback that does both; the kernels' other gaps are switched off by
`mosaic_common.KernelOps(interpret=True)`. Private jax internals: checked for jax 0.10 only
(`supported()`), where CI runs.
"""

import contextlib
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

_KEY_SHAPE = (5,)  # an interpreter allocation key; anything else is a register value


def supported() -> bool:
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: F401
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401
    except ImportError:
        return False
    return jax.__version__.startswith("0.10.")


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
           acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
           b_allocation_key_as_array, b_transforms, source_info=None):
    """acc += a @ b, with a possibly a register value and a/b possibly transposed refs."""
    from jax._src.pallas.mosaic.interpret import utils
    from jax._src.pallas.mosaic_gpu import core as mgpu_core
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc

    device_id, thread_id = int(device_id), int(thread_id)
    memory = gc._get_shared_memory()
    thread = memory.get_global_thread_id(device_id, thread_id)
    info = utils.GPULoggingInfo(device_id=device_id,
                                grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                thread_id=thread_id, source_info=source_info)

    def operand(key_or_value, transforms):
        if np.shape(key_or_value) != _KEY_SHAPE:
            return np.asarray(key_or_value)
        transforms = gc._remove_noop_transforms(transforms)
        indexers = [t for t in transforms if not isinstance(t, mgpu_core.TransposeTransform)]
        transposes = transforms[len(indexers):]
        if any(isinstance(t, mgpu_core.TransposeTransform) for t in transforms[:len(indexers)]):
            raise NotImplementedError(f"indexing after a transpose: {transforms}")
        indexers = jax.tree.map(int, tuple(indexers))
        key, read_range = gc.HostAllocationKey.from_array(key_or_value), utils.to_range(indexers)
        value, _, clock = memory.get_buffer_content(key, read_range, thread, logging_info=info)
        if memory.detect_races:  # a wgmma operand read is a shared-memory read like any other
            gc.get_races().check_read(device_id, thread_id, clock, key, read_range,
                                      source_info=source_info)
        for t in transposes:
            value = np.transpose(value, t.permutation)
        return value

    a = operand(a_allocation_key_as_array, a_transforms)
    b = operand(b_allocation_key_as_array, b_transforms)
    acc_key = gc.HostAllocationKey.from_array(acc_allocation_key_as_array)
    acc_range = utils.to_range(jax.tree.map(int, gc._remove_noop_transforms(acc_transforms)))
    acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
    result = acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
    memory.store_buffer_content(acc_key, acc_range, result, thread, logging_info=info)
    return token


def params():
    """Interpreter settings for the tests: its happens-before race detector on (TMA copies,
    shared-memory reads and writes, and — through `_wgmma` — wgmma operand reads)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(detect_races=True)


def races_found() -> bool:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    return bool(ipc.get_races().races_found)


@contextlib.contextmanager
def patched():
    """Within: the interpreter's wgmma is `_wgmma`; its state is reset on the way out."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    original = gc.wgmma
    gc.wgmma = _wgmma
    try:
        yield
    finally:
        gc.wgmma = original
        ipc.reset_gpu_interpret_mode_state()


def run_with_deadline(code: str, deadline_s: float) -> tuple[bool, str]:
    """Runs `code` in a fresh Python with tests/ and the repo on the path.

    An error inside the interpreter (a race, an unobserved barrier phase, a failed check)
    leaves its simulated warpgroups waiting on barriers forever, so a broken kernel hangs its
    process rather than failing it: hence a process per case, with a deadline.

    Returns:
      (finished and exited 0, the tail of its output or why it did not finish).
    """
    tests_dir = pathlib.Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests_dir), str(tests_dir.parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=deadline_s)
    except subprocess.TimeoutExpired:
        return False, (f"did not finish in {deadline_s} s (a barrier wait that never "
                       "completes, or an error in a simulated thread)")
    return proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
