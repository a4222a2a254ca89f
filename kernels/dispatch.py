"""Kernel dispatch: which implementation, backend and tiles each attention call site runs.

The call sites are the cache views (`statejax.cache`): ingestion (`AppendView`) and queries
(`BranchView`). For each, one function here takes the view's `impl` (`IMPLS`) and returns the
attention output:

- "reference": never reaches here (the views call `statejax.attention` themselves);
- "pallas": Triton kernels, in interpret mode unless compiling for a GPU (`interpret`);
  ingestion by the append kernel, or, where its rows leave the GPU short of programs over a
  long window, by the decode kernel split along the cells (`plan_append`); queries by the
  cascade kernel, its shared part on the backend the GPU model's measured table names
  (`plan_branch`);
- "pallas-mosaic": as "pallas", but ingestion on the Hopper append kernel (compiled only).

The paged wrappers `append_attention` / `decode_attention` (and their `_cells` forms) choose
between the portable Triton kernels and their Hopper variants by `backend`: the Mosaic modules
are imported here, never by the portable ones. An unknown impl or backend raises; a failing
kernel raises; nothing falls back.
"""

import dataclasses
import functools

import jax.numpy as jnp

from statejax import attention, platform
from statejax.errors import InputError

from . import append_attention as aa
from . import append_attention_mgpu as amg
from . import cascade_attention as ca
from . import decode_attention as da
from . import decode_attention_mgpu as dm
from . import paged_flash as pf

IMPLS = attention.IMPLS
KERNEL_IMPLS = IMPLS[1:]  # the impls that run kernels
PAGED_BACKENDS = ("triton", "mosaic_gpu")  # append and decode have a Hopper variant
# A chunk over at least this many KV blocks of cells whose decode tiles split is appended
# by the split decode kernel: shorter windows would pay the split's merge for little gain
# (docs/kernels.md, "Long appends").
SPLIT_APPEND_BLOCKS = 64


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS):
    """Raises InputError unless `impl` is one of `allowed`."""
    if impl not in allowed:
        raise InputError(f"attention impl={impl!r}; allowed here: {allowed}")


def interpret() -> bool:
    """Whether the kernel impls run in Pallas interpret mode: unless compiling for a GPU."""
    return not platform.compiling_for_gpu()


@dataclasses.dataclass(frozen=True)
class AppendPlan:
    """How an `AppendView` chunk is attended.

    Attributes:
      kernel: "append" (one program per row, kv-head and query tile) or "decode" (the decode
        kernel, split along the cells).
      backend: "triton" or "mosaic_gpu".
      interpret: run in the Pallas interpreter.
      block_sizes: the decode kernel's split tiles; None: the append kernel's defaults.
    """

    kernel: str
    backend: str
    interpret: bool
    block_sizes: pf.BlockSizes | None = None


