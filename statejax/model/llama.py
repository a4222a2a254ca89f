"""A Llama-family decoder in Flax (Llama 3.x, Qwen2.5 qkv-bias, Qwen3 qk-norm).

The model is cache-agnostic: each attention layer hands its q/k/v to a cache *view*, which
writes cells and attends; of the view it uses only the declared interface (`statejax.cache.View`:
`update_and_attend`, `one_qkv_buffer`). Layers are unrolled (faster per step than `scan` on
GPU for small-batch decode) and indexed into stacked [L, ...] cells.

`linear_impl` (static, `LINEAR_IMPLS`) says who computes a block's linear layers:
- `"xla"`: the modules below, compiled by XLA (the default; what training differentiates);
- `"pallas"`: `kernels.fused_linear`, four kernels a block, each with what surrounds its
  GEMM (input norm + q/k/v; o + residual; post norm + gate/up + silu-mul; down + residual).
  Inference only (no VJP); interpret mode unless compiling for a GPU, as the attention
  kernels. Same parameters, same rounding order; sums in another order. The parameters at
  `FUSED_PARAMS` may be `layouts.LaidOutLeaf`s: the kernels read them in place from
  stacked or packed buffers (`steps.model_params`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from statejax import platform
from statejax.cache import FullView
from statejax.errors import InputError
from statejax.kernels.fused_linear import Rotary, fused_linear, rotary_fits
from statejax.model.config import ModelConfig
from statejax.model.layouts import LaidOutLeaf
from statejax.model.rope import apply_rope, inverse_frequencies, rope_tables

_INIT = nn.initializers.normal(stddev=0.02)
LINEAR_IMPLS = ("xla", "pallas")
# A layer's parameters that only the fused kernels read (linear_impl "pallas"), as paths in
# its tree: with stacked or packed weights they come to the model as `LaidOutLeaf`s.
FUSED_PARAMS = frozenset(
    {("attn", p, leaf) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
     for leaf in ("weight", "bias")}
    | {("mlp", p, "weight") for p in ("gate_proj", "up_proj", "down_proj")}
    | {("input_norm", "scale"), ("post_norm", "scale")})


def check_linear_impl(linear_impl: str):
    """Raises unless `linear_impl` is one of `LINEAR_IMPLS`."""
    if linear_impl not in LINEAR_IMPLS:
        raise InputError(f"linear_impl={linear_impl!r}; allowed: {LINEAR_IMPLS}")


class Linear(nn.Module):
    """`y = x . W^T (+ b)` over the trailing `in_axes` axes of x, W stored [*features, *in].

    The weight layout is PyTorch's (output axes first, the contracted input axes minor), not
    flax's [in, out], for the batch-1 decode step: XLA's GPU compiler lowers a vector-matrix
    product of this size as multiply + reduce over the input axes, which with those axes
    minor is a row reduction reading each weight once. In flax's layout the same step either
    transposes the weights (hoisted out of a decode loop: a copy of each per answer)
    or writes the whole product to memory before reducing it (3x the weight traffic).
    Larger products are GEMMs in either layout. HF checkpoints store this layout too.

    Call: x [..., *in] -> [..., *features]; with `params_only`, (weight [*features, *in],
    bias [*features] or None) in `dtype`, for a fused kernel that applies them (x gives the
    input shape only); each a `LaidOutLeaf` as given, if it was.
    """

    features: tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    params_only: bool = False

    @nn.compact
    def __call__(self, x):
        if self.params_only and _laid_out(self, "weight"):
            return (self.get_variable("params", "weight"),
                    self.get_variable("params", "bias") if self.use_bias else None)
        in_shape = x.shape[x.ndim - self.in_axes:]
        weight = self.param("weight", _INIT, (*self.features, *in_shape), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, self.features, self.param_dtype)
                if self.use_bias else None)
        x, weight, bias = promote_dtype(x, weight, bias, dtype=self.dtype)
        if self.params_only:
            return weight, bias
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

    Call: x [..., N] -> [..., N] in `dtype`; param `scale` [N]. With `params_only`, the
    scale [N] in `dtype` (a `LaidOutLeaf` as given, if it was), for a fused kernel that
    normalises (x gives N only).
    """

    epsilon: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32
    params_only: bool = False

    @nn.compact
    def __call__(self, x):
        if self.params_only and _laid_out(self, "scale"):
            return self.get_variable("params", "scale")
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        if self.params_only:
            return scale.astype(self.dtype)
        x32 = x.astype(jnp.float32)
        rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        scale = scale.astype(self.dtype).reshape((1,) * (x.ndim - 1) + scale.shape)
        return (x32 * rms).astype(self.dtype) * scale


