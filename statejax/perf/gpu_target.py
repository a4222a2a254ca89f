"""Compile for a GPU that is not here: XLA's compile-only CUDA target.

jax's CUDA plugin (`jax-cuda13-plugin`, `jax-cuda13-pjrt`) makes a compile-only device from a
GPU description (XLA's `GpuTargetConfigProto`, `statejax/perf/gpu_targets/*.txtpb`). A program
compiled for it is what the card would run, except that nothing is autotuned (GEMM tilings
come from XLA's heuristics): the same fusions, Pallas kernels (Triton kernels compiled to PTX),
command buffers. So the kernels a step launches can be counted, and their kinds read, on a
CPU-only machine.

The plugin registers itself only if its CUDA version check passes or is skipped: on a machine
without CUDA libraries run with `JAX_PLATFORMS=cpu` (set before jax starts a backend).

Inside `compiling_for(target)`, statejax's kernels compile for the target instead of running
in interpret mode (`statejax.platform.compiling_for_gpu()` is the one switch they consult).
"""

import contextlib
import importlib.resources

import jax
from jax.experimental import topologies

from statejax import platform
from statejax.errors import InputError

TARGETS = {"h100": "h100_sxm.txtpb"}

def target_device(name: str = "h100") -> jax.Device:
    """A compile-only device of the named GPU (`TARGETS`).

    Raises:
      InputError: unknown name, or jax's CUDA plugin is not installed / not registered.
    """
    if name not in TARGETS:
        raise InputError(f"gpu target {name!r}; known: {sorted(TARGETS)}")
    config = importlib.resources.files("statejax.perf") / "gpu_targets" / TARGETS[name]
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                                target_config=config.read_text())
    except (NotImplementedError, RuntimeError) as e:
        raise InputError(
            "compiling for a GPU target needs jax's CUDA plugin (pip install "
            f"jax-cuda13-plugin jax-cuda13-pjrt at jax's version; on a machine without CUDA "
            f"libraries run with JAX_PLATFORMS=cpu): {e}") from e
    return topology.devices[0]


def place(tree, device: jax.Device):
    """Abstract values (arrays or ShapeDtypeStructs) of `tree`, committed to `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)


@contextlib.contextmanager
def compiling_for(device: jax.Device):
    """Trace and lower for `device` (a `target_device`): kernels compile for it.

    Pallas's Triton lowering reads the GPU model from an abstract mesh when no GPU is attached.
    """
    mesh = jax.sharding.AbstractMesh((1,), ("target",), abstract_device=jax.sharding
                                     .AbstractDevice(device_kind=device.device_kind,
                                                     num_cores=None, platform="cuda"))
    token = platform.TARGET.set(device)
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            yield
    finally:
        platform.TARGET.reset(token)


def compile_for(fn, device: jax.Device, *args, **static):
    """Compiles jitted `fn` at abstract `args` (placed on `device`) for the target.

    Returns:
      The compiled executable (not runnable here: read `.as_text()`).
    """
    with compiling_for(device):
        lowered = fn.trace(*place(args, device), **static).lower()
    return lowered.compile()
