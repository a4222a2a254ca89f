"""Kernel census of compiled steps, and compiling for a GPU target from a CPU-only machine."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from statejax import cache, platform
from statejax.errors import InputError
from statejax.model.config import preset
from statejax.perf import gpu_target, step_census

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
                      for v in (12, 13)) if importlib.util.find_spec("jax_plugins") else False

HLO = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(f32[4]{0} %p)
}

ENTRY %main (a: f32[4], b: f32[4], w: bf16[64,32]) -> (f32[4], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %w = bf16[64,32]{1,0} parameter(2)
  %f = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused
  %g = f32[4]{0} custom-call(f32[4]{0} %b), custom_call_target="__cublas$gemm"
  %d = f32[4]{0} fusion(f32[4]{0} %a), kind=kCustom, calls=%gemm_fusion_dot.1_computation
  %k = f32[4]{0} custom-call(f32[4]{0} %b), custom_call_target="__gpu$xla.gpu.triton"
  %wrapped_transpose.1 = bf16[32,64]{1,0} fusion(bf16[64,32]{1,0} %w), kind=kLoop, calls=%t
  %c = bf16[2,8]{1,0} copy(bf16[2,8]{1,0} %x)
  ROOT %t = (f32[4]{0}, f32[4]{0}) tuple(f32[4]{0} %f, f32[4]{0} %g)
}
"""


def test_kernel_kinds_counts_the_entry_computation_only():
    # The fused computation's negate and the parameters / tuple launch nothing.
    assert step_census.kernel_kinds(HLO) == dict(gemm=2, pallas=1, fusion=2, other=1, total=6)
    with pytest.raises(ValueError, match="ENTRY"):
        step_census.kernel_kinds("HloModule m\n")


def test_written_bytes_are_the_results_of_launches_by_kind():
    # f, d: 16 B each; g: 16; k: 16; the transpose 2048 bf16 = 4096; the copy 2 * 8 * 2 = 32.
    assert step_census.written_bytes(HLO) == dict(gemm=32, pallas=16, fusion=4112, other=32,
                                                  total=4192)
    # Tuple results are summed, in-place cell updates and loops left out (LOOP's entry has
    # only its loop), element types sized as HLO prints them.
    hlo = HLO.replace("%k = f32[4]{0} custom-call", "%k = (f32[2,3]{1,0}, s32[]) custom-call")
    hlo = hlo.replace("%c = bf16[2,8]{1,0} copy", "%input_scatter_fusion.1 = bf16[2,8]{1,0} copy")
    assert step_census.written_bytes(hlo) == dict(gemm=32, pallas=28, fusion=4112, other=0,
                                                  total=4172)
    assert step_census.written_bytes(LOOP)["total"] == 0
    assert step_census._type_bytes("(pred[3], f8e4m3fn[2,2], f64[], u16[5])") == 3 + 4 + 8 + 10
    with pytest.raises(ValueError, match="unknown HLO element type 'q7'"):
        step_census._type_bytes("q7[2]")


def test_input_readers_are_launches_reading_a_parameter_or_a_view_of_it():
    # a: read by f and d; b: by g and k; w: by the transpose; the fused computation's own
    # parameter(0) is not the entry's. Through a bitcast view: one more reader of b.
    assert step_census.input_readers(HLO, [0]) == 2
    assert step_census.input_readers(HLO, [1]) == 2
    assert step_census.input_readers(HLO, [0, 1]) == 4
    assert step_census.input_readers(HLO, [2]) == 1
    assert step_census.input_readers(HLO, []) == 0
    viewed = HLO.replace(
        '  %c = bf16[2,8]{1,0} copy(bf16[2,8]{1,0} %x)',
        '  %v = f32[2,2]{1,0} bitcast(f32[4]{0} %b)\n'
        '  %c = f32[2,2]{1,0} copy(f32[2,2]{1,0} %v)')
    assert step_census.input_readers(viewed, [1]) == 3
    assert step_census._entry_parameters(HLO) == 3


def test_donated_buffers_are_read_from_the_module_header():
    header = ("HloModule m, input_output_alias={ {0}: (3, {}, may-alias), {1}: (4, {}, "
              "must-alias) }, entry_computation_layout={()->()}\n")
    assert step_census.donated_buffers(header + HLO) == 2
    assert step_census.donated_buffers(HLO) == 0


def test_large_copies_are_copies_as_large_as_a_kv_weight():
    # A copy or transpose counts at >= embed * kv_heads * head_dim elements.
    small = preset("tiny").replace(embed_dim=8, num_kv_heads=1, head_dim=4)  # 32
    big = small.replace(embed_dim=4096)
    assert step_census.large_copies(HLO, small) == 1  # the 2048-element transpose
    assert step_census.large_copies(HLO, big) == 0