def _laid_out(module: nn.Module, name: str) -> bool:
    """Whether the module's param `name` came as a `LaidOutLeaf` (flax's `param` would check
    its shape against the buffer's)."""
    return isinstance(module.get_variable("params", name), LaidOutLeaf)


def _matrix(w, k: int):
    """A weight [*out, *in] as [N, K = k] for `fused_linear`: reshaped, or read in place."""
    return w.rows(k) if isinstance(w, LaidOutLeaf) else w.reshape(-1, k)


def _vector(v):
    """A norm scale or bias as [N] for `fused_linear`: reshaped, or one row read in place."""
    return v.rows(int(np.prod(v.shape))) if isinstance(v, LaidOutLeaf) else v.reshape(-1)


def _fused_linear(x_BxTxK, weights, call: str, **epilogue):
    """`kernels.fused_linear` over the rows of x [B, T, K]; weights [N_i, K]; `residual`
    [B, T, N] added last; the kernel named `statejax_fused_linear_<call>` (a profiler
    trace tells the block's four calls apart); the other keywords are `fused_linear`'s.
    -> [B, T, N] (with `split_outputs`, a tuple of [B, T, N_i])."""
    b, t, k = x_BxTxK.shape
    residual = epilogue.pop("residual", None)
    if residual is not None:
        epilogue["residual_MxN"] = residual.reshape(b * t, -1)
    y = fused_linear(x_BxTxK.reshape(b * t, k), tuple(weights),
                     interpret=not platform.compiling_for_gpu(),
                     name=f"statejax_fused_linear_{call}", **epilogue)
    if isinstance(y, tuple):
        return tuple(part.reshape(b, t, -1) for part in y)
    return y.reshape(b, t, -1)


