"""Measured tiles (`statejax.kernels.tuned`): recorded by the benchmark, read by the defaults."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import pytest

from configs import kernel_bench as kb_config
from statejax import platform
from statejax.errors import InputError
from statejax.kernels import append_attention as aa
from statejax.kernels import cascade_attention as ca
from statejax.kernels import decode_attention as da
from statejax.kernels import decode_attention_mgpu as dm
from statejax.kernels import tuned
from statejax.perf import kernel_bench

H100 = "NVIDIA H100 80GB HBM3"
DECODE = dict(batch=1, rows=128, k_heads=8, head_dim=64, itemsize=2)  # Llama-3.2-1B query
CASCADE = dict(branches=1, tokens=32, group=4, k_heads=8, head_dim=64, itemsize=2)
QUERY_SHAPE = dict(branches=1, tokens=32, group=4, k_heads=8, head_dim=64, shared_page_size=64,
                   private_page_size=32)


def _tiles(block_q=64, block_k=64, num_splits=32, num_warps=8):
    return dict(block_q=block_q, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
                num_stages=2)


def _decode(window, **tiles):
    return dict(kernel="decode", shape=DECODE, window=window, block_sizes=_tiles(**tiles),
                source="test")


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty table directory standing in for kernels/tuned/."""
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    return tmp_path


def test_lookup_takes_the_nearest_window_and_keeps_its_splits_only_near_it(table_dir):
    tuned.record(_decode(32768, num_splits=32), device_kind=H100)
    tuned.record(_decode(1024, block_q=32, block_k=128, num_splits=4), device_kind=H100)
    look = lambda window, shape=DECODE, kind=H100, usable=lambda bs: True: tuned.lookup(  # noqa
        "decode", shape, window, device_kind=kind, usable=usable)
    tiles, keep, _ = look(32768)
    assert (tiles["block_q"], tiles["num_splits"], keep) == (64, 32, True)
    assert look(40000)[1] is True and look(16384)[:2] == (tiles, False)  # log2 0.29, 1
    tiles, keep, _ = look(2048)  # nearer to 1k than to 32k
    assert (tiles["block_k"], tiles["num_splits"], keep) == (128, 4, False)
    assert look(1024)[1] is True
    # Another shape, another GPU, no usable tiles, or no GPU: nothing.
    assert look(32768, DECODE | {"rows": 16}) is None
    assert look(32768, kind="NVIDIA H200") is None and look(32768, kind=None) is None
    assert look(32768, usable=lambda bs: tuned.fits_pages(bs, 256)) is None
    assert look(32768, usable=lambda bs: tuned.fits_pages(bs, 128))[0]["block_k"] == 128
    with pytest.raises(InputError, match="a decode shape has exactly"):
        look(32768, CASCADE)


def test_record_replaces_the_same_shape_and_window_only(table_dir):
    tuned.record(_decode(32768, num_splits=16), device_kind=H100)
    tuned.record(_decode(1024, num_splits=4), device_kind=H100)
    path = tuned.record(_decode(32768, num_splits=64), device_kind=H100)
    assert path == table_dir / "NVIDIA_H100_80GB_HBM3.json"
    table = json.loads(path.read_text())
    assert table["device_kind"] == H100
    assert [(e["window"], e["block_sizes"]["num_splits"]) for e in table["entries"]] == [
        (1024, 4), (32768, 64)]


def test_a_rewrite_is_read_even_where_timestamps_are_coarse(table_dir):
    """Two writes of the same size within the file system's timestamp resolution look alike
    to the read cache; `record` reads past it and clears it."""
    path = tuned.record(_decode(1024, num_splits=2), device_kind=H100)
    stamp = path.stat()
    assert tuned.entries(H100)[0]["block_sizes"]["num_splits"] == 2  # now cached
    tuned.record(_decode(1024, num_splits=3), device_kind=H100)  # same size
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size
    assert tuned.entries(H100)[0]["block_sizes"]["num_splits"] == 3
    tuned.record(_decode(2048, num_splits=4), device_kind=H100)
    assert [e["window"] for e in tuned.entries(H100)] == [1024, 2048]


