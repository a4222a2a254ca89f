"""Cache views: how one forward pass reads and writes KV cells.

The model calls `view.update_and_attend(layer, q, k, v)` in every layer and reads one declared
attribute, `one_qkv_buffer` (`View`); it knows nothing else about caching. Three views:

- `FullView`: no cache; plain causal attention over the T tokens (training, references).
- `AppendView`: writes the chunk into session cells [n, n+T) and attends to cells [0, n+t].
- `BranchView`: a query branch. Reads the session's cells [0, n) without writing them, and
  writes its own tokens to private branch cells (a first-token step: none; it attends to its
  tokens' new K and V where they are). The two parts are merged by log-sum-exp, so the shared
  cells are read once for many branches (cascade attention).

Padded tokens (beyond `num_new`) are written with `mode="drop"` at an out-of-range index, so
a padded chunk never touches a cell it does not own.

`impl` (static; `IMPLS`) selects the attention: "reference" runs `statejax.attention` here;
the kernel impls ("pallas", "pallas-mosaic") go to `statejax.kernels.dispatch`, which picks
kernel, backend and tiles. A failing kernel raises; nothing falls back.
"""

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from statejax import attention, platform
from statejax.attention import IMPLS

__all__ = ["IMPLS", "AppendView", "BranchView", "FullView", "View", "pallas_interpret"]

_KERNEL_IMPLS = IMPLS[1:]  # these go to `statejax.kernels.dispatch`


@runtime_checkable
class View(Protocol):
    """What the model may use of a view (every view of this module defines both).

    Attributes:
      one_qkv_buffer: True when the attention reads q, k and v side by side from one
        [B, T, H + 2K, D] buffer (its query heads, then K's, then V's): a layer that
        computes them in one kernel then writes them so and hands over slices of it.
    """

    one_qkv_buffer: bool

    def update_and_attend(self, layer: int, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        """Writes this layer's new K/V where the view keeps them and attends.

        Returns:
          (out_BxTxHxD in q's dtype, the view to hand to the next layer).
        """
        ...


def _check_impl(impl: str, allowed: tuple[str, ...] = ("reference",)):
    if impl not in allowed:
        raise ValueError(f"attention impl={impl!r}; allowed here: {allowed}")


def pallas_interpret() -> bool:
    """Whether the kernel impls run in Pallas interpret mode: unless compiling for a GPU
    (`statejax.kernels.dispatch.interpret`)."""
    return not platform.compiling_for_gpu()


def _dispatch():
    """`statejax.kernels.dispatch`, imported on first use: the reference path needs no
    Pallas, and a checkout on PYTHONPATH alone (no `statejax.kernels` mapping) still runs."""
    from statejax.kernels import dispatch  # noqa: PLC0415

    return dispatch


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


@struct.dataclass
class FullView:
    """No cache: causal self-attention over the step's own tokens."""

    impl: str = struct.field(pytree_node=False, default="reference")
    one_qkv_buffer = False  # q, k and v in three buffers

    def update_and_attend(self, layer, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        """Causal attention over the T tokens. Returns (out_BxTxHxD, self)."""
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
    one_qkv_buffer = False  # the chunk's K and V are written to cells first

    def positions(self, t: int):
        """[B, T] positions of the chunk's tokens."""
        return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    def update_and_attend(self, layer, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        """Writes the chunk's K/V [B, T, K, D] into cells [n, n + num_new) and attends over
        the window. Returns (out_BxTxHxD, the view holding the updated cells)."""
        _check_impl(self.impl, IMPLS)
        k = _scatter_rows(self.k, layer, self.lengths, self.num_new, k_BxTxKxD)
        v = _scatter_rows(self.v, layer, self.lengths, self.num_new, v_BxTxKxD)
        if self.impl in _KERNEL_IMPLS:
            out = _dispatch().append_cells(layer, q_BxTxHxD, k, v, self.lengths,
                                           window=self.window, impl=self.impl)
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
        its V heads: a layer's new K and V go in by one scatter. None: no private cells (a
        first-token step, branch_lengths zero): each branch attends causally to its own new
        K and V, which are written nowhere; with the kernels they travel in one buffer
        with q.
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
        """`View.one_qkv_buffer`: with the kernels and no branch cells, the attention reads
        q, k and v from one [R, T, H + 2K, D] buffer (XLA folds the slices handed over back
        into it; three buffers would cost one more kernel concatenating them)."""
        return self.branch_kv is None and self.impl in _KERNEL_IMPLS

    def positions(self, t: int):
        """[R, T] positions: branch tokens continue the session at n + branch length."""
        offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
        return self.shared_len + self.branch_lengths[:, None] + offsets

    def update_and_attend(self, layer, q_RxTxHxD, k_RxTxKxD, v_RxTxKxD):
        """Writes the branches' K/V [R, T, K, D] to their cells (if any) and attends to the
        session's cells [0, n) and their own. Returns (out_RxTxHxD, the updated view)."""
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
            out = _dispatch().branch_cells(
                layer, q_RxTxHxD, shared_k=self.shared_k, shared_v=self.shared_v, row=self.row,
                shared_len=self.shared_len, window=self.window, branch_kv=branch_kv,
                branch_lengths_R=self.branch_lengths, new_kv_RxTx2KxD=new_kv, impl=self.impl)
            return out, view

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
