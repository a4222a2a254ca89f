"""Model shapes: one frozen `ModelConfig` per decoder, and named presets.

Presets give real shapes (random weights, for latency work) and tiny shapes (tests, CPU runs).
"""

import dataclasses

import jax.numpy as jnp

from statejax.errors import InputError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a Llama-family decoder (Llama 3.x, Qwen2.5, Qwen3).

    Attributes:
      name: preset name, used in results.
      vocab_size: V.
      num_layers: L.
      embed_dim: E, the residual width.
      num_heads: H query heads.
      num_kv_heads: K key/value heads; H % K == 0 (grouped-query attention).
      head_dim: D.
      mlp_dim: F, the SwiGLU hidden width.
      rope_theta: RoPE base.
      rope_scaling: Llama-3 frequency scaling, or None.
      rms_eps: RMSNorm epsilon.
      tie_embeddings: output projection reuses the input embedding.
      qkv_bias: bias on q/k/v projections (Qwen2.5).
      qk_norm: RMSNorm on q and k per head before RoPE (Qwen3).
      dtype: parameter and activation dtype name ("float32" | "bfloat16"); softmax, norms
        and logits are computed in float32.
    """

    name: str
    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise InputError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention)"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"dtype={self.dtype!r}; allowed: 'float32', 'bfloat16'")

    @property
    def jnp_dtype(self):
        """`dtype` as a jnp dtype (weights, activations and the KV cache)."""
        return jnp.dtype(self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one cached token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.jnp_dtype.itemsize

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        e, d = self.embed_dim, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        per_layer = attn + 3 * e * self.mlp_dim + 2 * e
        embed = self.vocab_size * e * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + e

    @property
    def weight_bytes(self) -> int:
        """Bytes of all parameters in `dtype` (`num_params` of them)."""
        return self.num_params * self.jnp_dtype.itemsize

    def step_weight_bytes(self, tokens: int) -> int:
        """Weight bytes a step of `tokens` new tokens must read: every weight once, except
        that an untied input embedding table is only gathered (`tokens` rows of it); a tied
        one is read whole by the next-token logits anyway."""
        if self.tie_embeddings:
            return self.weight_bytes
        unread_rows = self.vocab_size - min(tokens, self.vocab_size)
        return self.weight_bytes - unread_rows * self.embed_dim * self.jnp_dtype.itemsize

    def replace(self, **changes) -> "ModelConfig":
        """A copy with the named fields changed (the config is frozen)."""
        return dataclasses.replace(self, **changes)


_LLAMA31_SCALING = RopeScaling(8.0, 1.0, 4.0, 8192)
_LLAMA32_SCALING = RopeScaling(32.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    # Tests: a few hundred kB, compiles in about a second on CPU.
    "tiny": ModelConfig("tiny", vocab_size=512, num_layers=2, embed_dim=64, num_heads=4,
                        num_kv_heads=2, head_dim=16, mlp_dim=128,
                        rope_scaling=_LLAMA32_SCALING),
    # CPU latency studies. Shaped like Llama-3.1-8B in the two ratios that set query cost:
    # weights = KV of ~100k cached tokens (8B: ~120k), and attention FLOPs per query token
    # equal weight FLOPs at ~26k cached tokens (8B: ~30k). A 32-token query is compute-bound
    # on a CPU, so the second ratio decides how latency grows with context.
    "cpu-small": ModelConfig("cpu-small", vocab_size=512, num_layers=2, embed_dim=1024,
                             num_heads=4, num_kv_heads=1, head_dim=64, mlp_dim=4096,
                             rope_scaling=_LLAMA32_SCALING),
    "llama-3.2-1b": ModelConfig("llama-3.2-1b", vocab_size=128_256, num_layers=16,
                                embed_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                                mlp_dim=8192, rope_scaling=_LLAMA32_SCALING,
                                dtype="bfloat16"),
    "llama-3.2-3b": ModelConfig("llama-3.2-3b", vocab_size=128_256, num_layers=28,
                                embed_dim=3072, num_heads=24, num_kv_heads=8, head_dim=128,
                                mlp_dim=8192, rope_scaling=_LLAMA32_SCALING,
                                dtype="bfloat16"),
    "llama-3.1-8b": ModelConfig("llama-3.1-8b", vocab_size=128_256, num_layers=32,
                                embed_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                                mlp_dim=14_336, rope_scaling=_LLAMA31_SCALING,
                                tie_embeddings=False, dtype="bfloat16"),
    "qwen2.5-0.5b": ModelConfig("qwen2.5-0.5b", vocab_size=151_936, num_layers=24,
                                embed_dim=896, num_heads=14, num_kv_heads=2, head_dim=64,
                                mlp_dim=4864, rope_theta=1_000_000.0, rms_eps=1e-6,
                                qkv_bias=True, dtype="bfloat16"),
    "qwen2.5-1.5b": ModelConfig("qwen2.5-1.5b", vocab_size=151_936, num_layers=28,
                                embed_dim=1536, num_heads=12, num_kv_heads=2, head_dim=128,
                                mlp_dim=8960, rope_theta=1_000_000.0, rms_eps=1e-6,
                                qkv_bias=True, dtype="bfloat16"),
    "qwen2.5-7b": ModelConfig("qwen2.5-7b", vocab_size=152_064, num_layers=28,
                              embed_dim=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                              mlp_dim=18_944, rope_theta=1_000_000.0, rms_eps=1e-6,
                              qkv_bias=True, tie_embeddings=False, dtype="bfloat16"),
    "qwen3-0.6b": ModelConfig("qwen3-0.6b", vocab_size=151_936, num_layers=28,
                              embed_dim=1024, num_heads=16, num_kv_heads=8, head_dim=128,
                              mlp_dim=3072, rope_theta=1_000_000.0, rms_eps=1e-6,
                              qk_norm=True, dtype="bfloat16"),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Returns the named preset, with fields overridden (e.g. `dtype="float32"`)."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