def test_a_malformed_table_is_refused_with_its_path(table_dir):
    tuned.table_path(H100).write_text(json.dumps({"entries": [{"kernel": "decode"}]}))
    with pytest.raises(InputError, match="NVIDIA_H100_80GB_HBM3.json.*lacks"):
        tuned.entries(H100)
    tuned.table_path(H100).write_text("not json")
    with pytest.raises(InputError, match="not a tuned-tiles table"):
        tuned.entries(H100)
    with pytest.raises(InputError, match=r"decode block_sizes \(triton\) must be"):
        tuned.record(_decode(1024) | {"block_sizes": {"block_q": 16}}, device_kind=H100)
    with pytest.raises(InputError, match=r"cascade block_sizes \(triton\) must be"):
        tuned.record(dict(kernel="cascade", shape=CASCADE, window=1024,
                          block_sizes=_tiles()), device_kind=H100)
    # Values, not only keys: a lookup takes log2 of the window and compares shapes and times.
    for bad, match in ((_decode(0), r"\{'window': 0\}"), (_decode("1024"), "'window': '1024'"),
                       (_decode(1024, block_k="64"), "'block_sizes.block_k': '64'"),
                       (_decode(1024) | {"shape": DECODE | {"rows": "128"}},
                        "'shape.rows': '128'"),
                       (_decode(1024) | {"ms": -1.0}, "ms=-1.0"),
                       (_decode(1024) | {"ms": True}, "ms=True")):
        with pytest.raises(InputError, match=match):
            tuned.record(bad, device_kind=H100)
    tuned.table_path(H100).write_text(json.dumps({"device_kind": H100,
                                                  "entries": [_decode(-1024)]}))
    with pytest.raises(InputError, match="NVIDIA_H100_80GB_HBM3.json.*positive ints"):
        tuned.lookup("decode", DECODE, 1024, device_kind=H100)


def _cascade(window, backend, ms, shared):
    return dict(kernel="cascade", shape=CASCADE, window=window, backend=backend, ms=ms,
                block_sizes=dict(shared=shared, private=_tiles(32, 32, 1, 4)), source="test")


_MOSAIC = dict(block_k=128, max_concurrent_steps=4, num_splits=16)


def test_lookup_takes_the_fastest_backend_allowed_at_the_nearest_window(table_dir):
    tuned.record(_cascade(32768, "triton", 0.5, _tiles()), device_kind=H100)
    tuned.record(_cascade(32768, "mosaic_gpu", 0.3, _MOSAIC), device_kind=H100)
    tuned.record(_cascade(1024, "triton", 0.02, _tiles(num_splits=2)), device_kind=H100)
    tuned.record(_cascade(1024, "mosaic_gpu", 0.04, _MOSAIC | {"num_splits": 2}),
                 device_kind=H100)
    assert len(tuned.entries(H100)) == 4  # one entry per backend: neither replaced the other
    assert {(e["window"], e["backend"]) for e in tuned.entries(H100)} == {
        (32768, "triton"), (32768, "mosaic_gpu"), (1024, "triton"), (1024, "mosaic_gpu")}
    look = lambda window, backends: tuned.lookup(  # noqa: E731
        "cascade", CASCADE, window, device_kind=H100, backends=backends)
    shared = lambda found: (found.block_sizes["shared"], *found[1:])  # noqa: E731
    assert shared(look(32768, ("triton", "mosaic_gpu"))) == (_MOSAIC, True, "mosaic_gpu")
    assert shared(look(32768, ("triton",))) == (_tiles(), True, "triton")
    assert look(1024, ("triton", "mosaic_gpu")).backend == "triton"  # faster there
    assert look(2048, ("mosaic_gpu",))[1:] == (False, "mosaic_gpu")
    # Two windows equally near: the smaller's entries, not the faster across windows.
    tuned.record(_cascade(4096, "mosaic_gpu", 0.01, _MOSAIC), device_kind=H100)
    assert look(2048, ("triton", "mosaic_gpu"))[1:] == (False, "triton")
    # Equal or missing times: Triton.
    tuned.record(_cascade(8192, "triton", None, _tiles()), device_kind=H100)
    tuned.record(_cascade(8192, "mosaic_gpu", None, _MOSAIC), device_kind=H100)
    assert look(8192, ("triton", "mosaic_gpu")).backend == "triton"
    # Tables written before the field: their entries are Triton's.
    legacy = _cascade(16384, "triton", 0.1, _tiles())
    del legacy["backend"]
    tuned.record(legacy, device_kind=H100)
    assert shared(look(16384, ("triton", "mosaic_gpu"))) == (_tiles(), True, "triton")
    with pytest.raises(InputError, match=r"cascade block_sizes \(mosaic_gpu\) must be"):
        tuned.record(_cascade(1024, "mosaic_gpu", 0.1, _tiles()), device_kind=H100)
    with pytest.raises(InputError, match="decode entry's backend is one of"):
        tuned.record(_decode(1024) | {"backend": "mosaic_gpu"}, device_kind=H100)