class Attention(nn.Module):
    """Norm, q/k/v, RoPE, the cache view's attention, o, and the residual add.

    With linear_impl "pallas" one kernel normalises, projects and rotates (without qk-norm,
    which comes between the projection and RoPE; heads of a power of two >= 32, as
    `fused_linear.rotary_fits`), writing q, k and v as separate buffers: the attention
    kernels read q where it is (`append_attention.token_tiles`).

    Call: (x_BxTxE the residual stream, positions_BxT, view, norm: the block's input
    `RMSNorm`, made with `params_only` for linear_impl "pallas") -> (x + attention, view).
    """

    cfg: ModelConfig
    layer: int
    linear_impl: str = "xla"

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, view, norm):
        cfg = self.cfg
        fused = self.linear_impl == "pallas"
        dense = lambda heads, name: Linear(
            (heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_dtype, params_only=fused, name=name)
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
        projections = [dense(h, name)
                       for h, name in zip(heads, ("q_proj", "k_proj", "v_proj"), strict=True)]
        inv_freq = jnp.asarray(inverse_frequencies(cfg))
        # RoPE in the q/k/v kernel's epilogue (qk-norm would come between them).
        rotated = fused and not cfg.qk_norm and rotary_fits(cfg.head_dim)
        if fused:
            e = cfg.embed_dim
            weights, biases = zip(*(p(x_BxTxE) for p in projections), strict=True)
            rotary = None
            if rotated:
                cos, sin = (a.reshape(-1, cfg.head_dim // 2)
                            for a in rope_tables(positions_BxT, inv_freq))
                rotary = Rotary(cos, sin, rotate=(True, True, False))
            # q, k and v as three buffers: the attention call and the cell writes read them
            # whole (a slice of one output handed to a Pallas call is copied out first);
            # side by side in one where the attention takes them so (`View.one_qkv_buffer`).
            one_buffer = view.one_qkv_buffer
            outputs = _fused_linear(
                x_BxTxE, [_matrix(w, e) for w in weights], "qkv",
                norm_scale_K=_vector(norm(x_BxTxE)), norm_eps=cfg.rms_eps, rotary=rotary,
                split_outputs=not one_buffer,
                bias=tuple(_vector(b) for b in biases) if cfg.qkv_bias else None)
            if one_buffer:
                qkv = outputs.reshape(*outputs.shape[:2], sum(heads), cfg.head_dim)
                bounds = np.cumsum((0, *heads))
                outputs = [qkv[:, :, lo:hi]
                           for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            q, k, v = (y.reshape(*y.shape[:2], h, cfg.head_dim)
                       for y, h in zip(outputs, heads, strict=True))
        else:
            h = norm(x_BxTxE)
            q, k, v = (p(h) for p in projections)
        if cfg.qk_norm:
            q = _rms_norm(cfg, "q_norm")(q)
            k = _rms_norm(cfg, "k_norm")(k)
        if not rotated:
            q = apply_rope(q, positions_BxT, inv_freq)
            k = apply_rope(k, positions_BxT, inv_freq)
        out_BxTxHxD, view = view.update_and_attend(self.layer, q, k, v)
        o_proj = Linear((cfg.embed_dim,), in_axes=2, dtype=cfg.jnp_dtype,
                        param_dtype=cfg.jnp_dtype, params_only=fused, name="o_proj")
        if fused:
            weight, _ = o_proj(out_BxTxHxD)
            out = out_BxTxHxD.reshape(*out_BxTxHxD.shape[:2], -1)
            return _fused_linear(out, [_matrix(weight, out.shape[-1])], "o",
                                 residual=x_BxTxE), view
        return x_BxTxE + o_proj(out_BxTxHxD), view


class Mlp(nn.Module):
    """Norm, SwiGLU and the residual add.

    Call: (x_BxTxE the residual stream, norm: the block's post-attention `RMSNorm`, made
    with `params_only` for linear_impl "pallas") -> x + mlp(norm(x)).
    """

    cfg: ModelConfig
    linear_impl: str = "xla"

    @nn.compact
    def __call__(self, x_BxTxE, norm):
        cfg = self.cfg
        fused = self.linear_impl == "pallas"
        dense = lambda width, name: Linear((width,), dtype=cfg.jnp_dtype,
                                           param_dtype=cfg.jnp_dtype, params_only=fused,
                                           name=name)
        gate, up, down = (dense(cfg.mlp_dim, "gate_proj"), dense(cfg.mlp_dim, "up_proj"),
                          dense(cfg.embed_dim, "down_proj"))
        if fused:
            e, f = cfg.embed_dim, cfg.mlp_dim
            hidden = _fused_linear(x_BxTxE, [_matrix(gate(x_BxTxE)[0], e),
                                             _matrix(up(x_BxTxE)[0], e)], "gate_up",
                                   norm_scale_K=_vector(norm(x_BxTxE)), norm_eps=cfg.rms_eps,
                                   activation="silu_mul")
            return _fused_linear(hidden, [_matrix(down(hidden)[0], f)], "down",
                                 residual=x_BxTxE)
        h = norm(x_BxTxE)
        return x_BxTxE + down(nn.silu(gate(h)) * up(h))


class Block(nn.Module):
    """One pre-norm decoder layer: attention then SwiGLU MLP, each with a residual.

    Call: `(x_BxTxE, positions_BxT int32, view) -> (x_BxTxE, view)`; `view` is the cache
    view the attention reads and writes (`statejax.cache`).
    """

    cfg: ModelConfig
    layer: int
    linear_impl: str = "xla"

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, view):
        cfg, impl = self.cfg, self.linear_impl
        params_only = impl == "pallas"
        x_BxTxE, view = Attention(cfg, self.layer, impl, name="attn")(
            x_BxTxE, positions_BxT, view, _rms_norm(cfg, "input_norm", params_only))
        x_BxTxE = Mlp(cfg, impl, name="mlp")(x_BxTxE,
                                             _rms_norm(cfg, "post_norm", params_only))
        return x_BxTxE, view


class Transformer(nn.Module):
    """Decoder-only transformer.

    Call: `(tokens_BxT int32, positions_BxT int32, view) -> (logits_BxTxV float32, view)`.
    With `logit_index_B` given, returns logits only at those positions: [B, V].
    `linear_impl`: who computes the blocks' linear layers (module docstring).
    """

    cfg: ModelConfig
    linear_impl: str = "xla"

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, view, logit_index_B=None):
        cfg = self.cfg
        check_linear_impl(self.linear_impl)
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.jnp_dtype,
                         param_dtype=cfg.jnp_dtype, embedding_init=_INIT, name="embed")
        x_BxTxE = embed(tokens_BxT)
        for layer in range(cfg.num_layers):
            x_BxTxE, view = Block(cfg, layer, self.linear_impl, name=f"layer_{layer}")(
                x_BxTxE, positions_BxT, view)
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

    For checkpoints of `statejax.pretrained` format 1 (orbax `statejax-orbax-v1`); leaves may
    be numpy or jax arrays.
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


def _rms_norm(cfg: ModelConfig, name: str, params_only: bool = False) -> "RMSNorm":
    return RMSNorm(epsilon=cfg.rms_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
                   params_only=params_only, name=name)


def init_params(cfg: ModelConfig, seed: int = 0):
    """Random parameters (normal, std 0.02; norms at one) as a nested dict pytree."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    init = jax.jit(lambda key: Transformer(cfg).init(key, tokens, positions, FullView()))
    return init(jax.random.key(seed))["params"]
