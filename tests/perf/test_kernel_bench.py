"""The kernel benchmark: its rows, traffic model, tuning grids and target read-out (CPU,
interpret mode; the timings themselves are only meaningful on a GPU)."""

import jax
import pytest

from configs import kernel_bench as kb_config
from statejax.kernels import append_attention as aa
from statejax.kernels import cascade_attention as ca
from statejax.perf import kernel_bench


def test_cpu_run_measures_every_shape_and_grid_entry(tmp_path):
    cfg = kb_config.get_config("cpu")
    cfg.repeats = 1
    results = kernel_bench.run(cfg, str(tmp_path))
    rows = results["rows"]
    expected = ([("decode", "default")] * len(cfg.decode) + [("append", "default")]
                * len(cfg.append) + [("cascade", "default")] * len(cfg.cascade)
                + [("decode", kernel_bench.blocks_label(aa.BlockSizes(*e)))
                   for e in cfg.tune_decode]
                + [("append", kernel_bench.blocks_label(aa.BlockSizes(*e)))
                   for e in cfg.tune_append]
                + [("cascade", kernel_bench.blocks_label(
                    kernel_bench.cascade_block_sizes(cfg, cfg.cascade[0], e)))
                   for e in cfg.tune_cascade])
    assert [(r["kernel"], r["blocks"]) for r in rows] == expected
    assert all(r["ms"] > 0 and r["gbytes_per_s"] > 0 for r in rows)
    # Tuned rows run the FIRST shape of their kernel; bytes = Q + K/V once + out (f32).
    b, s, t, h, k, d = cfg.decode[0]
    tuned = rows[len(cfg.decode) + len(cfg.append) + len(cfg.cascade)]
    assert (tuned["sessions"], tuned["context"], tuned["t"]) == (b, s, t)
    assert tuned["bytes"] == 2 * b * t * h * d * 4 + b * (s + t) * k * d * 2 * 4
    # A cascade grid row runs the first cascade shape with the entry's shared tiles.
    cascade = rows[-len(cfg.tune_cascade)]
    assert cascade["sessions"] == cfg.cascade[0][0]
    assert cascade["tiles"]["shared"] == dict(zip(
        ("block_q", "block_k", "num_splits", "num_warps"), cfg.tune_cascade[0][:4],
        strict=True)) | {"num_stages": 2, "preload_pages": False}
    assert cascade["tiles"]["private"]["block_q"] == cfg.tune_cascade[0][4]
    md = (tmp_path / "results.md").read_text()
    assert "| blocks |" in md and "q16 k32 s2 w4 st2" in md
    assert "shared q16 k32 s2 w4 st2, private q16" in md


def _row(ms, blocks):
    return dict(kernel="decode", sessions=8, context=16384, t=1, heads=32, kv_heads=8,
                head_dim=128, ms=ms, frac_copy=0.1 / ms, blocks=blocks)


def test_targets_report_the_fastest_blocks():
    results = {"rows": [_row(2.0, "default"), _row(1.0, "q16 k128 s16 w4 st3"),
                        _row(4.0, "q16 k64 s4 w4 st2")]}
    (line,) = [x for x in kernel_bench.target_lines(results) if x.startswith("- decode")]
    assert "10% of copy" in line and line.endswith("blocks q16 k128 s16 w4 st3")
    # Cascade: R = 8 against one branch, each at its fastest tiles, one line per shape.
    cascade = lambda r, ms: dict(_row(ms, "x"), kernel="cascade", sessions=r)  # noqa: E731
    results = {"rows": [cascade(1, 2.0), cascade(1, 1.0), cascade(8, 1.4), cascade(8, 1.2)]}
    (line,) = [x for x in kernel_bench.target_lines(results) if x.startswith("- cascade")]
    assert "8 branches take 1.20x one branch" in line


@pytest.mark.parametrize("variant", ["gpu-tune", "gpu-query", "cpu"])
def test_tuning_grids_are_valid_block_sizes(variant):
    cfg = kb_config.get_config(variant)
    work = kernel_bench.tuning_work(cfg)
    assert work and len({w[1:3] for w in work}) == len(work)  # no entry twice
    for kind, (_, _, t, _, _, _), bs, _ in work:  # raises if invalid
        if kind == "cascade":
            aa.validate_block_sizes(bs.shared, cfg.page_size)
            aa.validate_block_sizes(bs.private, kernel_bench.branch_page_size(cfg, t))
        else:
            aa.validate_block_sizes(bs, cfg.page_size)


def test_a_grid_without_its_shape_is_refused():
    cfg = kb_config.get_config("cpu")
    cfg.cascade = ()
    with pytest.raises(ValueError, match="cascade tuning grid needs the cascade shape"):
        kernel_bench.tuning_work(cfg)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="allowed: 'gpu' .*'gpu-tune', 'gpu-query'"):
        kb_config.get_config("tpu")


