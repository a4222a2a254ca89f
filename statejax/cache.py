"""Cache views: how one forward pass reads and writes KV cells.

The model calls `view.update_and_attend(layer, q, k, v)` in every layer and knows nothing else
about caching, but for one optional hint: a view whose attention reads q, k and v side by side
from one buffer says so by a true `one_qkv_buffer` (`BranchView` without cells), and a layer
that computes them in one kernel then writes them so. Three views:

- `FullView`: no cache; plain causal attention over the T tokens (training, references).
- `AppendView`: writes the chunk into session cells [n, n+T) and attends to cells [0, n+t].
- `BranchView`: a query branch. Reads the session's cells [0, n) without writing them, and
  writes its own tokens to private branch cells (a first-token step: none; it attends to its
  tokens' new K and V where they are). The two parts are merged by log-sum-exp, so the shared
  cells could be read once for many branches (cascade attention).

Padded tokens (beyond `num_new`) are written with `mode="drop"` at an out-of-range index, so
a padded chunk never touches a cell it does not own.

Attention implementations (`impl`, static; `IMPLS`):
- "reference": `statejax.attention`, every view.
- "pallas": `AppendView`, `BranchView` by the kernels in `statejax.kernels`. They run in Pallas
  interpret mode unless they compile for a GPU (`statejax.platform.compiling_for_gpu()`:
  one is attached, or a compile-only target is on), and are compiled then (Triton lowering;
  the cascade's shared part on Mosaic GPU where measured faster, below). A chunk whose query
  rows leave the GPU short of programs over a long window (the decode kernel's split rule
  splits its cells, `SPLIT_APPEND_BLOCKS`) is appended by the decode kernel, split along
  the cells.
- "pallas-mosaic": as "pallas", but `AppendView` (ingestion) runs the Mosaic GPU append
  kernel: Hopper only, compiled only, bf16/f16 cells, D a multiple of 64. On an H100
  (2026-11-27, jax 0.11.2) it took 0.93 ms where the tuned Triton kernel took 1.49 ms
  (8 x 512 tokens over 8k cells, D = 128; docs/kernels.md).
With either kernel impl, `BranchView` (queries) runs the cascade kernel with its shared part on
the backend measured fastest for the call's shape on the GPU model compiled for
(`kernels/tuned/`, written by the kernel benchmark from tiles that matched the reference):
Triton unless that table says the Mosaic GPU shared part won.
A failing kernel raises (on CPU, "pallas-mosaic" raises); nothing falls back.
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from statejax import attention, platform


def _scatter_rows(cells_LxRxNxKxD, layer, start_R, num_new_R, new_RxTxKxD):
    """Writes new[r, t] to cells[layer, r, start[r] + t] for t < num_new[r]; drops the rest.

    One scatter into the stacked cells, so a donated buffer is updated in place (slicing out
    the layer first would copy all of its cells every step).
    """
    rows, n_cells = cells_LxRxNxKxD.shape[1:3]
    t = new_RxTxKxD.shape[1]
    offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
    idx_RxT = jnp.where(offsets < num_new_R[:, None], start_R[:, None] + offsets, n_cells)
    row_RxT = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], idx_RxT.shape)
    return cells_LxRxNxKxD.at[layer, row_RxT, idx_RxT].set(
        new_RxTxKxD.astype(cells_LxRxNxKxD.dtype), mode="drop")


IMPLS = ("reference", "pallas", "pallas-mosaic")
_KERNEL_IMPLS = IMPLS[1:]  # the views with kernels take these


def _check_impl(impl: str, allowed: tuple[str, ...] = ("reference",)):
    if impl not in allowed:
        raise ValueError(f"attention impl={impl!r}; allowed here: {allowed}")


def pallas_interpret() -> bool:
    """impl="pallas" runs the kernels in interpret mode unless they compile for a GPU."""
    return not platform.compiling_for_gpu()


# The kernels are imported on first use: the reference path needs no Pallas, and a checkout run
# with only PYTHONPATH (no install mapping `kernels/` to `statejax.kernels`) still works.


# A chunk over at least this many KV blocks of cells (8k cells at 128-cell steps) is split
# along them (`_pallas_append`). The unsplit append kernel gives a chunk one program per (row,
# kv-head, query tile), 8 for a 32-token chunk of the 1B shape, each reading every cell in
# turn: on an H200 it took 0.80 ms over 32k cells, twice the XLA reference's 0.39 ms in the
# same run (bench of 2026-11-26, jax 0.11.2, pipelined calls); the decode kernel, split, took
# 0.091 ms on that shape in another run (T = 32; 2026-12-04, device time of chained calls).
# In the stream study (H200, 2026-12-04) an appended bar took 0.90, 1.1, 2.2 and 3.5 ms at
# 1k, 4k, 16k and 32k cells: attention became most of it between 4k and 16k. Below that the
# split's merge (three XLA kernels a layer, its float32 partials written and read) would
# cost about what it saves: an estimate, no shorter window was timed both ways.
SPLIT_APPEND_BLOCKS = 64


def _pallas_append(layer, q_BxTxHxD, k_LxBxCxKxD, v_LxBxCxKxD, lengths_B, window, impl):
    """AppendView attention over the cells (chunk already written): `append_attention`, or
    with "pallas" over a window of at least `SPLIT_APPEND_BLOCKS` KV blocks that the decode
    rule splits, the decode kernel, split along the cells (flash-decoding with a causal
    tail; its partials merged in float32)."""
    from statejax.kernels import append_attention, decode_attention

    if impl == "pallas-mosaic":  # compiled only: raises where no Hopper GPU compiles it
        backend, interpret = "mosaic_gpu", False
    else:
        backend, interpret = "triton", pallas_interpret()
        b, t, h, d = q_BxTxHxD.shape
        k_heads, cells = k_LxBxCxKxD.shape[-2], k_LxBxCxKxD.shape[-3]
        split = decode_attention.default_block_sizes(
            batch=b, rows=t * (h // k_heads), k_heads=k_heads, head_dim=d,
            page_size=append_attention.cells_page_size(cells, 16), window=window,
            itemsize=q_BxTxHxD.dtype.itemsize)
        if split.num_splits > 1 and -(-window // split.block_k) >= SPLIT_APPEND_BLOCKS:
            out, _ = decode_attention.decode_attention_cells(
                q_BxTxHxD, k_LxBxCxKxD, v_LxBxCxKxD, lengths_B, layer=layer, window=window,
                block_sizes=split, interpret=interpret)
            return out
    out, _ = append_attention.append_attention_cells(
        q_BxTxHxD, k_LxBxCxKxD, v_LxBxCxKxD, lengths_B, layer=layer, window=window,
        interpret=interpret, backend=backend)
    return out


def _pallas_branch(layer, q_RxTxHxD, view, branch_kv, new_kv):
    """BranchView attention by `cascade_attention`: shared cells read once for all branches,
    the private K and V heads from the branch cells, or (no cells: a first-token step) from
    one q/k/v buffer that one fusion writes."""
    from statejax.kernels import cascade_attention

    attend = functools.partial(
        cascade_attention.cascade_attention_cells, shared_k=view.shared_k,
        shared_v=view.shared_v, row=view.row, shared_len=view.shared_len, layer=layer,
        shared_window=view.window, interpret=pallas_interpret(), backend=None)
    if branch_kv is None:
        qkv = jnp.concatenate([q_RxTxHxD, new_kv.astype(q_RxTxHxD.dtype)], axis=2)
        out, _ = attend(qkv, branch_k=None, branch_v=None, branch_lengths_R=None,
                        q_heads=q_RxTxHxD.shape[2])
    else:
        out, _ = attend(q_RxTxHxD, branch_k=branch_kv, branch_v=None,
                        branch_lengths_R=view.branch_lengths)
    return out


@struct.dataclass
class FullView:
    """No cache: causal self-attention over the step's own tokens."""

    impl: str = struct.field(pytree_node=False, default="reference")

    def update_and_attend(self, layer, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        del layer
        _check_impl(self.impl)
        t = q_BxTxHxD.shape[1]
        causal_TxT = jnp.tril(jnp.ones((t, t), bool))
        mask = jnp.broadcast_to(causal_TxT, (q_BxTxHxD.shape[0], t, t))
        out, _ = attention.attend(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask)
        return out, self


@struct.dataclass
class AppendView:
    """Appends a chunk to B session rows and attends over a static window of cells.

    Attributes:
      k, v: [L, B, C, K, D] session cells (updated in place when the step donates them).
      lengths: [B] int32 cells in use before this chunk.
      num_new: [B] int32 valid tokens of the chunk per row (the rest is padding).
      window: static S <= C; every row must satisfy lengths + num_new <= S.
      impl: attention implementation.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    num_new: jax.Array
    window: int = struct.field(pytree_node=False)
    impl: str = struct.field(pytree_node=False, default="reference")

    def positions(self, t: int):
        """[B, T] positions of the chunk's tokens."""
        return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    def update_and_attend(self, layer, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        _check_impl(self.impl, IMPLS)
        k = _scatter_rows(self.k, layer, self.lengths, self.num_new, k_BxTxKxD)
        v = _scatter_rows(self.v, layer, self.lengths, self.num_new, v_BxTxKxD)
        if self.impl in _KERNEL_IMPLS:
            out = _pallas_append(layer, q_BxTxHxD, k, v, self.lengths, self.window, self.impl)
            return out, self.replace(k=k, v=v)
        t = q_BxTxHxD.shape[1]
        q_pos_BxT = self.positions(t)
        key_pos_S = jnp.arange(self.window, dtype=jnp.int32)
        mask_BxTxS = key_pos_S[None, None, :] <= q_pos_BxT[:, :, None]
        out, _ = attention.attend(q_BxTxHxD, k[layer, :, : self.window],
                                  v[layer, :, : self.window], mask_BxTxS)
        return out, self.replace(k=k, v=v)


@struct.dataclass
class BranchView:
    """R query branches of one session row: read shared cells, write private branch cells.

    Attributes:
      shared_k, shared_v: [L, B, C, K, D] session cells, read only.
      row: int32 scalar, the session row the branches extend.
      shared_len: int32 scalar, n = that row's length (cells [0, n) are attended).
      branch_kv: [L, R, Tb, 2K, D] private cells of the branches, each cell's K heads then
        its V heads: a layer's new K and V go in by one scatter (two buffers took two
        kernels a layer, compiled for an H100). None: no private cells (a first-token
        step, branch_lengths zero): each branch attends causally to its own new K and V,
        which are written nowhere; with the kernels they travel in one buffer with q.
      branch_lengths: [R] int32 private cells in use before this step.
      num_new: [R] int32 valid tokens this step per branch.
      window: static S <= C with n <= S.
      impl: attention implementation.
    """

    shared_k: jax.Array
    shared_v: jax.Array
    row: jax.Array
    shared_len: jax.Array
    branch_kv: jax.Array | None
    branch_lengths: jax.Array
    num_new: jax.Array
    window: int = struct.field(pytree_node=False)
    impl: str = struct.field(pytree_node=False, default="reference")

    @property
    def one_qkv_buffer(self) -> bool:
        """Whether the attention reads q, k and v from one [R, T, H + 2K, D] buffer (kernels,
        no branch cells): a layer that computes them in one kernel should write them so,
        side by side, and hand over slices of it (XLA folds their concatenation back into
        the buffer); three buffers would be one more kernel concatenating them."""
        return self.branch_kv is None and self.impl in _KERNEL_IMPLS

    def positions(self, t: int):
        """[R, T] positions: branch tokens continue the session at n + branch length."""
        offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
        return self.shared_len + self.branch_lengths[:, None] + offsets

    def update_and_attend(self, layer, q_RxTxHxD, k_RxTxKxD, v_RxTxKxD):
        _check_impl(self.impl, IMPLS)
        r, t = q_RxTxHxD.shape[:2]
        k_heads = k_RxTxKxD.shape[2]
        new_kv = jnp.concatenate([k_RxTxKxD, v_RxTxKxD], axis=2)
        if self.branch_kv is None:
            branch_kv, view = None, self
        else:
            branch_kv = _scatter_rows(self.branch_kv, layer, self.branch_lengths, self.num_new,
                                      new_kv)
            view = self.replace(branch_kv=branch_kv)
        if self.impl in _KERNEL_IMPLS:
            return _pallas_branch(layer, q_RxTxHxD, self, branch_kv, new_kv), view

        # Shared part: every branch sees the same cells [0, n) of the session row.
        shared_k_SxKxD = self.shared_k[layer, self.row, : self.window]
        shared_v_SxKxD = self.shared_v[layer, self.row, : self.window]
        shared_mask_S = jnp.arange(self.window, dtype=jnp.int32) < self.shared_len
        # Fold the R branches into the query axis: one pass over the shared cells for all.
        q_1xRTxHxD = q_RxTxHxD.reshape(1, r * t, *q_RxTxHxD.shape[2:])
        shared_mask = jnp.broadcast_to(shared_mask_S, (1, r * t, self.window))
        out_s, lse_s = attention.attend(q_1xRTxHxD, shared_k_SxKxD[None], shared_v_SxKxD[None],
                                        shared_mask)
        out_s = out_s.reshape(q_RxTxHxD.shape)
        lse_s = lse_s.reshape(r, t, -1)

        # Private part: causal over the branch's own cells.
        private_kv = new_kv if branch_kv is None else branch_kv[layer]
        tb = private_kv.shape[1]
        q_idx_RxT = self.branch_lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        private_mask = jnp.arange(tb, dtype=jnp.int32)[None, None, :] <= q_idx_RxT[:, :, None]
        out_p, lse_p = attention.attend(q_RxTxHxD, private_kv[:, :, :k_heads],
                                        private_kv[:, :, k_heads:], private_mask)
        out, _ = attention.merge_partials(out_s, lse_s, out_p, lse_p)
        return out, view
