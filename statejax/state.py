"""Session state: the persistent KV cells of a batch of session rows, as a pytree.

A token's position equals its cell index: cells fill contiguously from 0, so no position
array is stored. Cells at or beyond `lengths[b]` hold garbage that no step ever reads.
"""

import jax
import jax.numpy as jnp
from flax import struct

from statejax.model.config import ModelConfig


@struct.dataclass
class SessionState:
    """KV cells of B session rows.

    Attributes:
      k: [L, B, C, K, D] keys, RoPE already applied, in the model dtype.
      v: [L, B, C, K, D] values.
      lengths: [B] int32, cells in use per row (the data the row has seen).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        """C, the cells per row."""
        return self.k.shape[2]

    @property
    def rows(self) -> int:
        """B, the session rows."""
        return self.k.shape[1]


def init_state(cfg: ModelConfig, *, rows: int, cells: int) -> SessionState:
    """Empty session rows: [L, rows, cells, K, D] zero cells and zero lengths."""
    shape = (cfg.num_layers, rows, cells, cfg.num_kv_heads, cfg.head_dim)
    return SessionState(
        k=jnp.zeros(shape, cfg.jnp_dtype),
        v=jnp.zeros(shape, cfg.jnp_dtype),
        lengths=jnp.zeros((rows,), jnp.int32),
    )