def test_the_shape_rule_stands_where_it_measured_faster_than_the_entries(table_dir):
    """A Mosaic grid's best that lost to the Triton rule in its run (as on the H100 at 1k
    cells, 2026-11-27) is not taken by a caller that may run Triton; one that asks for
    Mosaic still gets it."""
    slow = _cascade(1024, "mosaic_gpu", 0.0168, _MOSAIC) | {"default_ms": 0.0113}
    tuned.record(slow, device_kind=H100)
    look = lambda window, backends: tuned.lookup(  # noqa: E731
        "cascade", CASCADE, window, device_kind=H100, backends=backends)
    assert look(1024, ("triton", "mosaic_gpu")) is None
    assert look(1024, ("mosaic_gpu",)).block_sizes["shared"] == _MOSAIC
    tuned.record(slow | {"default_ms": 0.02}, device_kind=H100)  # the entry won its run
    assert look(1024, ("triton", "mosaic_gpu")).backend == "mosaic_gpu"
    # Triton entries carry the rule's time too: the faster of the two stands.
    tuned.record(_cascade(32768, "triton", 0.07, _tiles()) | {"default_ms": 0.06},
                 device_kind=H100)
    assert look(32768, ("triton",)) is None
    with pytest.raises(InputError, match="default_ms=0"):
        tuned.record(slow | {"default_ms": 0}, device_kind=H100)


def test_cascade_takes_the_mosaic_shared_part_where_measured_faster(table_dir, monkeypatch):
    query = dict(interpret=False, rows=128, head_dim=64, itemsize=2, page_size=64)
    both = ca.measured_backends(**query)
    assert both == ("triton", "mosaic_gpu") == ca.measured_backends(**query | {"page_size": None})
    # Where the Mosaic kernel cannot run the call, only Triton tiles are taken.
    for kw in (dict(interpret=True), dict(rows=160), dict(itemsize=4), dict(head_dim=80),
               dict(head_dim=320), dict(page_size=4), dict(page_size=512)):
        assert ca.measured_backends(**query | kw) == ("triton",), kw
    tuned.record(_cascade(32768, "triton", 0.5, _tiles()), device_kind=H100)
    tuned.record(_cascade(32768, "mosaic_gpu", 0.3, _MOSAIC), device_kind=H100)
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    private = aa.BlockSizes(**_tiles(32, 32, 1, 4))
    mosaic = ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=32768, backends=both)
    assert mosaic == ca.BlockSizes(dm.MosaicDecodeBlockSizes(**_MOSAIC), private)
    assert ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=32768) == ca.BlockSizes(
        aa.BlockSizes(**_tiles()), private)  # Triton only unless asked
    # An explicit Mosaic backend takes the measured Mosaic tiles too, whatever Triton's time.
    assert ca.BlockSizes.for_mosaic(**QUERY_SHAPE, shared_window=32768) == mosaic
    far = ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=4096, backends=both)
    assert far.shared == dm.MosaicDecodeBlockSizes(128, 4, dm.default_splits(
        batch=1, k_heads=8, block_k=128, window=4096)) != mosaic.shared


