"""Checks both importers' parity tests share: logits against a reference, chunked appends."""

import jax.numpy as jnp
import numpy as np

from statejax import steps
from statejax.state import init_state


def max_diff(a, b) -> float:
    """Largest |a - b|, both read as float32."""
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def chunked_append_diff(ckpt, tokens_BxT, ref_BxTxV, chunk: int = 16, cells: int = 64) -> float:
    """Largest |logits - ref| over `steps.append` of `tokens_BxT` in chunks of `chunk`
    tokens (the last one padded) into `cells` cells, at every position."""
    b, t = tokens_BxT.shape
    state = init_state(ckpt.cfg, rows=b, cells=cells)
    worst = 0.0
    for start in range(0, t, chunk):
        part = tokens_BxT[:, start:start + chunk]
        n = part.shape[1]
        padded = np.zeros((b, chunk), np.int32)
        padded[:, :n] = part
        state, logits = steps.append(ckpt.params, state, jnp.asarray(padded),
                                     jnp.full((b,), n, jnp.int32), cfg=ckpt.cfg,
                                     window=cells, all_logits=True)
        worst = max(worst, max_diff(logits[:, :n], ref_BxTxV[:, start:start + n]))
    return worst
