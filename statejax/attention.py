"""The attention contract and its pure-JAX reference.

Every implementation computes, for queries q and a set of keys/values selected by a boolean
mask, softmax(q k^T / sqrt(D)) v with grouped-query heads, and also returns the log-sum-exp of
the scores so that attention over disjoint key sets can be merged exactly (`merge_partials`).
That is how a branch attends to its session's shared cells and to its own private cells.

The reference is the specification: the Pallas kernels (`statejax.kernels`) are tested
against it. Which implementation runs is explicit (`IMPLS`, chosen per call site by
`statejax.kernels.dispatch`); a failing kernel raises, nothing falls back to the reference.
"""

import jax.numpy as jnp

# Finite stand-in for -inf: a fully masked row stays finite and merges with weight zero.
MASK_VALUE = -1e30
# Attention implementations: this module's reference, the Pallas kernels (Triton lowering,
# interpret mode on CPU), and the same with ingestion on the Hopper (Mosaic GPU) kernel.
IMPLS = ("reference", "pallas", "pallas-mosaic")


def attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS):
    """Grouped-query attention over the keys selected by `mask`.

    Args:
      q_BxTxHxD: queries (already RoPE-rotated).
      k_BxSxKxD, v_BxSxKxD: keys and values; H must be a multiple of K.
      mask_BxTxS: True where query t may attend to key s.

    Returns:
      out_BxTxHxD in q's dtype, and lse_BxTxH (float32 log-sum-exp of the scaled scores).
    """
    b, t, h, d = q_BxTxHxD.shape
    k_heads = k_BxSxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k_heads, h // k_heads, d)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * (d**-0.5)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, MASK_VALUE)
    # One exp pass: normalise after the value product (this elementwise work, not the
    # matmuls, dominates attention on CPU).
    max_BxKxGxT = jnp.max(scores, axis=-1)
    probs = jnp.exp(scores - max_BxKxGxT[..., None])
    sum_BxKxGxT = jnp.sum(probs, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                     preferred_element_type=jnp.float32)
    out = out / jnp.moveaxis(sum_BxKxGxT, -1, 1)[..., None]
    lse_BxKxGxT = max_BxKxGxT + jnp.log(sum_BxKxGxT)
    lse_BxTxH = jnp.moveaxis(lse_BxKxGxT, -1, 1).reshape(b, t, h)
    return out.reshape(b, t, h, d).astype(q_BxTxHxD.dtype), lse_BxTxH


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exactly combines attention over two disjoint key sets.

    Args:
      out_a, out_b: [..., H, D] partial outputs, each normalised over its own keys.
      lse_a, lse_b: [..., H] their float32 log-sum-exps.

    Returns:
      ([..., H, D] output over the union of keys, [..., H] its log-sum-exp).
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    w_a = jnp.exp(lse_a - lse)[..., None]
    w_b = jnp.exp(lse_b - lse)[..., None]
    out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
    return out.astype(out_a.dtype), lse
