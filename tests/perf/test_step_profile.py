"""The query-step profile times the real model's pieces and accounts for every weight."""

import dataclasses
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import step_profile as sp_config
from statejax import steps
from statejax.model.config import preset
from statejax.model.layouts import lay_out
from statejax.model.llama import init_params
from statejax.perf import fused_linear_tiles, lone_query, step_profile
from statejax.serving.packing import unpack_answer


def test_components_cover_the_weights_and_match_the_model():
    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    parts = step_profile.components(cfg, params, tokens=8)
    nbytes = {name: part[2] for name, part in parts.items()}
    norms = sum(params[f"layer_{i}"][n]["scale"].nbytes for i in range(cfg.num_layers)
                for n in ("input_norm", "post_norm"))
    assert (nbytes["attn_projections"] + nbytes["mlp"] + nbytes["embed_logits"] + norms
            == nbytes["step_without_attention"] == cfg.weight_bytes)
    # Untied, the input table is only gathered: 8 of its rows count.
    untied = cfg.replace(tie_embeddings=False)
    untied_parts = step_profile.components(untied, init_params(untied, seed=0), tokens=8)
    unread = (untied.vocab_size - 8) * untied.embed_dim * untied.jnp_dtype.itemsize
    assert untied_parts["step_without_attention"][2] == untied.weight_bytes - unread
    assert untied_parts["embed_logits"][2] + unread == sum(
        x.nbytes for x in jax.tree.leaves(untied_parts["embed_logits"][1][0]))
    # The "with attention" step is the model itself: next-token logits of the last token.
    fn, (p, ids), _ = parts["step_with_attention"]
    want = steps.forward(params, ids, cfg=cfg)[:, -1]
    np.testing.assert_allclose(np.asarray(fn(p, ids)), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
    # Identity attention changes the result (it really removes attention).
    fn0, args0, _ = parts["step_without_attention"]
    assert not np.allclose(np.asarray(fn0(*args0)), np.asarray(want), atol=1e-3)


def test_fused_components_are_the_xla_pieces_after_a_unit_norm():
    """With linear_impl "pallas" the pieces read the same weights, through the fused
    kernels, whose prologue normalises by a unit scale."""
    from statejax.model.llama import Attention, Mlp, RMSNorm

    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    xla, fused = (step_profile.components(cfg, params, 8, impl) for impl in ("xla", "pallas"))
    unit = lambda v: RMSNorm(cfg.rms_eps, cfg.jnp_dtype).apply(
        {"params": {"scale": jnp.ones(v.shape[-1:])}}, v)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    for name, apply in (
            ("mlp", lambda i, p, x: Mlp(cfg).apply({"params": p}, x, unit)),
            ("attn_projections", lambda i, p, x: Attention(cfg, i).apply(
                {"params": p}, x, positions, step_profile.IdentityAttention(), unit)[0])):
        fn, (weights, x), nbytes = fused[name]
        assert nbytes == xla[name][2]
        want = x
        for i, p in enumerate(weights):
            want = apply(i, p, want)
        np.testing.assert_allclose(np.asarray(fn(weights, x)), np.asarray(want), rtol=1e-4,
                                   atol=1e-4)


def test_linear_tiles_time_each_fused_call_at_each_strip_width():
    """Every strip width computes the same call (the kernel's reference) on each layer's
    weights, reads those weights, and keeps its tiles within the kernel's rules; widths that
    do not divide a call's weights are left out."""
    from statejax.kernels import fused_linear as fl

    cfg = preset("tiny")  # q 64 wide, k and v 32, MLP 128; 2 layers
    pieces = fused_linear_tiles.linear_tiles(cfg, 32, (16, 32, 64))
    assert sorted(pieces) == sorted(  # k and v are 32 wide: no 64-column q/k/v strips
        [f"fused_linear[qkv,bn={n}]" for n in (16, 32)]
        + [f"fused_linear[{c},bn={n}]" for c in ("o", "gate_up", "down") for n in (16, 32, 64)])
    e, f = cfg.embed_dim, cfg.mlp_dim
    layers = cfg.num_layers
    assert pieces["fused_linear[down,bn=16]"][2] == layers * e * f * 4
    assert pieces["fused_linear[gate_up,bn=32]"][2] == layers * 2 * e * f * 4
    for name, (fn, (x, weight_sets, keywords), *_) in pieces.items():
        activation = "silu_mul" if "gate_up" in name else None
        got = fn(x, weight_sets, keywords)
        assert len(got) == len(weight_sets) == layers
        # One call per layer's weights, each its own (distinct sets: not one set cached).
        assert not np.array_equal(np.asarray(weight_sets[0][0]), np.asarray(weight_sets[1][0]))
        for y, weights in zip(got, weight_sets, strict=True):
            want = fl.fused_linear_reference(x, weights, activation=activation, **keywords)
            np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6,
                                       err_msg=name)
    # Heads of 32: q/k/v as the model calls it, rotated, three outputs, strips of 32 only.
    cfg = preset("tiny", head_dim=32)
    pieces = fused_linear_tiles.linear_tiles(cfg, 32, (16, 32, 64), copies=1)
    assert [n for n in pieces if "qkv" in n] == ["fused_linear[qkv,bn=32]"]
    fn, (x, weight_sets, keywords), *_ = pieces["fused_linear[qkv,bn=32]"]
    assert keywords["rotary"].rotate == (True, True, False) and len(weight_sets) == 1
    (got,) = fn(x, weight_sets, keywords)
    want = fl.fused_linear_reference(x, weight_sets[0], split_outputs=True, **keywords)
    assert [g.shape for g in got] == [(32, 128), (32, 64), (32, 64)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_linear_tile_grid_names_full_tiles_and_drops_repeats_and_overflows():
    """Grid entries (block_n, block_k, num_warps, num_stages), None keeping the default's:
    named by their tiles in full; an entry that resolves to tiles already listed, or whose
    pipelined stages exceed a block's shared memory, gives no row."""
    from statejax.kernels import fused_linear as fl

    cfg = preset("llama-3.2-1b", dtype="bfloat16", num_layers=1)
    grid = ((None, None, None, None), (None, None, None, 4), (None, None, 8, None),
            (None, 1024, 8, 2), 32)
    names = [n for n in fused_linear_tiles.linear_tiles(cfg, 32, grid) if "[o," in n]
    default = fl.blocks_for(jnp.zeros((32, 2048), jnp.bfloat16),
                            (jnp.zeros((2048, 2048), jnp.bfloat16),))
    bn, bk = default.block_n, default.block_k
    assert names == [f"fused_linear[o,bn={bn},bk={bk},w=4,s=3]",
                     f"fused_linear[o,bn={bn},bk={bk},w=4,s=4]",
                     f"fused_linear[o,bn={bn},bk={bk},w=8,s=3]",
                     f"fused_linear[o,bn={bn},bk=1024,w=8,s=2]",
                     *(["fused_linear[o,bn=32]"] if bn != 32 else [])]
    # gate/up reads two strips a program: [32 + 2 x 64, 1024] x 2 stages is over the limit.
    gate_up = [n for n in fused_linear_tiles.linear_tiles(cfg, 32, grid) if "gate_up" in n]
    assert gate_up and not any("bk=1024" in n for n in gate_up)
    big = fl.LinearBlocks(block_m=32, block_n=64, block_k=1024, num_stages=2)
    assert big.staged_bytes(2) == (32 + 128) * 1024 * 2 * 2 > fl.SMEM_LIMIT


def test_tile_rows_alone_and_a_tile_that_fails_keeps_the_rest(monkeypatch):
    """`query_rows` False runs the tiles (and GEMM chains) only; a tile whose program fails
    is reported, and the rows after it still run."""
    def broken(x, weight_sets, keywords):
        raise RuntimeError("shared memory exceeded")

    good = fused_linear_tiles.linear_tiles(preset("tiny"), 8, (16,))
    bad = good["fused_linear[o,bn=16]"]._replace(fn=jax.jit(broken))
    pieces = {"fused_linear[o,bad]": bad, **good}
    monkeypatch.setattr(fused_linear_tiles, "linear_tiles", lambda *args, **kwargs: pieces)
    config = sp_config.get_config("tiny")
    config.query_rows = False
    config.chain_gemms = (1,)
    results = step_profile.run(config)
    assert [r["component"] for r in results["rows"]] == [*good, "weights_in_1_gemms"]
    assert "query_args" not in results and not any(k.startswith("query_kernels")
                                                   for k in results)
    assert results["tile_errors"] == {"fused_linear[o,bad]": "RuntimeError: shared memory "
                                                               "exceeded"}
    md = step_profile.results_markdown(results)
    assert "- fused_linear[o,bad]: did not run: RuntimeError: shared memory exceeded" in md
    assert all(r["kernel_ms"] > 0 for r in results["rows"])
    # Every tile that ran was checked against the reference (interpret mode: it matches).
    assert all(r["matches"] and r["max_err"] < 1e-4 for r in results["rows"][:-1])


def test_the_tile_check_catches_a_wrong_tile():
    pieces = fused_linear_tiles.linear_tiles(preset("tiny"), 8, (16,))
    piece = pieces["fused_linear[down,bn=16]"]
    err, ok = fused_linear_tiles.tile_error(piece)
    assert ok and err < 1e-5
    wrong = piece._replace(fn=jax.jit(lambda x, weight_sets, keywords: [
        y + 1e-2 for y in piece.fn(x, weight_sets, keywords)]))
    err, ok = fused_linear_tiles.tile_error(wrong)
    assert not ok and 5e-3 < err <= 1e-2


def test_the_tiles_grid_records_each_calls_fastest_matching_tiles(tmp_path, monkeypatch):
    """The fastest tiles by kernel time among those that matched, per call, with the rule's
    time: "linear" entries the fused kernels' defaults then read on that GPU model."""
    from statejax import platform
    from statejax.kernels import fused_linear as fl
    from statejax.kernels import tuned

    cfg = preset("tiny")
    pieces = fused_linear_tiles.linear_tiles(cfg, 8, ((None, None, None, None), 16, 32))
    rows, kernel_ms = [], {}
    for i, (name, piece) in enumerate(pieces.items()):
        # Made-up kernel times: 32-wide strips fastest, but gate/up's did not match.
        kernel_ms[name] = (1.0 if "bn=32" in name else 2.0) - 0.001 * i
        rows.append(dict(component=name, kernel_ms=kernel_ms[name],
                         matches=not (piece.call == "gate_up" and "bn=32" in name)))
    results = dict(rows=rows, dtype="float32", device="cpu (cpu)", jax_version="x",
                   date="today")
    written = fused_linear_tiles.record_linear_tiles(results, pieces, str(tmp_path))
    assert [e["row"] for e in written] == [
        "fused_linear[qkv,bn=32]", "fused_linear[o,bn=32]",
        max((n for n in pieces if "gate_up" in n and "bn=32" not in n), key=list(pieces).index),
        "fused_linear[down,bn=32]"]
    layers = cfg.num_layers
    for e in written:
        piece = pieces[e["row"]]
        default = next(n for n, p in pieces.items() if p.call == piece.call and p.is_default)
        assert e["ms"] == kernel_ms[e["row"]] / layers
        assert e["default_ms"] == kernel_ms[default] / layers
        assert e["block_sizes"] == dataclasses.asdict(piece.blocks)
        assert e["shape"] == piece.shape and e["window"] == piece.shape["rows"]
    # Read back where kernels compile for that GPU model (here: the CPU's table, named as
    # the device the entries were recorded for).
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    x, weight_sets, keywords = pieces["fused_linear[down,bn=32]"].args
    rule = fl.blocks_for(x, weight_sets[0])
    assert fl.blocks_for(x, weight_sets[0]) == rule  # interpret mode: no lookup
    monkeypatch.setattr(platform, "device_kind", lambda: jax.devices()[0].device_kind)
    assert fl.blocks_for(x, weight_sets[0]) == pieces["fused_linear[down,bn=32]"].blocks != rule
    assert fl.blocks_for(x, weight_sets[0], measured=False) == rule
    assert fl.blocks_for(x[:4], weight_sets[0]) == fl.blocks_for(x[:4], weight_sets[0],
                                                                 measured=False)  # other M


def test_tiny_run_reports_each_component_against_the_floor():
    seen = []
    results = step_profile.run(sp_config.get_config("tiny"),
                               on_row=lambda r: seen.append(len(r["rows"])))
    names = [r["component"] for r in results["rows"]]
    # The query path first: a run cut short by its time limit keeps the rows that matter most.
    query = ["query_step", "query_step_dispatch", "query_step_sync", "query_step_host_io_call",
             "query_step_host_io", "query_step_host_io_unpacked", "query_step_host_io_jit",
             "session_query"]
    assert names == [*query, "decode_token", "attn_projections", "mlp", "embed_logits",
                     "step_without_attention", "step_with_attention",
                     *[n + "@128" for n in query],  # the larger session's rows,
                     *[n + "[linear=pallas]" for n in query],  # fused linear kernels,
                     "attn_projections[linear=pallas]", "mlp[linear=pallas]",
                     *[n + f"[{layout},linear=pallas]" for layout in ("packed", "stacked")
                       for n in query],  # on laid-out weights, read in place,
                     *[f"fused_linear[{c},bn={n}]" for c in ("qkv", "o", "gate_up", "down")
                       for n in (16, 32)],  # the fused calls alone per strip width,
                     *[f"weights_in_{n}_gemms" for n in (1, 4, 16, 64)],  # boundaries,
                     *[n + "[packed]" for n in query],  # then packed and stacked weights
                     *[n + "[stacked]" for n in query]]
    # Rewritten after every row, and once more after each traced query step's kernel trace
    # and its lone calls' host trace (`trace_steps`: "" and "[linear=pallas]").
    traced = {"query_step", "query_step[linear=pallas]", "session_query",
              "session_query[linear=pallas]"}
    assert seen == [n for i, name in enumerate(names, 1)
                    for n in ([i, i] if name in traced else [i])]
    for r in results["rows"]:
        assert r["ms"] > 0
        assert np.isclose(r["floor_ms"], 1e3 * r["weight_bytes"] / results["copy_bytes_per_s"])
        assert np.isclose(r["frac_copy"], r["floor_ms"] / r["ms"])
    rows = {r["component"]: r for r in results["rows"]}
    assert all(rows[n]["kernels"] > 0 for n in names if not n.startswith("session_query"))
    assert rows["session_query"]["kernels"] is None is rows["session_query@128"]["kernels"]
    # The one-call-at-a-time rows run the query step's own program.
    assert (rows["query_step_dispatch"]["kernels"] == rows["query_step_sync"]["kernels"]
            == rows["query_step_host_io_unpacked"]["kernels"] == rows["query_step"]["kernels"])
    # The session's packed call: the same step returning one array, not the logits (on CPU
    # 3 launches fewer: XLA fuses what it no longer returns).
    packed = rows["query_step_host_io"]["kernels"]
    assert rows["query_step_host_io_call"]["kernels"] == packed
    assert rows["query_step_host_io_jit"]["kernels"] == packed  # the same call, by jit
    assert abs(packed - rows["query_step"]["kernels"]) <= 4
    # The lone call returns before its answer is on the host (medians of the same calls).
    for suffix in ("", "@128", "[linear=pallas]", "[packed]", "[stacked]",
                   "[packed,linear=pallas]", "[stacked,linear=pallas]"):
        assert (rows["query_step_host_io_call" + suffix]["ms"]
                <= rows["query_step_host_io" + suffix]["ms"])
    # Its argument buffers: the params' and the state's, and the 8 per-query inputs.
    state_leaves = 3  # k, v, lengths
    assert results["query_args"] == len(jax.tree.leaves(init_params(preset("tiny")))) + (
        state_leaves + 8)
    # Packed: one or two buffers per layer; stacked: one per kind of layer leaf (the same
    # kernels as per layer when compiled for an H100: tests/perf/test_step_census.py).
    for layout in ("packed", "stacked"):
        assert results[f"query_args_{layout}"] == len(jax.tree.leaves(lay_out(
            init_params(preset("tiny")), layout))) + state_leaves + 8
    assert max(results["query_args_stacked"], results["query_args_packed"]) < results[
        "query_args"]
    # The same weight bytes through more GEMMs: more kernels, nothing else.
    chain = [rows[f"weights_in_{n}_gemms"] for n in (1, 4, 16, 64)]
    assert all(r["weight_bytes"] == 2**20 for r in chain)
    assert [r["kernels"] for r in chain] == sorted(r["kernels"] for r in chain)
    assert chain[-1]["kernels"] >= 64 > chain[0]["kernels"]
    # A generated token runs one turn of the generation loop: the whole model for one token,
    # about as many kernels as the first-token step, not the CPU's rolled random-bits loop
    # (a few kernels, which must not be counted as the turn).
    assert rows["decode_token"]["kernels"] > rows["query_step"]["kernels"] / 2
    # The query rows read the session's K/V on top of the weights.
    cfg = preset("tiny")
    assert rows["query_step"]["weight_bytes"] == cfg.weight_bytes + (64 + 32) * (
        cfg.kv_bytes_per_token)
    assert rows["query_step@128"]["weight_bytes"] == cfg.weight_bytes + (128 + 32) * (
        cfg.kv_bytes_per_token)
    assert results["extra_contexts"] == [128]
    assert jax.__version__ == results["jax_version"]
    md = step_profile.results_markdown(results)
    assert "| step_without_attention |" in md and "| kernels |" in md
    # A lone query split by the rows' differences, at both contexts: the parts add up to it.
    for suffix in ("", "@128"):
        split = lone_query.parts(results, suffix)
        assert math.isclose(sum(ms for _, ms in split), rows["session_query" + suffix]["ms"])
        assert f"### `session_query{suffix}`: " in md
    assert "| query_step@128 |" in md and "rows @128: a session of 128 cells" in md
    assert f"{results['query_args']} argument buffers per call" in md
    assert "rows [linear=pallas]: the blocks' linear layers by kernels/fused_linear.py" in md
    # The fused step's next-token logits against XLA's, same session and question: f32.
    assert 0 <= results["logits_diff[linear=pallas]"] < 1e-4
    # On laid-out weights the fused kernels compute what they compute per layer, bit for bit
    # (their H100 programs are the same too: tests/perf/test_step_census.py).
    for layout in ("packed", "stacked"):
        assert (results[f"logits_diff[{layout},linear=pallas]"]
                == results["logits_diff[linear=pallas]"])
    assert "; [packed,linear=pallas]: " in md and "; [stacked,linear=pallas]: " in md
    # Fused: four Pallas kernels a block replace XLA's projections (interpret mode here,
    # so only that the program differs; the H100 counts are tests/perf/test_step_census.py's).
    assert rows["query_step[linear=pallas]"]["kernels"] != rows["query_step"]["kernels"]
    per_kernel_us = 1e3 * (chain[-1]["ms"] - chain[0]["ms"]) / (
        chain[-1]["kernels"] - chain[0]["kernels"])
    assert (f"- kernel boundaries: the same weights in {chain[-1]['kernels']} kernels took "
            f"{chain[-1]['ms'] - chain[0]['ms']:+.3f} ms against {chain[0]['kernels']} kernels: "
            f"{per_kernel_us:.2f} µs per extra kernel") in md
    assert (f"({results['query_args_stacked']} with the layers stacked: rows [stacked]) "
            f"({results['query_args_packed']} with the layers packed") in md
    # The traced query steps' kernels (`trace_steps`): on CPU, their XLA ops, each call the
    # same; a table each.
    assert not any(key.startswith("query_kernels@") for key in results)
    for row in ("query_step", "query_step[linear=pallas]"):
        k = results["query_kernels" + row[len("query_step"):]]
        assert k["source"] == "host" and k["kernels"] >= 1 and k["kernels"] == int(k["kernels"])
        assert k["kernel_ms"] > 0
        assert f"## {row} by kernel (profiler trace)" in md
        assert f"{k['kernels']:.0f} kernels, {k['kernel_ms']:.3f} ms of kernel time" in md
    # The lone calls of the traced steps on the host: the dispatch among their events, the
    # kernels inside the calls' windows; a section each.
    assert not any(key.startswith("lone_calls@") for key in results)
    for suffix in ("", "[linear=pallas]"):
        for row, b in results["lone_calls" + suffix].items():
            assert row in ("query_step_host_io", "session_query")
            assert b["calls"] == 5 and b["source"] == "host"
            assert 0 < b["kernel_busy_ms"] and 0 < b["call_ms"]
            assert any(t["event"].startswith("PjitFunction(") and t["count"] >= 1
                       for t in b["top"])
            assert (f"## {row}{suffix}, one call at a time, on the host (profiler trace)"
                    in md)
            assert (f"{b['call_ms']:.3f} ms traced ({rows[row + suffix]['ms']:.3f} ms "
                    "untraced)") in md
        assert set(results["lone_calls" + suffix]) == {"query_step_host_io", "session_query"}
    # Pieces (`trace_pieces`) carry their kernels' device time per call; query rows do not.
    pieces = names[names.index("attn_projections"):names.index("query_step@128")] + [
        n for n in names if n.startswith(("fused_linear", "weights_in", "mlp[", "attn_"))]
    assert all(rows[n]["kernel_ms"] > 0 for n in pieces)
    assert not any("kernel_ms" in rows[n] for n in names if n.startswith("query_step"))
    assert "| kernel ms (trace) | % at kernel time |" in md
    r = rows["fused_linear[o,bn=16]"]
    assert (f"| fused_linear[o,bn=16] | {r['ms']:.3f} |" in md
            and f"| {r['kernel_ms']:.3f} | {100 * r['floor_ms'] / r['kernel_ms']:.0f}% |" in md)


@pytest.mark.parametrize("impl", ["reference", "pallas"])  # :gpu profiles the Pallas path
def test_query_step_is_the_sessions_own_device_call(impl):
    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    config = sp_config.get_config("tiny")
    config.impl = impl
    session, question, args, static = step_profile.query_path(cfg, params, config)
    assert session.length == config.context
    gen = steps.query(*args, **static)
    answer = session.query(question, 1)
    # Same generation (the stop token, if drawn, is not part of either answer) ...
    np.testing.assert_array_equal(np.asarray(gen.tokens[0, :int(gen.num_tokens[0])]),
                                  answer.tokens)
    # The profile's host-input call is that call too, with the question's arrays from the
    # host (numpy) and the rest on the device, as the session passes them.
    host_args = step_profile.host_inputs(args)
    assert all(isinstance(a, np.ndarray) for a in host_args[3:6])
    assert all(host_args[i] is args[i] for i in (0, 1, 2, *range(6, len(args))))
    tokens, num, gaps = step_profile.fetch_generation(steps.query(*host_args, **static))
    np.testing.assert_array_equal(tokens, np.asarray(gen.tokens))
    np.testing.assert_array_equal(gaps, np.asarray(gen.gaps))
    assert isinstance(num, np.ndarray) and num.tolist() == np.asarray(gen.num_tokens).tolist()
    # The session's own call: the question's arrays packed into one from the host, the
    # answer out as one; the same values, bit for bit.
    packed_args = step_profile.packed_host_inputs(args)
    assert isinstance(packed_args[3], np.ndarray)
    assert packed_args[3].shape == (1, config.tokens + 2)
    assert all(packed_args[i] is args[i] for i in range(3))
    assert all(packed_args[i] is args[i + 2] for i in range(4, len(packed_args)))
    compiled = steps.query_packed._cache_size()
    tokens, num, gaps = unpack_answer(steps.query_packed(*packed_args, **static))
    np.testing.assert_array_equal(tokens, np.asarray(gen.tokens))
    np.testing.assert_array_equal(gaps, np.asarray(gen.gaps))
    assert num.tolist() == np.asarray(gen.num_tokens).tolist()
    # Made through jit (`query_step_host_io_jit`), it runs the program the session's query
    # compiled: the row costs no compile (on a card, seconds of a capped device slot).
    assert steps.query_packed._cache_size() == compiled
    # ... and it depends on the session's cells: an empty session answers differently.
    empty = args[1].replace(lengths=args[1].lengths * 0)
    other = steps.query(args[0], empty, *args[2:], **static)
    assert not np.allclose(np.asarray(other.first_logits), np.asarray(gen.first_logits))


def test_wall_timing_releases_each_output_before_the_next_call():
    """A session's answer arrays are gone before its next query; the one-at-a-time rows must
    do the same (on a GPU a live output moves the next call's outputs and XLA re-points its
    CUDA graph first)."""

    class Output:
        pass

    alive_at_call, last = [], [lambda: None]

    def fn():
        alive_at_call.append(last[0]() is not None)
        out = Output()
        last[0] = weakref.ref(out)
        return out

    waited = []
    seconds = step_profile._median_wall_seconds(
        fn, warmup=1, repeats=4, after=lambda out: waited.append(type(out)))
    assert seconds >= 0 and waited == [Output] * 6
    assert alive_at_call == [False] * 6


def test_gemm_chain_reads_the_bytes_through_dependent_gemms():
    """`gemm_chain`: N GEMMs of [E, E·m] weights (E·E·m·N·itemsize bytes in all), each fed the
    previous output repeated m times; bytes that do not split are refused."""
    fn, (weights, x) = step_profile.gemm_chain(8, 3, 4 * 8 * 8 * 4 * 2, 4, jnp.float32)
    assert [w.shape for w in weights] == [(8, 16)] * 4
    assert sum(w.nbytes for w in weights) == 4 * 8 * 8 * 4 * 2
    want = np.asarray(x, np.float64)
    for w in weights:
        want = np.tile(want, (1, 2)) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(np.asarray(fn(weights, x)), want, rtol=1e-5, atol=1e-5)
    assert 0.1 < float(np.std(want)) < 10  # weights scaled to keep the values in range
    with pytest.raises(ValueError, match=r"do not split into 3 GEMMs of \[8, 8 x m\]"):
        step_profile.gemm_chain(8, 3, 4 * 8 * 8 * 4 * 2, 3, jnp.float32)