LOOP = """HloModule m

%cond (c: (s32[], bf16[64,32])) -> pred[] {
  %c = (s32[], bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], bf16[64,32]{1,0}) %c), index=0
  ROOT %lt = pred[] fusion(s32[] %i), kind=kLoop, calls=%fused_compare
}

%body (b: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {
  %b = (s32[], bf16[64,32]{1,0}) parameter(0)
  %w = bf16[64,32]{1,0} get-tuple-element((s32[], bf16[64,32]{1,0}) %b), index=1
  %loop_multiply_fusion = bf16[64,32]{1,0} fusion(bf16[64,32]{1,0} %w), kind=kLoop, calls=%m
  %input_reduce_fusion = (bf16[32]{0}, bf16[8]{0}) fusion(bf16[64,32]{1,0} %w), kind=kInput
  %loop_dynamic_update_slice_fusion = bf16[64,32]{1,0} fusion(bf16[64,32]{1,0} %w), kind=kLoop
  %i = s32[] get-tuple-element((s32[], bf16[64,32]{1,0}) %b), index=0
  ROOT %t = (s32[], bf16[64,32]{1,0}) tuple(s32[] %i, bf16[64,32]{1,0} %w)
}

ENTRY %main (w: bf16[64,32]) -> bf16[64,32] {
  %w = bf16[64,32]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], bf16[64,32]{1,0}) tuple(s32[] %z, bf16[64,32]{1,0} %w)
  %loop = (s32[], bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[64,32]{1,0} get-tuple-element((s32[], bf16[64,32]{1,0}) %loop), index=1
}
"""


def test_results_of_six_or_more_elements_are_counted():
    """HLO prints `/*index=5*/` in tuples of six or more: such a loop is still a launch."""
    wide = "(s32[], f32[2], f32[2], f32[2], f32[2], /*index=5*/f32[2])"
    hlo = LOOP.replace("%loop = (s32[], bf16[64,32]{1,0}) while(",
                       f"%loop = {wide} while(")
    assert step_census.kernel_kinds(hlo)["total"] == 1
    assert step_census.per_token_kernels(hlo) == 4


def test_the_generation_loop_is_the_steps_own_loop():
    """Of several entry loops (a CPU's rolled random-bits loop among them), the turn is the
    loop the step's jit made; where that cannot be told, it raises, not guesses."""
    rng = ('%rng = (s32[], bf16[64,32]{1,0}) while(%init), condition=%cond, body=%cond, '
           'metadata={op_name="jit(query)/jit(_gumbel)/jit(_uniform)/while"}\n')
    own = ('%loop = (s32[], bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body, '
           'metadata={op_name="jit(query)/while"}\n')
    two = LOOP.replace("  %loop = (s32[], bf16[64,32]{1,0}) while(%init), condition=%cond, "
                       "body=%body\n", "  " + rng + "  " + own)
    assert step_census.kernel_kinds(two)["total"] == 2
    assert step_census.per_token_kernels(two) == 4  # condition + body, not cond + cond (2)
    unclear = two.replace('op_name="jit(query)/while"', 'op_name="jit(query)/jit(f)/while"')
    with pytest.raises(ValueError, match="2 loops in the entry computation, 0 of them"):
        step_census.per_token_kernels(unclear)


def test_per_token_counts_one_turn_of_the_generation_loop():
    # Condition (1) + body (3 fusions); the loop itself is one "other" of the entry.
    assert step_census.kernel_kinds(LOOP)["total"] == 1
    assert step_census.per_token_kernels(LOOP) == 4
    assert step_census.per_token_kernels(HLO) == 0  # no loop
    # Writes as large as a k/v weight (2048 elements here), in-place cache updates aside:
    # the materialised product only (the reduction's outputs are small).
    small = preset("tiny").replace(embed_dim=8, num_kv_heads=1, head_dim=4)  # 32 elements
    assert step_census.token_writes(LOOP, small.replace(embed_dim=512)) == 1
    assert step_census.token_writes(LOOP, small.replace(embed_dim=4096)) == 0
    assert step_census.token_writes(HLO, small) == 0


def test_compiling_for_switches_the_kernels_to_compiled_and_back():
    assert cache.pallas_interpret()  # CPU: interpret mode
    device = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    with gpu_target.compiling_for(device):
        assert platform.compiling_for_gpu() and not cache.pallas_interpret()
    assert cache.pallas_interpret() and not platform.compiling_for_gpu()
    with pytest.raises(InputError, match="known"):
        gpu_target.target_device("b200")


