"""Which device the kernels compile for: the one platform query the model and kernels share.

Kernels run compiled on a GPU and in Pallas interpret mode elsewhere. A compile-only GPU target
(`statejax.perf.gpu_target.compiling_for`) sets `TARGET`, so that a CPU-only machine lowers the
same kernels the card would run.
"""

import contextvars

import jax

TARGET: contextvars.ContextVar = contextvars.ContextVar("gpu_target", default=None)


def compiling_for_gpu() -> bool:
    """True when kernels must compile for a GPU: one is attached, or a compile-only target is on."""
    return jax.default_backend() == "gpu" or TARGET.get() is not None


def device_kind() -> str | None:
    """The GPU model kernels compile for (`jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3").

    The compile-only target's while one is on, else the attached GPU's; None when kernels do not
    compile for a GPU.
    """
    target = TARGET.get()
    if target is not None:
        return target.device_kind
    return jax.devices()[0].device_kind if jax.default_backend() == "gpu" else None