def test_mosaic_rows_on_gpu_variants_only():
    cfg = kb_config.get_config("gpu-tune")
    work = kernel_bench.mosaic_work(cfg)
    assert [(w[0], w[1]) for w in work] == (
        [("decode", cfg.decode[0]), ("append", cfg.append[0])]
        + [("decode", cfg.decode[0])] * len(cfg.tune_decode_mosaic)
        + [("append", cfg.append[0])] * len(cfg.tune_append_mosaic))
    assert {w[3] for w in work} == {"mosaic_gpu"}
    labels = [kernel_bench.blocks_label(w[2], w[3]) for w in work]
    assert labels[:3] == ["mosaic_gpu default", "mosaic_gpu default", "mosaic_gpu k64 c3 s4"]
    assert labels[-1] == "mosaic_gpu q64 k64 c4"
    decode_labels = labels[2:2 + len(cfg.tune_decode_mosaic)]
    assert len(set(decode_labels)) == len(decode_labels)
    gpu = kb_config.get_config("gpu")  # default tiles on every shape, no grid
    # Cascades of one 32-token branch (128 shared rows) fit the Mosaic shared part; 8 do not.
    fits = [s for s in gpu.cascade if s[0] == 1]
    assert len(fits) == 2 and len(kernel_bench.mosaic_work(gpu)) == (
        len(fits) + len(gpu.decode) + len(gpu.append))
    assert kernel_bench.mosaic_work(kb_config.get_config("cpu")) == []
    # The query's: the cascade's shared part on Mosaic, default at 32k and 1k, then a grid.
    query = kb_config.get_config("gpu-query")
    work = kernel_bench.mosaic_work(query)
    assert [(w[0], w[1]) for w in work] == (
        [("cascade", s) for s in query.cascade]
        + [("cascade", query.cascade[0])] * len(query.tune_cascade_mosaic)
        + [("decode", s) for s in query.decode])
    labels = [kernel_bench.blocks_label(w[2], w[3]) for w in work]
    assert labels[2] == "mosaic_gpu shared k128 c4 s8, private q32 k128 w4"
    assert labels[5] == "mosaic_gpu shared k128 c4 s16, private q128 k128 w4"


def test_the_time_budget_counts_the_peaks_and_stops_before_a_row_that_would_not_fit(
        monkeypatch):
    """The budget starts before the peaks, and a shape is not started when the one before it
    would not fit in what is left: the run ends inside its budget (the session script's
    margin is then left for writing and recording tiles)."""
    clock = [0.0]
    monkeypatch.setattr(kernel_bench.time, "monotonic", lambda: clock[0])

    def peaks(cfg):
        clock[0] += 5.0
        return {}

    def bench(cfg, peaks, kind, shape, key, block_sizes=None, backend="triton"):
        clock[0] += 10.0
        return dict(kernel=kind, shape=list(shape), ms=1.0)

    monkeypatch.setattr(kernel_bench, "measure_peaks", peaks)
    monkeypatch.setattr(kernel_bench, "bench_paged", bench)
    cfg = kb_config.get_config("cpu")
    cfg.update(cascade=(), tune_cascade=(), time_budget_s=30.0)
    rows = kernel_bench.run(cfg)["rows"]
    # Peaks end at 5 s; rows end at 15 and 25 s; a third would end at 35 > 30: skipped.
    assert ["skipped" in r for r in rows] == [False, False] + [True] * (len(rows) - 2)
    assert len(rows) > 3 and clock[0] == 25.0


def test_a_failing_mosaic_row_is_recorded_not_raised(tmp_path):
    """On CPU the Mosaic variant cannot compile: its rows carry the error, the rest runs."""
    cfg = kb_config.get_config("cpu")
    cfg.update(repeats=1, mosaic=True, tune_append_mosaic=((64, 64, 2),),
               decode=cfg.decode[:1], cascade=(), tune_decode=(), tune_append=(),
               tune_cascade=())
    rows = kernel_bench.run(cfg, str(tmp_path))["rows"]
    assert [(r["kernel"], r["blocks"], "error" in r) for r in rows] == [
        ("decode", "default", False), ("append", "default", False),
        ("decode", "mosaic_gpu default", True), ("append", "mosaic_gpu default", True),
        ("append", "mosaic_gpu q64 k64 c2", True)]
    assert "compiled only" in rows[3]["error"]
    md = (tmp_path / "results.md").read_text()
    assert "mosaic_gpu default error: InputError" in md