@pytest.mark.skipif(not HAS_CUDA_PLUGIN,
                    reason="compiling for a GPU target needs jax's CUDA plugin "
                           "(CI's second leg installs it)")
def test_census_compiles_the_query_step_for_an_h100(tmp_path):
    """The launcher compiles the tiny model's query step for the H100 target on this CPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.step_census", "--config=configs/step_census.py:tiny",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    layers = results["layers"]
    assert results["target"].startswith("NVIDIA H100")
    per_layer = [r for r in results["rows"]
                 if r["layout"] == "per_layer" and r["linear_impl"] == "xla"]
    rows = {(r["impl"], r["max_new_cap"]): r for r in per_layer if r["step"] == "query"}
    assert set(rows) == {(i, g) for i in ("reference", "pallas") for g in (1, 32)}
    appends = {r["impl"]: r for r in per_layer if r["step"] == "append"}
    assert set(appends) == {"reference", "pallas"}
    # Stacked and packed weights (`statejax.model.layouts`): the append and first-token
    # query steps read the layers' slices in place, so the H100 program launches the
    # per-layer layout's kernels and writes no more bytes, from fewer argument buffers (the
    # claim of its docstring). No stacked or packed generation loop with XLA's linear layers:
    # steps.query refuses one.
    # Launches that read what a session passes anew per call (graph nodes a new address
    # re-points), and for the query those reading the scalars it keeps on the device.
    for row in results["rows"]:
        assert row["per_call_readers"] > 0
        assert (row["scalar_readers"] > 0) if row["step"] == "query" else (
            "scalar_readers" not in row)
    laid_out = {(r["layout"], r["step"], r["impl"]): r for r in results["rows"]
                if r["layout"] != "per_layer" and r["linear_impl"] == "xla"}
    assert set(laid_out) == {(layout, s, i) for layout in ("stacked", "packed")
                             for s in ("query", "append") for i in ("reference", "pallas")}
    for (layout, step, impl), row in laid_out.items():
        twin = rows[impl, 1] if step == "query" else appends[impl]
        assert row.get("max_new_cap", 1) == 1 and row["args"] < twin["args"]
        for key in (*step_census.KINDS, "total", "large_copies", "donated", "written_mb",
                    "per_call_readers"):
            assert row[key] == twin[key], (layout, step, impl, key)
    # Per layer 9 buffers a layer; packed 2 (the rows, and the down projection).
    query = {layout: laid_out[layout, "query", "pallas"]["args"] for layout in
             ("stacked", "packed")}
    assert rows["pallas", 1]["args"] - query["packed"] == 7 * layers
    # Fused linear kernels (kernels/fused_linear.py): four Pallas kernels a block in place
    # of XLA's GEMMs and their neighbours, so fewer launches and no split-K partials, the
    # same argument buffers.
    fused_rows = {(r["layout"], r["step"], r["impl"], r.get("max_new_cap", r.get("chunk"))): r
                  for r in results["rows"] if r["linear_impl"] == "pallas"}
    fused = {key[1:]: r for key, r in fused_rows.items() if key[0] == "per_layer"}
    fused_laid_out = {key: r for key, r in fused_rows.items() if key[0] != "per_layer"}
    impls = ("reference", "pallas")
    assert set(fused) == ({("query", i, g) for i in impls for g in (1, 32)}
                          | {("append", i, 16) for i in impls})
    # Stacked or packed weights with the fused kernels: read in place (`LaidOutLeaf`), so
    # the same program as per-layer weights from fewer buffers, generation loops included.
    assert set(fused_laid_out) == {(layout, *key) for layout in ("stacked", "packed")
                                   for key in fused}
    for (layout, step, impl, width), row in fused_laid_out.items():
        twin = fused[step, impl, width]
        assert row["args"] == laid_out[layout, step, impl]["args"] < twin["args"]
        for key in (*step_census.KINDS, "total", "large_copies", "donated", "written_mb",
                    "per_token", "token_writes"):
            assert row[key] == twin[key], (layout, step, impl, width, key)
    for (step, impl, width), row in fused.items():
        twin = rows[impl, width] if step == "query" else appends[impl]
        attention = layers if impl == "pallas" else 0  # one attention kernel a layer
        assert row["layout"] == "per_layer" and row["args"] == twin["args"]
        assert row["pallas"] == attention + 4 * layers, (step, impl, width)
        assert row["total"] < twin["total"] and row["gemm"] < twin["gemm"]
        assert row["written_mb"]["gemm"] < twin["written_mb"]["gemm"]
        assert row["donated"] == twin["donated"]
    for impl, row in appends.items():
        assert row["donated"] == 3  # k, v, lengths updated in place, never copied
        assert row["pallas"] == (layers if impl == "pallas" else 0)  # one append kernel a layer
        # The layers' kernels are identical (the layer's page offset is an operand), so the
        # step compiles one append kernel, not one per layer.
        assert row["distinct_pallas"] == (1 if impl == "pallas" else 0)
        assert row["compile_s"] > 0
    for cap in (1, 32):
        # 256 session cells take one shared split, so the cascade is one kernel a layer
        # (`cascade_attention.fuses`: shared cells, then the branch's own), compiled
        # (Triton), named as a profiler trace will show it. (The 1B shape's 1k and 32k
        # cells are split: a shared and a private kernel, docs/results.md.)
        assert rows["pallas", cap]["pallas"] == layers
        assert rows["pallas", cap]["pallas_names"] == {"statejax_cascade": layers}
        assert rows["reference", cap]["pallas"] == 0 == len(rows["reference", cap][
            "pallas_names"])
    # The block's four fused calls, named for what they compute.
    assert fused["query", "pallas", 1]["pallas_names"] == rows["pallas", 1]["pallas_names"] | {
        f"statejax_fused_linear_{call}": layers for call in ("qkv", "o", "gate_up", "down")}
    assert appends["pallas"]["pallas_names"] == {"statejax_append": layers}
    assert rows["pallas", 1]["distinct_pallas"] == 1  # the layers' kernels are identical
    for impl in ("reference", "pallas"):
        # A first-token query has no generation loop, so nothing per generated token.
        assert rows[impl, 1]["total"] < rows[impl, 32]["total"]
        assert rows[impl, 1]["per_token"] == 0 < rows[impl, 32]["per_token"]
    # Weights stored [out, in]: the loop's one-token products read them in place, neither
    # re-laid-out before the loop (no copies beyond the first-token step's activation
    # transposes) nor materialised as products inside it. (The reference attention does
    # write cell-sized intermediates per token.)
    assert rows["pallas", 32]["large_copies"] == rows["pallas", 1]["large_copies"]
    assert rows["pallas", 32]["token_writes"] == 0
    # What the kernels write: something (the activations at least), and on the Pallas path
    # the attention kernels' partials; the floor is the tiny model's weights and cells.
    cfg = preset("tiny", dtype="float32")
    assert results["floor_mb"] == {"256": pytest.approx(
        (cfg.step_weight_bytes(results["tokens"]) + (256 + results["tokens"])
         * cfg.kv_bytes_per_token) / 2**20)}
    for row in results["rows"]:
        written = row["written_mb"]
        assert written["total"] == pytest.approx(sum(written[k] for k in step_census.KINDS))
        assert written["total"] > 0
        assert (written["pallas"] > 0) == ("pallas" in (row["impl"], row["linear_impl"]))
    markdown = (tmp_path / "results.md").read_text()
    assert f"| query | 256 | pallas | per layer ({rows['pallas', 1]['args']}) | 1 |" in markdown
    assert (f"| append | 256 | pallas | stacked ({laid_out['stacked', 'append', 'pallas']['args']})"
            " | 16 |") in markdown


@pytest.mark.skipif(not HAS_CUDA_PLUGIN,
                    reason="compiling for a GPU target needs jax's CUDA plugin "
                           "(CI's second leg installs it)")
@pytest.mark.parametrize("norm", ["statejax", "flax"])
def test_residual_add_and_rms_norm_compile_to_one_kernel_for_an_h100(norm):
    """The model's RMSNorm (HF's order) after a residual add, before a projection, at the 1B
    width: one kernel besides the two GEMMs, the scale folded into the second GEMM. flax's
    nn.RMSNorm (scaled before rounding) compiles to three: the claim of RMSNorm's docstring."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from statejax.model.llama import Linear, RMSNorm

    width, bf16 = 2048, jnp.bfloat16
    make = (lambda: RMSNorm(1e-5, bf16, bf16)) if norm == "statejax" else (
        lambda: nn.RMSNorm(epsilon=1e-5, dtype=bf16, param_dtype=bf16))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + Linear((width,), dtype=bf16, param_dtype=bf16)(x)
            return Linear((3 * width // 2,), dtype=bf16, param_dtype=bf16)(make()(x))

    x = jax.ShapeDtypeStruct((1, 32, width), bf16)
    params = jax.eval_shape(Block().init, jax.random.key(0), x)
    text = gpu_target.compile_for(jax.jit(Block().apply), gpu_target.target_device("h100"),
                                  params, x).as_text()
    kinds = step_census.kernel_kinds(text)
    assert kinds["gemm"] == 2
    # Besides the GEMMs: the norm (with the add) and the second GEMM's split-K reduction.
    assert kinds["total"] - kinds["gemm"] == (2 if norm == "statejax" else 4)
