"""Measured tiles (`statejax.kernels.tuned`): recorded by the benchmark, read by the defaults."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from configs import kernel_bench as kb_config
from experiments import kernel_bench
from statejax import gpu_target
from statejax.errors import InputError
from statejax.kernels import append_attention as aa
from statejax.kernels import cascade_attention as ca
from statejax.kernels import decode_attention as da
from statejax.kernels import tuned

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
    tiles, keep = look(32768)
    assert (tiles["block_q"], tiles["num_splits"], keep) == (64, 32, True)
    assert look(40000)[1] is True and look(16384) == (tiles, False)  # log2 ratio 0.29, 1
    tiles, keep = look(2048)  # nearer to 1k than to 32k
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


def test_a_malformed_table_is_refused_with_its_path(table_dir):
    tuned.table_path(H100).write_text(json.dumps({"entries": [{"kernel": "decode"}]}))
    with pytest.raises(InputError, match="NVIDIA_H100_80GB_HBM3.json.*lacks"):
        tuned.entries(H100)
    tuned.table_path(H100).write_text("not json")
    with pytest.raises(InputError, match="not a tuned-tiles table"):
        tuned.entries(H100)
    with pytest.raises(InputError, match="decode block_sizes must be"):
        tuned.record(_decode(1024) | {"block_sizes": {"block_q": 16}}, device_kind=H100)
    with pytest.raises(InputError, match="cascade block_sizes must be"):
        tuned.record(dict(kernel="cascade", shape=CASCADE, window=1024,
                          block_sizes=_tiles()), device_kind=H100)


def test_decode_defaults_use_measured_tiles_on_that_gpu_only(table_dir, monkeypatch):
    shape = dict(batch=1, rows=128, k_heads=8, head_dim=64, page_size=64, itemsize=2)
    rule = da.default_block_sizes(**shape, window=32768)  # no GPU: the rule
    tuned.record(_decode(32768, block_q=32, block_k=64, num_splits=4, num_warps=8),
                 device_kind=H100)
    assert da.default_block_sizes(**shape, window=32768) == rule  # still no GPU
    monkeypatch.setattr(gpu_target, "device_kind", lambda: H100)
    measured = aa.BlockSizes(block_q=32, block_k=64, num_splits=4, num_warps=8,
                             num_stages=2)
    assert da.default_block_sizes(**shape, window=32768) == measured != rule
    # Far from the measured window the split rule applies to the measured tiles.
    far = da.default_block_sizes(**shape, window=4096)
    assert far == dataclasses.replace(measured, num_splits=da.default_splits(
        batch=1, rows=128, k_heads=8, block_q=32, block_k=64, window=4096)) != measured


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
    monkeypatch.setattr(gpu_target, "device_kind", lambda: H100)
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
        fastest, entry = min(timed, key=lambda r: r["ms"]), by_kernel[kernel]
        assert entry["block_sizes"] == fastest["tiles"] and entry["ms"] == fastest["ms"]
        assert entry["window"] == fastest["window"] and entry["default_ms"] == timed[0]["ms"]
        assert "jax" in entry["source"]
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
    monkeypatch.setattr(gpu_target, "device_kind", lambda: H100)
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
    from statejax import latency  # noqa: PLC0415

    tuned.record(_decode(32768) | {"ms": 0.1}, device_kind=H100)
    assert latency.tuned_tiles("pallas") == []  # no GPU compiled for: no table read
    monkeypatch.setattr(gpu_target, "device_kind", lambda: H100)
    (entry,) = latency.tuned_tiles("pallas")
    assert entry["block_sizes"] == _tiles() and entry["ms"] == 0.1 and entry["source"] == "test"
    assert latency.tuned_tiles("reference") == []
    note = latency._tiles_note({"config": {"impl": "pallas"}, "tuned_tiles": [entry]})
    assert note == " (kernel tiles: 1 measured entries of kernels/tuned/ for this GPU, else " \
                   "the shape rules)"
