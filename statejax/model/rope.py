"""Rotary position embedding (half-split layout, as Hugging Face Llama/Qwen), with Llama-3
frequency scaling."""

import math

import jax.numpy as jnp
import numpy as np

from statejax.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[D/2] float32 inverse frequencies, Llama-3 scaled when `cfg.rope_scaling` is set."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_positions / s.low_freq_factor
        high_wavelen = s.original_max_positions / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions, inv_freq_half):
    """cos, sin of the rotation angles: positions [...] int, inv_freq [D/2] -> two float32
    [..., D/2]."""
    angles = (positions[..., None].astype(jnp.float32)
              * jnp.reshape(inv_freq_half, (1,) * positions.ndim + (-1,)))
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x, cos, sin):
    """x [..., D] rotated in HF's half-split layout, in float32, rounded to x's dtype; cos,
    sin broadcast against [..., D/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x_BxTxNxD, positions_BxT, inv_freq_half):
    """Rotates x by its positions. x: [B, T, N, D]; positions: [B, T] int; returns x's dtype."""
    cos, sin = rope_tables(positions_BxT, inv_freq_half)
    return rotate(x_BxTxNxD, cos[:, :, None, :], sin[:, :, None, :])