def test_the_model_path_leaves_the_cascade_backend_to_the_table(table_dir, monkeypatch):
    """`cascade_attention_cells(backend=None)` (what BranchView calls) passes the measured
    choice on: Mosaic tiles when compiled, Triton tiles in interpret mode."""
    tuned.record(_cascade(32768, "triton", 0.5, _tiles()), device_kind=H100)
    tuned.record(_cascade(32768, "mosaic_gpu", 0.3, _MOSAIC), device_kind=H100)
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    seen = {}
    monkeypatch.setattr(ca, "cascade_attention",
                        lambda *args, **kwargs: seen.update(kwargs) or ("out", "lse"))
    cells = jax.ShapeDtypeStruct((16, 1, 33792, 8, 64), jnp.bfloat16)
    branch = jax.ShapeDtypeStruct((16, 1, 96, 8, 64), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((1, 32, 32, 64), jnp.bfloat16)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    for interpret, shared in ((False, dm.MosaicDecodeBlockSizes(**_MOSAIC)),
                              (True, aa.BlockSizes(**_tiles()))):
        call = functools.partial(ca.cascade_attention_cells.__wrapped__, layer=3,
                                 shared_window=32768, interpret=interpret, backend=None)
        jax.eval_shape(lambda *a, call=call: call(*a)[0] and None, q, cells, cells, i32, i32,
                       branch, branch, jax.ShapeDtypeStruct((1,), jnp.int32))
        assert seen["block_sizes"].shared == shared and seen["backend"] is None


def test_decode_defaults_use_measured_tiles_on_that_gpu_only(table_dir, monkeypatch):
    shape = dict(batch=1, rows=128, k_heads=8, head_dim=64, page_size=64, itemsize=2)
    rule = da.default_block_sizes(**shape, window=32768)  # no GPU: the rule
    tuned.record(_decode(32768, block_q=32, block_k=64, num_splits=4, num_warps=8),
                 device_kind=H100)
    assert da.default_block_sizes(**shape, window=32768) == rule  # still no GPU
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    measured = aa.BlockSizes(block_q=32, block_k=64, num_splits=4, num_warps=8,
                             num_stages=2)
    assert da.default_block_sizes(**shape, window=32768) == measured != rule
    # Far from the measured window the split rule applies to the measured tiles.
    far = da.default_block_sizes(**shape, window=4096)
    assert far == dataclasses.replace(measured, num_splits=da.default_splits(
        batch=1, rows=128, k_heads=8, block_q=32, block_k=64, window=4096)) != measured


def test_a_preloaded_tile_is_recorded_and_read_back(table_dir, monkeypatch):
    """Tiles with `preload_pages` (a flag entries recorded before it lack) round-trip through
    the table; a flag that is not a bool is refused."""
    shape = dict(batch=1, rows=128, k_heads=8, head_dim=64, page_size=64, itemsize=2)
    entry = _decode(32768, block_q=32, num_splits=4)
    entry["block_sizes"] |= dict(num_stages=3, preload_pages=True)
    tuned.record(entry, device_kind=H100)
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    assert da.default_block_sizes(**shape, window=32768) == aa.BlockSizes(
        block_q=32, block_k=64, num_splits=4, num_warps=8, num_stages=3, preload_pages=True)
    entry["block_sizes"]["preload_pages"] = 1
    with pytest.raises(InputError, match="'block_sizes.preload_pages': 1"):
        tuned.record(entry, device_kind=H100)
    entry["block_sizes"] = _tiles() | dict(unknown=True)
    with pytest.raises(InputError, match="may add"):
        tuned.record(entry, device_kind=H100)


def test_cascade_defaults_use_measured_tiles_on_that_gpu_only(table_dir, monkeypatch):
    rule = ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=32768)
    big_pages = QUERY_SHAPE | {"private_page_size": 128}
    rule_big_pages = ca.BlockSizes.for_shape(**big_pages, shared_window=32768)
    shared, private = _tiles(64, 64, 16, 8), _tiles(32, 64, 1, 4)
    tuned.record(dict(kernel="cascade", shape=CASCADE, window=32768,
                      block_sizes=dict(shared=shared, private=private)), device_kind=H100)
    # A decode entry of the same rows is not a cascade entry.
    tuned.record(_decode(32768, block_q=128, num_splits=64), device_kind=H100)
    assert ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=32768) == rule
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    measured = ca.BlockSizes(shared=aa.BlockSizes(**shared), private=aa.BlockSizes(**private))
    assert ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=32768) == measured != rule
    far = ca.BlockSizes.for_shape(**QUERY_SHAPE, shared_window=1024)
    assert far.private == measured.private and far.shared == dataclasses.replace(
        measured.shared, num_splits=da.default_splits(batch=1, rows=128, k_heads=8,
                                                      block_q=64, block_k=64, window=1024))
    # Private pages larger than the measured private block: the rule, whose shared part is
    # the decode default of its rows, here the decode entry.
    assert ca.BlockSizes.for_shape(**big_pages, shared_window=32768) == dataclasses.replace(
        rule_big_pages, shared=aa.BlockSizes(128, 64, 64, 8, 2))