def test_gpu_query_times_the_query_attention_and_its_grid():
    cfg = kb_config.get_config("gpu-query")
    # The Llama-3.2-1B query: one session, 32 tokens, H = 32, K = 8, D = 64; 32k, then 1k.
    assert cfg.cascade == ((1, 32768, 32, 32, 8, 64), (1, 1024, 32, 32, 8, 64)) == cfg.decode
    # Then the cascade target pairs, default tiles only: 8 branches vs one over 16k
    # cells, at T = 1 (a flash query's generation step) and T = 32.
    assert cfg.cascade_targets == ((1, 16384, 1, 32, 8, 64), (8, 16384, 1, 32, 8, 64),
                                   (1, 16384, 32, 32, 8, 64), (8, 16384, 32, 32, 8, 64))
    rows = [(w[0], w[1], w[3]) for w in kernel_bench.all_work(cfg) if w[2] is None]
    assert [r for r in rows if r[1] in cfg.cascade_targets] == [
        ("cascade", s, "triton") for s in cfg.cascade_targets]  # no Mosaic row, no grid
    without = kb_config.get_config("gpu-query")
    without.cascade_targets = ()
    assert kernel_bench.all_work(without) == [
        w for w in kernel_bench.all_work(cfg) if w[1] not in cfg.cascade_targets]
    work = kernel_bench.tuning_work(cfg)
    assert (len(cfg.tune_cascade), len(cfg.tune_cascade_second)) == (55, 51)
    # The shorter grid (1k cells) first: a budget too short for both finishes one.
    assert [(w[0], w[1]) for w in work] == (
        [("cascade", cfg.cascade[1])] * 51 + [("cascade", cfg.cascade[0])] * 55)
    # Each grid leads with 3- and 4-stage shared tiles (the rest keep 2); at 1k, 4 of
    # those and the next 12 entries take one shared split: the call is then one kernel.
    stages = [bs.shared.num_stages for _, _, bs, _ in work]
    assert stages == [3] * 7 + [2] * 44 + [3, 4] * 3 + [3] + [2] * 48
    r, _, t, h, k, _ = cfg.cascade[1]
    assert [ca.fuses(r, t, h // k, bs.shared) for _, _, bs, _ in work[:51]] == (
        [True] * 4 + [False] * 3 + [True] * 12 + [False] * 32)
    for _, (_, cells, _, _, _, _), bs, _ in work:
        assert bs.shared.num_splits <= -(-cells // bs.shared.block_k)  # no empty splits
        # Every entry keeps the private kernel merging the shared splits (whole row tiles).
        assert 128 % bs.private.block_q == 0 and bs.private.num_splits == 1


@pytest.mark.parametrize("shape", [(1, 128, 4, 8, 2, 16), (4, 128, 4, 8, 2, 16),
                                   (2, 96, 1, 8, 2, 16)])
def test_cascade_rows_in_the_models_form_match_the_reference(shape):
    """`cascade_form="cells"` (gpu-query's) times the call as the model's step makes it:
    contiguous cells of a layer past the first, several branches in one K/V buffer; each
    row is checked against the reference on the same values, default and grid tiles."""
    cfg = kb_config.get_config("cpu")
    cfg.repeats, cfg.cascade_form = 1, "cells"
    peaks = dict(copy_bytes_per_s=1e10, matmul_flop_per_s=1e11)
    key = jax.random.key(sum(shape))
    rows = [kernel_bench.bench_cascade(cfg, peaks, shape, key)]
    rows += [kernel_bench.bench_cascade(cfg, peaks, shape, key,
                                        kernel_bench.cascade_block_sizes(cfg, shape, e))
             for e in cfg.tune_cascade]
    r, s, t, h, k, d = shape
    for row in rows:
        assert row["matches"] and row["max_abs_err"] < 1e-5, row
        assert (row["form"], row["window"], row["sessions"], row["context"]) == (
            "cells", s, r, s)
        assert row["bytes"] == 2 * r * t * h * d * 4 + (s + r * t) * k * d * 2 * 4
    assert rows[1]["tiles"]["shared"]["block_k"] == cfg.tune_cascade[0][1]
    assert kb_config.get_config("gpu-query").cascade_form == "cells"
    assert kb_config.get_config("gpu").cascade_form == "paged"


def test_an_unknown_cascade_form_is_refused():
    cfg = kb_config.get_config("cpu")
    cfg.cascade_form = "contiguous"
    with pytest.raises(ValueError, match="cascade_form='contiguous'; allowed"):
        kernel_bench.bench_cascade(cfg, {}, cfg.cascade[0], jax.random.key(0))


def test_seconds_take_device_time_from_chained_calls(monkeypatch):
    seen = {}

    def fake(fn, *args, calls, warmup, repeats):
        seen.update(fn=fn, args=args, calls=calls, warmup=warmup, repeats=repeats)
        return 2e-6

    monkeypatch.setattr(kernel_bench.roofline, "device_seconds_per_call", fake)
    cfg = kb_config.get_config("gpu")
    fn = object()
    assert kernel_bench._seconds(cfg, fn, "q", "k") == 2e-6
    assert seen == dict(fn=fn, args=("q", "k"), calls=8, warmup=cfg.warmup,
                        repeats=cfg.repeats)
    assert "8 chained calls" in kernel_bench.timing_label(cfg)
    assert "dispatch" in kernel_bench.timing_label(kb_config.get_config("cpu"))