def plan_append(impl: str, *, batch: int, tokens: int, heads: int, k_heads: int,
                head_dim: int, cells: int, window: int, itemsize: int) -> AppendPlan:
    """The kernel, backend and tiles of a B x T chunk over C contiguous cells (window S).

    "pallas-mosaic" runs the Hopper append kernel (compiled). "pallas" runs the Triton append
    kernel, unless the decode kernel's tiles for these rows split the window and it spans at
    least `SPLIT_APPEND_BLOCKS` of their KV blocks: then the split decode kernel.
    """
    check_impl(impl, KERNEL_IMPLS)
    if impl == "pallas-mosaic":
        return AppendPlan("append", "mosaic_gpu", interpret=False)
    split = da.default_block_sizes(
        batch=batch, rows=tokens * (heads // k_heads), k_heads=k_heads, head_dim=head_dim,
        page_size=pf.cells_page_size(cells, 16), window=window, itemsize=itemsize)
    if split.num_splits > 1 and -(-window // split.block_k) >= SPLIT_APPEND_BLOCKS:
        return AppendPlan("decode", "triton", interpret(), split)
    return AppendPlan("append", "triton", interpret())


def append_cells(layer: int, q_BxTxHxD, k_LxBxCxKxD, v_LxBxCxKxD, lengths_B, *, window: int,
                 impl: str):
    """`AppendView` attention over session cells that already hold the chunk.

    Args:
      layer: static layer index into the stacked cells.
      q_BxTxHxD: the chunk's queries (RoPE applied).
      k_LxBxCxKxD, v_LxBxCxKxD: session cells.
      lengths_B: int32 cells in use before the chunk.
      window: static S <= C.
      impl: "pallas" or "pallas-mosaic".

    Returns:
      out_BxTxHxD in q's dtype.
    """
    b, t, h, d = q_BxTxHxD.shape
    plan = plan_append(impl, batch=b, tokens=t, heads=h, k_heads=k_LxBxCxKxD.shape[-2],
                       head_dim=d, cells=k_LxBxCxKxD.shape[-3], window=window,
                       itemsize=q_BxTxHxD.dtype.itemsize)
    fn = decode_attention_cells if plan.kernel == "decode" else append_attention_cells
    out, _ = fn(q_BxTxHxD, k_LxBxCxKxD, v_LxBxCxKxD, lengths_B, layer=layer, window=window,
                block_sizes=plan.block_sizes, interpret=plan.interpret, backend=plan.backend)
    return out


@dataclasses.dataclass(frozen=True)
class BranchPlan:
    """How a `BranchView` step is attended (the cascade kernel).

    Attributes:
      backend: the shared part's backend, "triton" or "mosaic_gpu".
      interpret: run in the Pallas interpreter.
      block_sizes: `cascade_attention.BlockSizes` (shared part of `backend`'s type).
    """

    backend: str
    interpret: bool
    block_sizes: ca.BlockSizes


def plan_branch(impl: str, *, branches: int, tokens: int, heads: int, k_heads: int,
                head_dim: int, cells: int, branch_cells: int, window: int,
                itemsize: int) -> BranchPlan:
    """The backend and tiles of R x T branch tokens over C session cells (window S) and Tb
    branch cells (T where the branches have none: their K/V come in q's buffer).

    Both kernel impls: the tiles measured fastest for the shape on the GPU model compiled for,
    of the backends that can run it (`cascade_attention.measured_backends`: the Mosaic GPU
    shared part only compiled), else the Triton rule.
    """
    check_impl(impl, KERNEL_IMPLS)
    interp = interpret()
    tiles = ca.BlockSizes.for_cells(
        branches=branches, tokens=tokens, group=heads // k_heads, k_heads=k_heads,
        head_dim=head_dim, cells=cells, branch_cells=branch_cells, shared_window=window,
        itemsize=itemsize, backend=None, interpret=interp)
    backend = ("mosaic_gpu" if isinstance(tiles.shared, dm.MosaicDecodeBlockSizes)
               else "triton")
    return BranchPlan(backend, interp, tiles)


def branch_cells(layer: int, q_RxTxHxD, *, shared_k, shared_v, row, shared_len,
                 window: int, branch_kv, branch_lengths_R, new_kv_RxTx2KxD, impl: str):
    """`BranchView` attention by the cascade kernel: the session's cells read once for all R
    branches, then each branch's own.

    Args:
      layer: static layer index.
      q_RxTxHxD: the branches' queries.
      shared_k, shared_v: [L, B, C, K, D] session cells; row, shared_len: int32 scalars.
      window: static S <= C.
      branch_kv: [L, R, Tb, 2K, D] branch cells (K heads, then V heads) holding this step's
        tokens, or None (a first-token step): the private keys are `new_kv_RxTx2KxD`,
        handed over in one q/k/v buffer.
      branch_lengths_R: int32 branch cells in use before this step.
      new_kv_RxTx2KxD: this step's K and V heads.
      impl: "pallas" or "pallas-mosaic" (the same here: `plan_branch`).

    Returns:
      out_RxTxHxD in q's dtype.
    """
    r, t, h, d = q_RxTxHxD.shape
    plan = plan_branch(impl, branches=r, tokens=t, heads=h, k_heads=shared_k.shape[-2],
                       head_dim=d, cells=shared_k.shape[-3],
                       branch_cells=t if branch_kv is None else branch_kv.shape[-3],
                       window=window, itemsize=q_RxTxHxD.dtype.itemsize)
    attend = functools.partial(
        ca.cascade_attention_cells, shared_k=shared_k, shared_v=shared_v, row=row,
        shared_len=shared_len, layer=layer, shared_window=window, interpret=plan.interpret,
        backend=plan.backend, block_sizes=plan.block_sizes)
    if branch_kv is None:
        qkv = jnp.concatenate([q_RxTxHxD, new_kv_RxTx2KxD.astype(q_RxTxHxD.dtype)], axis=2)
        out, _ = attend(qkv, branch_k=None, branch_v=None, branch_lengths_R=None,
                        q_heads=q_RxTxHxD.shape[2])
    else:
        out, _ = attend(q_RxTxHxD, branch_k=branch_kv, branch_v=None,
                        branch_lengths_R=branch_lengths_R)
    return out


def _paged_backend(backend: str, interpret: bool, poison_outputs: bool, block_sizes,
                   mosaic_tiles: type, kind: str):
    """Raises unless `backend` is a paged backend the call can run on."""
    if backend not in PAGED_BACKENDS:
        raise InputError(f"backend={backend!r}; allowed for {kind}: {PAGED_BACKENDS}")
    if backend != "mosaic_gpu":
        return
    if interpret or poison_outputs:
        raise InputError("backend='mosaic_gpu' runs compiled only (interpret=False) and has "
                         "no poison_outputs hook; use backend='triton' for those")
    if block_sizes is not None and not isinstance(block_sizes, mosaic_tiles):
        raise InputError(f"backend='mosaic_gpu' takes {mosaic_tiles.__name__}, got "
                         f"{block_sizes}")


def append_attention(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                     window: int | None = None, block_sizes=None, interpret: bool,
                     backend: str = "triton", page_offset: int = 0,
                     poison_outputs: bool = False, contiguous_pages: bool = False):
    """`append_attention.append_attention` on `backend` "triton" or "mosaic_gpu"
    (`append_attention_mgpu`: Hopper, bf16/f16, compiled only, `MosaicBlockSizes`).

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32.
    """
    pf.check_page_offset(page_offset)
    _paged_backend(backend, interpret, poison_outputs, block_sizes, amg.MosaicBlockSizes,
                   "append")
    if backend == "mosaic_gpu":
        return amg.append_attention_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP,
                                         lengths_B, window=window, block_sizes=block_sizes,
                                         page_offset=page_offset)
    return aa.append_attention(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B,
                               window=window, block_sizes=block_sizes, interpret=interpret,
                               page_offset=page_offset, poison_outputs=poison_outputs,
                               contiguous_pages=contiguous_pages)


def decode_attention(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B, *,
                     window: int | None = None, block_sizes=None, interpret: bool,
                     backend: str = "triton", page_offset: int = 0,
                     poison_outputs: bool = False, contiguous_pages: bool = False):
    """`decode_attention.decode_attention` on `backend` "triton" or "mosaic_gpu"
    (`decode_attention_mgpu`: Hopper, bf16/f16, T x H / K <= 128, compiled only,
    `MosaicDecodeBlockSizes`).

    Returns:
      out_BxTxHxD in q's dtype, lse_BxTxH float32.
    """
    pf.check_page_offset(page_offset)
    _paged_backend(backend, interpret, poison_outputs, block_sizes, dm.MosaicDecodeBlockSizes,
                   "decode")
    if backend == "mosaic_gpu":
        return dm.decode_attention_mgpu(q_BxTxHxD, k_pool, v_pool, page_table_BxP,
                                        lengths_B, window=window, block_sizes=block_sizes,
                                        page_offset=page_offset)
    return da.decode_attention(q_BxTxHxD, k_pool, v_pool, page_table_BxP, lengths_B,
                               window=window, block_sizes=block_sizes, interpret=interpret,
                               page_offset=page_offset, poison_outputs=poison_outputs,
                               contiguous_pages=contiguous_pages)


def append_attention_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
                           window: int, block_sizes=None, interpret: bool,
                           backend: str = "triton"):
    """`append_attention.append_attention_cells` on `backend` "triton" or "mosaic_gpu"
    (`append_attention_mgpu.append_attention_mgpu_cells`).

    Returns:
      out_BxTxHxD, lse_BxTxH.
    """
    _paged_backend(backend, interpret, False, block_sizes, amg.MosaicBlockSizes, "append")
    if backend == "mosaic_gpu":
        return amg.append_attention_mgpu_cells(q_BxTxHxD, k_cells, v_cells, lengths_B,
                                               layer=layer, window=window,
                                               block_sizes=block_sizes)
    return aa.append_attention_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, layer=layer,
                                     window=window, block_sizes=block_sizes,
                                     interpret=interpret)


def decode_attention_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, *, layer: int | None,
                           window: int, block_sizes=None, interpret: bool,
                           backend: str = "triton"):
    """`decode_attention.decode_attention_cells` on `backend` "triton" or "mosaic_gpu"
    (`decode_attention_mgpu.decode_attention_mgpu_cells`).

    Returns:
      out_BxTxHxD, lse_BxTxH.
    """
    _paged_backend(backend, interpret, False, block_sizes, dm.MosaicDecodeBlockSizes,
                   "decode")
    if backend == "mosaic_gpu":
        return dm.decode_attention_mgpu_cells(q_BxTxHxD, k_cells, v_cells, lengths_B,
                                              layer=layer, window=window,
                                              block_sizes=block_sizes)
    return da.decode_attention_cells(q_BxTxHxD, k_cells, v_cells, lengths_B, layer=layer,
                                     window=window, block_sizes=block_sizes,
                                     interpret=interpret)