def test_the_bench_records_the_fastest_tiles_of_each_grid_shape(tmp_path):
    cfg = kb_config.get_config("cpu")
    cfg.update(repeats=1, append=(), tune_append=())
    results = kernel_bench.run(cfg, str(tmp_path / "run"))
    paths = kernel_bench.record_tuned(results, str(tmp_path / "tuned"))
    table = tmp_path / "tuned"
    assert set(paths) == {str(tuned.table_path("cpu", table))}
    by_kernel = {e["kernel"]: e for e in tuned.entries("cpu", table)}
    assert sorted(by_kernel) == ["cascade", "decode"]  # one grid shape each
    for kernel, shape in (("decode", cfg.decode[0]), ("cascade", cfg.cascade[0])):
        timed = [r for r in results["rows"] if r["kernel"] == kernel
                 and (r["sessions"], r["context"], r["t"]) == shape[:3]]
        grid = cfg.tune_decode if kernel == "decode" else cfg.tune_cascade
        assert len(timed) == 1 + len(grid)
        assert all(r["matches"] and r["max_abs_err"] < 1e-4 for r in timed)
        fastest, entry = min(timed, key=lambda r: r["ms"]), by_kernel[kernel]
        assert entry["block_sizes"] == fastest["tiles"] and entry["ms"] == fastest["ms"]
        assert entry["window"] == fastest["window"] and entry["default_ms"] == timed[0]["ms"]
        assert "jax" in entry["source"] and entry["backend"] == "triton"
    b, _, t, h, k, d = cfg.cascade[0]
    assert by_kernel["cascade"]["shape"] == dict(branches=b, tokens=t, group=h // k,
                                                 k_heads=k, head_dim=d, itemsize=4)
    b, _, t, h, k, d = cfg.decode[0]
    assert by_kernel["decode"]["shape"] == dict(batch=b, rows=t * h // k, k_heads=k,
                                                head_dim=d, itemsize=4)


