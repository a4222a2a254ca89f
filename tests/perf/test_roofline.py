"""Timing helpers: chained calls stay separate calls, and the per-call difference."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from statejax.model.config import preset
from statejax.perf import roofline


def _step(x_BxD, w_DxD):
    """Shaped like attention: (out shaped like x, a second output)."""
    out = jnp.tanh(x_BxD @ w_DxD)
    return out, out.sum()


def test_chained_calls_are_all_kept_and_feed_each_other():
    x = jax.random.normal(jax.random.key(0), (4, 8), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (8, 8), jnp.float32)
    hlo = roofline.chained(_step, 5).lower(x, w).compile().as_text()
    assert hlo.count(" dot(") == 5  # neither merged nor hoisted
    want = np.asarray(x)
    for _ in range(5):
        want = np.tanh(want @ np.asarray(w))
    np.testing.assert_allclose(roofline.chained(_step, 5)(x, w), want, rtol=1e-5, atol=1e-5)


def test_chained_output_takes_the_input_shape_and_dtype():
    x = jnp.ones((2, 1, 4), jnp.bfloat16)
    out = roofline.chained(lambda q: (q[:, 0].astype(jnp.float32) * 2, None), 3)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), 8.0)


def test_device_seconds_per_call_is_the_difference(monkeypatch):
    medians = iter([9e-3, 2e-3])  # `calls` chained calls, then one call
    monkeypatch.setattr(roofline, "median_seconds", lambda *a, **k: next(medians))
    got = roofline.device_seconds_per_call(_step, 1.0, calls=8, warmup=0, repeats=1)
    assert got == pytest.approx((9e-3 - 2e-3) / 7)


def test_device_seconds_below_resolution_raise(monkeypatch):
    monkeypatch.setattr(roofline, "median_seconds", lambda *a, **k: 1e-3)
    with pytest.raises(roofline.BelowResolution, match="below the timing's resolution"):
        roofline.device_seconds_per_call(_step, 1.0, calls=4, warmup=0, repeats=1)
    with pytest.raises(ValueError, match="need >= 2"):
        roofline.device_seconds_per_call(_step, 1.0, calls=1, warmup=0, repeats=1)


def test_device_seconds_of_a_real_program_are_positive():
    """A dot chain big enough that 16 of them clearly outlast one, on any machine."""
    x = jax.random.normal(jax.random.key(0), (512, 512), jnp.float32)
    per_call = roofline.device_seconds_per_call(_step, x, x, calls=16, warmup=1, repeats=3)
    assert 0 < per_call < 1.0




def test_the_floor_reads_only_the_gathered_rows_of_an_untied_embedding():
    """A step gathers T rows of an input embedding table; a tied table is read whole by the
    logits anyway, an untied one is not (Llama-3.1-8B: 1.05 GB it need not move)."""
    tied, untied = preset("llama-3.2-1b", dtype="bfloat16"), preset("llama-3.1-8b")
    assert tied.step_weight_bytes(32) == tied.weight_bytes
    row = untied.embed_dim * untied.jnp_dtype.itemsize
    assert untied.step_weight_bytes(32) == untied.weight_bytes - (untied.vocab_size - 32) * row
    assert untied.weight_bytes - untied.step_weight_bytes(32) > 1.0e9
    assert untied.step_weight_bytes(10**6) == untied.weight_bytes  # every row gathered
    floor = roofline.query_floor_ms(untied, 1000, 32, copy_bytes_per_s=1e12)
    assert floor == pytest.approx(1e3 * (untied.step_weight_bytes(32)
                                         + 1032 * untied.kv_bytes_per_token) / 1e12)
