"""Model building blocks against plain-numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from statejax.model.llama import Linear, RMSNorm


@pytest.mark.parametrize("features, in_axes, use_bias", [((24,), 1, False), ((3, 8), 1, True),
                                                         ((16,), 2, False)])
def test_linear_contracts_the_trailing_axes_with_an_out_in_weight(features, in_axes,
                                                                   use_bias):
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 6) if in_axes == 2 else (2, 5, 12))
    layer = Linear(features, in_axes=in_axes, use_bias=use_bias)
    params = layer.init(jax.random.key(1), x)["params"]
    weight = params["weight"]
    # PyTorch's layout: output axes first, then the input axes of x.
    assert weight.shape == (*features, *x.shape[x.ndim - in_axes:])
    if use_bias:
        params = {**params, "bias": jax.random.normal(jax.random.key(2), features)}
    got = layer.apply({"params": params}, x)
    flat_w = np.asarray(weight).reshape(int(np.prod(features)), -1)
    flat_x = np.asarray(x).reshape(*x.shape[:x.ndim - in_axes], -1)
    want = (flat_x @ flat_w.T).reshape(*x.shape[:x.ndim - in_axes], *features)
    if use_bias:
        want = want + np.asarray(params["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_linear_computes_in_its_dtype():
    x = jnp.ones((1, 3, 8), jnp.float32)
    layer = Linear((4,), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["weight"].dtype == jnp.float32
    assert layer.apply({"params": params}, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 8e-3)])
def test_rms_norm_normalises_in_float32_then_scales_in_its_dtype(dtype, rtol):
    """HF's order: x / rms(x) in float32, rounded to the dtype, times the scale."""
    x = (3 * jax.random.normal(jax.random.key(0), (2, 3, 64))).astype(dtype)
    scale = (1 + jax.random.normal(jax.random.key(1), (64,))).astype(dtype)
    got = RMSNorm(epsilon=1e-5, dtype=dtype, param_dtype=dtype).apply(
        {"params": {"scale": scale}}, x)
    assert got.dtype == dtype and got.shape == x.shape
    x32 = np.asarray(x, np.float32)
    normed = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
    want = np.asarray(jnp.asarray(normed, dtype) * scale[None, None], np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=rtol)
