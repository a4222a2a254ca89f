"""A Llama-family decoder in Flax (Llama 3.x, Qwen2.5 qkv-bias, Qwen3 qk-norm).

The model is cache-agnostic: each attention layer hands its q/k/v to a cache *view*
(`statejax.cache`), which writes cells and attends. Layers are unrolled (faster per step than
`scan` on GPU for small-batch decode; see ANCHORS) and indexed into stacked [L, ...] cells.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from statejax.model.config import ModelConfig
from statejax.model.rope import apply_rope, inverse_frequencies

_INIT = nn.initializers.normal(stddev=0.02)


class Linear(nn.Module):
    """`y = x . W^T (+ b)` over the trailing `in_axes` axes of x, W stored [*features, *in].

    The weight layout is PyTorch's (output axes first, the contracted input axes minor), not
    flax's [in, out], for the batch-1 decode step: XLA's GPU compiler lowers a vector-matrix
    product of this size as multiply + reduce over the input axes, which with those axes
    minor is a row reduction reading each weight once. In flax's layout the same step either
    transposes the weights (hoisted out of a decode loop: a copy of each per answer)
    or writes the whole product to memory before reducing it (3x the weight traffic).
    Larger products are GEMMs in either layout. HF checkpoints store this layout too.

    Call: x [..., *in] -> [..., *features].
    """

    features: tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_axes:]
        weight = self.param("weight", _INIT, (*self.features, *in_shape), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, self.features, self.param_dtype)
                if self.use_bias else None)
        x, weight, bias = promote_dtype(x, weight, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)),
                    tuple(range(len(self.features), weight.ndim)))
        y = jax.lax.dot_general(x, weight, (contract, ((), ())))
        return y if bias is None else y + jnp.broadcast_to(bias, y.shape)


class RMSNorm(nn.Module):
    """HF's RMSNorm: statistics and normalisation in float32, rounded to `dtype`, then scaled.

    Written out, not flax's `nn.RMSNorm` (which scales before rounding): in this order XLA's
    GPU compiler emits one normalisation kernel, with a preceding residual add fused in, and
    folds the scale into the projection that follows; flax's order compiled to two kernels
    (statistics, then the scaling) after the residual add's own.

    Call: x [..., N] -> [..., N] in `dtype`; param `scale` [N].
    """

    epsilon: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        scale = scale.astype(self.dtype).reshape((1,) * (x.ndim - 1) + scale.shape)
        return (x32 * rms).astype(self.dtype) * scale


class Attention(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, view):
        cfg = self.cfg
        dense = lambda heads, name: Linear(
            (heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_dtype, name=name)
        q = dense(cfg.num_heads, "q_proj")(x_BxTxE)
        k = dense(cfg.num_kv_heads, "k_proj")(x_BxTxE)
        v = dense(cfg.num_kv_heads, "v_proj")(x_BxTxE)
        if cfg.qk_norm:
            q = _rms_norm(cfg, "q_norm")(q)
            k = _rms_norm(cfg, "k_norm")(k)
        inv_freq = jnp.asarray(inverse_frequencies(cfg))
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)
        out_BxTxHxD, view = view.update_and_attend(self.layer, q, k, v)
        out = Linear((cfg.embed_dim,), in_axes=2, dtype=cfg.jnp_dtype,
                     param_dtype=cfg.jnp_dtype, name="o_proj")(out_BxTxHxD)
        return out, view


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxE):
        cfg = self.cfg
        dense = lambda width, name: Linear((width,), dtype=cfg.jnp_dtype,
                                           param_dtype=cfg.jnp_dtype, name=name)
        gate = dense(cfg.mlp_dim, "gate_proj")(x_BxTxE)
        up = dense(cfg.mlp_dim, "up_proj")(x_BxTxE)
        return dense(cfg.embed_dim, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, view):
        h, view = Attention(self.cfg, self.layer, name="attn")(
            _rms_norm(self.cfg, "input_norm")(x_BxTxE), positions_BxT, view)
        x_BxTxE = x_BxTxE + h
        x_BxTxE = x_BxTxE + Mlp(self.cfg, name="mlp")(_rms_norm(self.cfg, "post_norm")(x_BxTxE))
        return x_BxTxE, view


class Transformer(nn.Module):
    """Decoder-only transformer.

    Call: `(tokens_BxT int32, positions_BxT int32, view) -> (logits_BxTxV float32, view)`.
    With `logit_index_B` given, returns logits only at those positions: [B, V].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, view, logit_index_B=None):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.jnp_dtype,
                         param_dtype=cfg.jnp_dtype, embedding_init=_INIT, name="embed")
        x_BxTxE = embed(tokens_BxT)
        for layer in range(cfg.num_layers):
            x_BxTxE, view = Block(cfg, layer, name=f"layer_{layer}")(x_BxTxE, positions_BxT,
                                                                      view)
        x_BxTxE = _rms_norm(cfg, "final_norm")(x_BxTxE)
        if logit_index_B is not None:
            x_BxTxE = jnp.take_along_axis(x_BxTxE, logit_index_B[:, None, None], axis=1)
        if cfg.tie_embeddings:
            logits = embed.attend(x_BxTxE)
        else:
            logits = Linear((cfg.vocab_size,), dtype=cfg.jnp_dtype,
                            param_dtype=cfg.jnp_dtype, name="lm_head")(x_BxTxE)
        logits = logits.astype(jnp.float32)
        if logit_index_B is not None:
            logits = logits[:, 0]
        return logits, view


def from_flax_kernel_layout(tree):
    """Params saved before `Linear` (flax `kernel` [*in, *out]) -> today's `weight`
    [*out, *in]. o_proj alone contracts two input axes (heads, head_dim).

    For checkpoints written before 2026-11-27 (`statejax.pretrained` format 1, orbax
    `statejax-orbax-v1`); leaves may be numpy or jax arrays.
    """
    return _from_kernels(tree, "")


def _from_kernels(tree, name: str):
    if not isinstance(tree, dict):
        return tree
    out = {k: _from_kernels(v, k) for k, v in tree.items() if k != "kernel"}
    if "kernel" in tree:
        kernel = tree["kernel"]
        in_axes = 2 if name == "o_proj" else 1
        out["weight"] = jnp.transpose(kernel, (*range(in_axes, kernel.ndim), *range(in_axes)))
    return out


def _rms_norm(cfg: ModelConfig, name: str) -> "RMSNorm":
    return RMSNorm(epsilon=cfg.rms_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
                   name=name)


def init_params(cfg: ModelConfig, seed: int = 0):
    """Random parameters (normal, std 0.02; norms at one) as a nested dict pytree."""
    from statejax.cache import FullView

    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    init = jax.jit(lambda key: Transformer(cfg).init(key, tokens, positions, FullView()))
    return init(jax.random.key(seed))["params"]
