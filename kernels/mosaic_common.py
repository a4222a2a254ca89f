"""What the Mosaic GPU (Hopper) kernels share: operand checks, tiles, paged TMA fetches.

Used by `append_attention_mgpu` and `decode_attention_mgpu`.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from statejax import platform
from statejax.errors import InputError

DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma operand types
# Shared-memory layout of wgmma operands (16-bit): 8 x 64 tiles, 128-byte swizzle.
TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
SMEM_LIMIT = 227 * 1024  # Hopper's per-block shared memory
_SMEM_ALIGN = 1024  # the lowering places each scratch buffer at a 1 KiB boundary
_REDUCTION_SCRATCH = 2048  # plgpu.CompilerParams.reduction_scratch_bytes (its default)
_BARRIER_BYTES = 8


def smem_bytes(buffers: list[int], barriers: int) -> int:
    """Shared memory of a kernel's scratch as the Mosaic GPU lowering allocates it: each
    buffer (bytes) rounded up to 1 KiB, the reduction scratch, 8 bytes a barrier.

    (The buffers alone undercount by 2-3 KB: default tiles that fit by that count failed to
    lower with "exceeds available shared memory"; tests lower the boundary cases.)"""
    aligned = sum(-(-b // _SMEM_ALIGN) * _SMEM_ALIGN for b in buffers)
    return aligned + _REDUCTION_SCRATCH + _BARRIER_BYTES * barriers


def validate_operands(q_BxTxHxD, page_size: int):
    """What the Mosaic kernels need of q and the pool beyond `paged_flash.validate_paged`."""
    d = q_BxTxHxD.shape[-1]
    if q_BxTxHxD.dtype not in DTYPES:
        raise InputError(f"the mosaic_gpu backend takes bfloat16 or float16, got "
                         f"{q_BxTxHxD.dtype}; use backend='triton' for float32")
    if d % 64 or d > 256:
        raise InputError(f"the mosaic_gpu backend needs a head dim that is a multiple of 64 "
                         f"and <= 256, got {d}")
    if page_size % 8 or page_size > 256:
        raise InputError(f"the mosaic_gpu backend needs a page size that is a multiple of 8 "
                         f"(tile rows) and <= 256 (a TMA box), got {page_size}")


def validate_tiles(bs, *, head_dim: int, itemsize: int, page_size: int, **smem_args):
    """block_k, slots and shared memory of a Mosaic tile set (`block_k`,
    `max_concurrent_steps`, `smem_bytes(head_dim, itemsize, **smem_args)`)."""
    if bs.block_k % 64 or bs.block_k % page_size:
        raise InputError(f"block_k={bs.block_k} must be a multiple of 64 and of page_size="
                         f"{page_size}")
    if bs.max_concurrent_steps < 2:
        raise InputError(f"max_concurrent_steps={bs.max_concurrent_steps} must be >= 2")
    if (smem := bs.smem_bytes(head_dim, itemsize, **smem_args)) > SMEM_LIMIT:
        raise InputError(f"tiles {bs} need {smem} bytes of shared memory at D={head_dim}; "
                         f"Hopper has {SMEM_LIMIT}")


def fetch_block(pt_ref, off_ref, row, step, src_ref, dst_smem, barrier, *, kv_head,
                page_size: int, pages_per_block: int):
    """TMA-copies KV block `step` of `row` (its pages, via the page table) into `dst_smem`
    [block_k, D]; every page's copy arrives on `barrier` (num_arrivals = pages_per_block).

    A page is its table entry plus the page offset `off_ref` [1] (a layer's first page in
    stacked cells: an operand, so the layers share one kernel), clamped into the pool (TMA
    takes the page index as is)."""
    last_page = src_ref.shape[0] - 1
    for p in range(pages_per_block):
        page = jnp.clip(pt_ref[row, step * pages_per_block + p] + off_ref[0], 0, last_page)
        plgpu.copy_gmem_to_smem(src_ref.at[page, pl.ds(0, page_size), kv_head],
                                dst_smem.at[pl.ds(p * page_size, page_size)], barrier)


def table_for_blocks(page_table_BxP, *, window: int, block_k: int, page_size: int):
    """Widens the table to whole KV blocks (`fetch_block` clamps the entries)."""
    need_pages = pl.cdiv(window, block_k) * (block_k // page_size)
    table = page_table_BxP
    if table.shape[1] < need_pages:
        table = jnp.pad(table, ((0, 0), (0, need_pages - table.shape[1])))
    return table


def page_offset_operand(page_offset: int):
    """The page offset as the kernels' [1] int32 operand."""
    return jnp.full((1,), page_offset, jnp.int32)


