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


def test_stacked_layers_put_each_layer_at_its_index(tiny):
    """`stack_layers` puts each layer's leaf at index i of one [L, ...] leaf; `per_layer`
    inverts it exactly."""
    from statejax.model.layouts import layout_of, per_layer, stack_layers

    cfg, params = tiny
    stacked = stack_layers(params)
    assert layout_of(stacked) == "stacked" and layout_of(params) == "per_layer"
    assert not any(k.startswith("layer_") for k in stacked)
    layers = stacked["layers"]
    q = layers["attn"]["q_proj"]["weight"]
    assert q.shape == (cfg.num_layers, *params["layer_0"]["attn"]["q_proj"]["weight"].shape)
    np.testing.assert_array_equal(q[1], params["layer_1"]["attn"]["q_proj"]["weight"])
    buffers = len(jax.tree.leaves(params)) - (cfg.num_layers - 1) * len(
        jax.tree.leaves(params["layer_0"]))
    assert len(jax.tree.leaves(stacked)) == buffers
    back = per_layer(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert per_layer(params) is params
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(stacked)
    with pytest.raises(ValueError, match="no 'layer_<i>'"):
        stack_layers({"embed": params["embed"]})


def test_packed_layers_hold_whole_rows_of_the_embedding_width(tiny):
    """`pack_layers` lays each layer's leaves that are rows of the embedding width E end to
    end in one [R, E] buffer, in the layer's tree order with the one-row leaves last, and
    keeps the rest (the down projection, [E, F]) as leaves; `per_layer` gives back every
    leaf exactly."""
    from statejax.errors import InputError
    from statejax.model.layouts import PackedLayer, lay_out, layout_of, pack_layers, per_layer
    from statejax.model.llama import init_params

    cfg, params = tiny
    packed = pack_layers(params)
    assert layout_of(packed) == "packed"
    assert packed["embed"] is params["embed"]
    e, f = cfg.embed_dim, cfg.mlp_dim
    for i in range(cfg.num_layers):
        layer, original = packed[f"layer_{i}"], params[f"layer_{i}"]
        assert isinstance(layer, PackedLayer)
        attn, mlp = original["attn"], original["mlp"]
        # Key order, one-row leaves last: k, o, q, v projections; gate, up; the two norms.
        # So every weight starts at a multiple of a kernel's row tile (here 32).
        order = [attn["k_proj"]["weight"], attn["o_proj"]["weight"], attn["q_proj"]["weight"],
                 attn["v_proj"]["weight"], mlp["gate_proj"]["weight"], mlp["up_proj"]["weight"],
                 original["input_norm"]["scale"], original["post_norm"]["scale"]]
        np.testing.assert_array_equal(layer.rows, np.concatenate(
            [np.reshape(x, (-1, e)) for x in order]))
        firsts = [first for _, _, first in layer.layout]
        assert firsts == list(np.cumsum([0] + [x.size // e for x in order[:-1]]))
        assert all(first % 32 == 0 for first in firsts[:6])
        assert layer.rest == {"mlp": {"down_proj": {"weight": mlp["down_proj"]["weight"]}}}
        assert layer.rest["mlp"]["down_proj"]["weight"].shape == (e, f)
    # 2 buffers a layer instead of 9.
    assert len(jax.tree.leaves(packed)) == len(jax.tree.leaves(params)) - cfg.num_layers * 7
    back = per_layer(packed)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert packed["layer_0"].rest["mlp"]["down_proj"]  # unpacking left the rest as it was
    with pytest.raises(ValueError, match="already packed"):
        pack_layers(packed)
    with pytest.raises(ValueError, match="already stacked"):
        lay_out(lay_out(params, "stacked"), "packed")
    with pytest.raises(InputError, match=r"weights layout 'rows'; allowed: \('per_layer'"):
        lay_out(params, "rows")
    # Qwen's leaves: the q bias [H, D] is a row of E here (H x D = E), the k / v biases and
    # the q / k norms are narrower and stay leaves; all come back exactly.
    qwen = cfg.replace(qkv_bias=True, qk_norm=True)
    qwen_params = init_params(qwen, seed=1)
    qwen_packed = pack_layers(qwen_params)["layer_1"]
    assert jax.tree.map(lambda x: x.shape, qwen_packed.rest) == {
        "attn": {"k_norm": {"scale": (16,)}, "k_proj": {"bias": (2, 16)},
                 "q_norm": {"scale": (16,)}, "v_proj": {"bias": (2, 16)}},
        "mlp": {"down_proj": {"weight": (e, f)}}}
    assert any(path == ("attn", "q_proj", "bias") for path, _, _ in qwen_packed.layout)
    jax.tree.map(np.testing.assert_array_equal, per_layer(pack_layers(qwen_params)),
                 qwen_params)
    # A leaf of another dtype stays a leaf too.
    mixed = dict(params, layer_0=jax.tree.map(lambda x: x, params["layer_0"]))
    mixed["layer_0"]["post_norm"]["scale"] = params["layer_0"]["post_norm"]["scale"].astype(
        jnp.bfloat16)
    assert pack_layers(mixed)["layer_0"].rest["post_norm"]["scale"].dtype == jnp.bfloat16


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_laid_out_weights_answer_as_per_layer_ones(tiny, layout):
    """The steps take every weights layout and give the per-layer results bit for bit
    (forward, append, first-token query); a generation loop is refused."""
    from statejax import steps
    from statejax.budget import Budget
    from statejax.errors import InputError
    from statejax.model.layouts import lay_out
    from statejax.serving.session import Session
    from statejax.tokenizer import ByteTokenizer

    cfg, params = tiny
    laid_out = lay_out(params, layout)
    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(steps.forward(laid_out, tokens, cfg=cfg)),
                                  np.asarray(steps.forward(params, tokens, cfg=cfg)))
    budget = Budget(cells=256, page_size=16, chunk_sizes=(16, 64), question_cells=32,
                    max_new_tokens=8)
    sessions = [Session(p, cfg, budget, ByteTokenizer(), prefix="sys\n") for p in
                (params, laid_out)]
    logits = [s.append("1 2 3 4 5 6\n" * 5) for s in sessions]
    np.testing.assert_array_equal(logits[0], logits[1])
    jax.tree.map(np.testing.assert_array_equal, sessions[0].state, sessions[1].state)
    answers = [s.query("q?", 1, temperature=0.7, seed=5) for s in sessions]
    assert answers[0].tokens.tolist() == answers[1].tokens.tolist()
    assert answers[0].first_gap == answers[1].first_gap
    # A generation loop would copy stacked or packed weights (H100 compile): refused before
    # any work (the session's limit is 1, also for the default), and by the step itself; the
    # session goes on as it was.
    with pytest.raises(InputError, match=rf"allowed: 1\.\.1 \(this session's weights are {layout}"):
        sessions[1].query("q?", 6)
    assert sessions[1].validate_max_new_tokens(None) == 1
    with pytest.raises(InputError, match="first-token queries"):
        steps.query(laid_out, sessions[1].state, *range(8), cfg=cfg, window=256,
                    branch_cells=40, max_new_cap=8)
    assert sessions[1].query("q?", 1).tokens.tolist() == sessions[0].query("q?", 1).tokens.tolist()


def test_every_view_declares_the_interface_the_model_reads():
    """The model reads `one_qkv_buffer` from its view (fused linear layers) without a
    fallback, so every view in the library declares it, as a class constant, not a pytree
    field."""
    import dataclasses

    from statejax.cache import View
    from statejax.perf.step_profile import IdentityAttention
    from statejax.train.data import PackedView

    assert isinstance(IdentityAttention(), View)
    assert not IdentityAttention.one_qkv_buffer and not PackedView.one_qkv_buffer
    assert "one_qkv_buffer" not in {f.name for f in dataclasses.fields(PackedView)}