def test_contiguous_cells_take_measured_tiles_whatever_their_kv_block(table_dir, monkeypatch):
    """The model's cells (C = 33792 here, so 128-cell pages would fit) are viewed as pages of
    the chosen KV block: a measured 64-cell block is usable, not rejected by the view."""
    shared, private = _tiles(64, 64, 16, 8), _tiles(128, 128, 1, 4)
    tuned.record(dict(kernel="cascade", shape=CASCADE, window=32768,
                      block_sizes=dict(shared=shared, private=private)), device_kind=H100)
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs, shared_page_size=args[1].shape[1])
        return "out", "lse"

    monkeypatch.setattr(ca, "cascade_attention", spy)
    cells = jax.ShapeDtypeStruct((16, 1, 33792, 8, 64), jnp.bfloat16)
    branch = jax.ShapeDtypeStruct((16, 1, 96, 8, 64), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((1, 32, 32, 64), jnp.bfloat16)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    jax.eval_shape(lambda *a: ca.cascade_attention_cells.__wrapped__(
        *a, layer=3, shared_window=32768, interpret=False)[0] and None,
        q, cells, cells, i32, i32, branch, branch, jax.ShapeDtypeStruct((1,), jnp.int32))
    assert seen["block_sizes"] == ca.BlockSizes(aa.BlockSizes(**shared),
                                                aa.BlockSizes(**private))
    assert seen["shared_page_size"] == 64  # one page per 64-cell KV block


def test_the_stream_study_records_the_tiles_it_ran(table_dir, monkeypatch):
    from statejax.studies import latency  # noqa: PLC0415

    tuned.record(_decode(32768) | {"ms": 0.1}, device_kind=H100)
    assert latency.tuned_tiles("pallas") == []  # no GPU compiled for: no table read
    monkeypatch.setattr(platform, "device_kind", lambda: H100)
    (entry,) = latency.tuned_tiles("pallas")
    assert entry["block_sizes"] == _tiles() and entry["ms"] == 0.1 and entry["source"] == "test"
    assert latency.tuned_tiles("reference") == []
    note = latency._tiles_note({"config": {"impl": "pallas"}, "tuned_tiles": [entry]})
    assert note == " (kernel tiles: 1 measured entries of kernels/tuned/ for this GPU, else " \
                   "the shape rules)"


def test_the_bench_records_each_backends_fastest_matching_tiles():
    """Of one cascade shape's rows: per backend the fastest whose output matched the
    reference; a faster row that did not match is never recorded."""
    shape = dict(kernel="cascade", sessions=1, context=32768, t=32, heads=32, kv_heads=8,
                 head_dim=64, window=32768, frac_copy=0.5)
    row = lambda ms, backend, blocks, matches=True: shape | dict(  # noqa: E731
        ms=ms, backend=backend, blocks=blocks, matches=matches, tiles={"ms": ms})
    results = dict(dtype="bfloat16", timing="t", variant="gpu-query", device="gpu: H100",
                   jax_version="0.11.2", date="today", rows=[
                       row(0.9, "triton", "default"), row(0.7, "triton", "grid"),
                       row(0.1, "triton", "grid", matches=False),
                       row(0.5, "mosaic_gpu", "mosaic_gpu default"),
                       row(0.05, "mosaic_gpu", "grid", matches=False)])
    entries = kernel_bench.tuned_entries(results)
    assert [(e["backend"], e["ms"], e["block_sizes"], e["default_ms"]) for e in entries] == [
        ("triton", 0.7, {"ms": 0.7}, 0.9), ("mosaic_gpu", 0.5, {"ms": 0.5}, 0.9)]
    assert entries[0]["shape"] == CASCADE
    mismatched = [r | {"matches": False} for r in results["rows"]]
    assert kernel_bench.tuned_entries(results | {"rows": mismatched}) == []
    only = kernel_bench.tuned_entries(results, backends=("mosaic_gpu",))
    assert [(e["backend"], e["ms"], e["default_ms"]) for e in only] == [("mosaic_gpu", 0.5, 0.9)]


def test_a_second_process_records_only_its_backend(tmp_path):
    """The session script times the Triton grid and the Mosaic shared part in two processes
    into one table: the second, recording only "mosaic_gpu", keeps the first's Triton grid
    winner although its own Triton default row is in its results."""
    shape = dict(kernel="cascade", sessions=1, context=32768, t=32, heads=32, kv_heads=8,
                 head_dim=64, window=32768, frac_copy=0.5)
    private = _tiles(128, 32, 1, 4)
    tiles = {"triton": lambda ms: {"shared": _tiles(num_splits=int(ms * 100)),  # noqa: E731
                                   "private": private},
             "mosaic_gpu": lambda ms: {"shared": dict(block_k=128, max_concurrent_steps=4,
                                                      num_splits=int(ms * 100)),
                                       "private": private}}
    row = lambda ms, backend, blocks: shape | dict(  # noqa: E731
        ms=ms, backend=backend, blocks=blocks, matches=True, tiles=tiles[backend](ms))
    run = lambda rows: dict(dtype="bfloat16", timing="t", variant="gpu-query",  # noqa: E731
                            device="gpu: H100", jax_version="0.11.2", date="today", rows=rows)
    first = run([row(0.9, "triton", "default"), row(0.7, "triton", "grid")])
    second = run([row(0.95, "triton", "default"), row(0.6, "mosaic_gpu", "mosaic_gpu default"),
                  row(0.5, "mosaic_gpu", "grid")])
    kernel_bench.record_tuned(first, str(tmp_path))
    kernel_bench.record_tuned(second, str(tmp_path), backends=("mosaic_gpu",))
    got = {(e["backend"], e["ms"]) for e in tuned.entries("H100", tmp_path)}
    assert got == {("triton", 0.7), ("mosaic_gpu", 0.5)}
    kernel_bench.record_tuned(second, str(tmp_path))  # all backends: its default replaces it
    assert {(e["backend"], e["ms"]) for e in tuned.entries("H100", tmp_path)} == {
        ("triton", 0.95), ("mosaic_gpu", 0.5)}


def _cpu_cascade_results(cfg, ms_rows):
    """Synthetic bench results: rows of the cpu config's first cascade shape with its
    default tiles (Triton, interpret mode), at the given times."""
    r, s, t, h, k, d = cfg.cascade[0]
    tiles = dataclasses.asdict(ca.BlockSizes.for_shape(
        branches=r, tokens=t, group=h // k, k_heads=k, head_dim=d,
        shared_page_size=cfg.page_size, shared_window=s,
        private_page_size=kernel_bench.branch_page_size(cfg, t), itemsize=4))
    rows = [dict(kernel="cascade", sessions=r, context=s, t=t, heads=h, kv_heads=k,
                 head_dim=d, window=s, frac_copy=0.1, ms=ms, backend="triton", matches=True,
                 blocks="default" if i == 0 else "grid", tiles=tiles)
            for i, ms in enumerate(ms_rows)]
    return dict(dtype=cfg.dtype, timing="t", variant="cpu", device="cpu: cpu",
                jax_version=jax.__version__, date="today", rows=rows)


def test_cascade_entries_are_recorded_only_if_the_model_form_matches(tmp_path, monkeypatch):
    """`record_tuned` with the run's config runs each cascade entry's tiles through the cells
    form the model calls; a mismatch there keeps the entry out of the table."""
    cfg = kb_config.get_config("cpu")
    results = _cpu_cascade_results(cfg, [0.2, 0.1])
    (entry,) = kernel_bench.tuned_entries(results)
    checked = kernel_bench.check_cells_form(cfg, entry, jax.random.key(0))
    assert checked["matches"] and checked["max_abs_err"] < 1e-4
    table = tmp_path / "tuned"
    assert kernel_bench.record_tuned(results, str(table), cfg)
    (recorded,) = tuned.entries("cpu", table)
    assert 0 < recorded["cells_form_max_abs_err"] < 1e-4
    # A kernel whose cells form is wrong (here: its output shifted) is not recorded.
    real = ca.cascade_attention_cells
    monkeypatch.setattr(ca, "cascade_attention_cells",
                        lambda *a, **kw: (lambda out, lse: (out + 1, lse))(*real(*a, **kw)))
    other = tmp_path / "other"
    assert not kernel_bench.check_cells_form(cfg, entry, jax.random.key(0))["matches"]
    assert kernel_bench.record_tuned(results, str(other), cfg) == []
    assert tuned.entries("cpu", other) == ()
    # One that raises there is skipped too, and the benchmark goes on to its other entries.
    def broken(*a, **kw):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(ca, "cascade_attention_cells", broken)
    decode_row = dict(results["rows"][0], kernel="decode", tiles=_tiles(16, 16, 1, 4))
    both = results | {"rows": results["rows"] + [decode_row, decode_row | {"ms": 0.05}]}
    assert kernel_bench.record_tuned(both, str(other), cfg)
    assert [e["kernel"] for e in tuned.entries("cpu", other)] == ["decode"]


def test_linear_entries_hold_the_fused_kernels_tiles(table_dir):
    """A "linear" entry (`fused_linear.tuned_shape`, `LinearBlocks` fields) is read back by
    exact shape; one with other tiles or shape fields is refused with what is allowed."""
    shape = dict(rows=32, k=2048, n=2048, weights=1, strips=1, itemsize=2)
    tiles = dict(block_m=32, block_n=32, block_k=256, num_warps=8, num_stages=4)
    tuned.record(dict(kernel="linear", shape=shape, window=32, block_sizes=tiles, ms=1e-3,
                      default_ms=2e-3), device_kind=H100)
    found = tuned.lookup("linear", shape, 32, device_kind=H100)
    assert found == tuned.Found(tiles, True, "triton")
    assert tuned.lookup("linear", shape | {"rows": 16}, 16, device_kind=H100) is None
    with pytest.raises(InputError, match="linear block_sizes"):
        tuned.record(dict(kernel="linear", shape=shape, window=32,
                          block_sizes=_tiles()), device_kind=H100)
    with pytest.raises(InputError, match="a linear shape has exactly"):
        tuned.record(dict(kernel="linear", shape=DECODE, window=32, block_sizes=tiles),
                     device_kind=H100)