def check_device():
    """The Mosaic kernels compile for a Hopper GPU (attached or a compile-only target)."""
    if jax.default_backend() == "gpu":
        check_cuda_runtime()
    elif not platform.compiling_for_gpu():
        raise InputError("the mosaic_gpu backend compiles for a Hopper GPU and has no "
                         f"interpret mode here (default backend {jax.default_backend()!r}); "
                         "use backend='triton' with interpret=True on CPU")


def _bad_cuda_runtime() -> int | None:
    """The CUDA runtime version if its ptxas miscompiles masked FA3 kernels, else None."""
    from jax._src.lib import cuda_versions  # noqa: PLC0415 - None on CPU-only installs

    version = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    return version if version is not None and 12080 <= version < 12091 else None


def check_cuda_runtime():
    """Raises on CUDA runtimes whose ptxas miscompiles masked FA3 kernels (as JAX's FA3 does)."""
    if (version := _bad_cuda_runtime()) is not None:
        raise InputError(f"CUDA runtime {version}: ptxas 12.8.0-12.9.0 miscompiles the masked "
                         "FA3 loop (see jax's attention_mgpu); use backend='triton' or CUDA "
                         ">= 12.9.1")


def runs(*, itemsize: int, head_dim: int, page_size: int | None) -> bool:
    """Whether the Mosaic kernels take these operands (`validate_operands`: 16-bit, D a
    multiple of 64 up to 256, pages of 8k cells up to 256; None: any page size) on this
    CUDA runtime (`check_cuda_runtime`)."""
    pages_ok = page_size is None or (page_size % 8 == 0 and page_size <= 256)
    return (itemsize == 2 and head_dim % 64 == 0 and head_dim <= 256 and pages_ok
            and _bad_cuda_runtime() is None)


class KernelOps:
    """The few Mosaic GPU calls that jax 0.10's GPU interpreter cannot run, behind a switch.

    Compiled (`interpret=False`): register-layout hints and accumulation into an existing
    wgmma accumulator (`pl.run_state`). Interpreted: no layout hints (they change no value)
    and `acc + (a fresh accumulator)`, which is the same sum.
    """

    def __init__(self, interpret):
        """interpret: False (compile), True (the GPU interpreter) or the interpreter's own
        `InterpretGPUParams` (e.g. with its race detector on)."""
        self.interpret = interpret is not False
        self._params = None if isinstance(interpret, bool) else interpret

    def layout(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def iota(self, shape, dimension: int):
        """int32 iota along `dimension` in the wgmma accumulator's layout."""
        if self.interpret:
            return jax.lax.broadcasted_iota(jnp.int32, shape, dimension)
        return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

    def accumulate(self, acc, body):
        """acc + what `body(acc_ref)` wgmma-accumulates into a float32 accumulator."""
        if not self.interpret:
            return pl.run_state(body)(plgpu.ACC.init(acc))

        def fresh(acc_ref):
            body(acc_ref)
            return acc_ref[...]

        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

    def kernel_params(self) -> dict:
        """Extra arguments of `plgpu.kernel`: the GPU interpreter when interpreting."""
        if not self.interpret:
            return {}
        from jax._src.pallas.mosaic_gpu.interpret.params import (  # noqa: PLC0415
            InterpretGPUParams,
        )

        return {"interpret": self._params or InterpretGPUParams()}


def drain_releases(free_barriers, steps, slots: int):
    """Memory warpgroup epilogue: waits for the releases of the last `slots` steps.

    Its main loop waits for the release of step s only to refill the slot with step s + slots,
    so the last `slots` releases would go unobserved. Waiting for them keeps the barrier
    protocol exact (every waiter sees every phase, which the GPU interpreter checks); on the
    device it waits for consumers that finish before the kernel ends anyway.
    """
    @pl.loop(jnp.maximum(steps - slots, 0), steps)
    def _(step):
        slot = jax.lax.rem(step, jnp.int32(slots))
        for barrier in free_barriers:
            plgpu.barrier_wait(barrier.at[slot])
