"""Measured tiles (`statejax.kernels.tuned`): recorded by the benchmark, read by the defaults."""

import json

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
QUERY = dict(batch=1, rows=128, k_heads=8, head_dim=64, itemsize=2)  # Llama-3.2-1B query


def _entry(window, block_q=64, block_k=64, num_splits=32, num_warps=8, **key):
    return dict(kernel="decode", **(QUERY | key), window=window, source="test",
                block_sizes=dict(block_q=block_q, block_k=block_k, num_splits=num_splits,
                                 num_warps=num_warps, num_stages=2))


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty table directory standing in for kernels/tuned/."""
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    return tmp_path


def test_lookup_takes_the_nearest_window_and_keeps_its_splits_only_near_it(table_dir):
    tuned.record(_entry(32768, num_splits=32), device_kind=H100)
    tuned.record(_entry(1024, block_q=32, block_k=128, num_splits=4), device_kind=H100)
    look = lambda window, **kw: tuned.decode_tiles(  # noqa: E731
        device_kind=H100, **(QUERY | kw), page_size=64, window=window)
    tiles, keep = look(32768)
    assert (tiles["block_q"], tiles["num_splits"], keep) == (64, 32, True)
    assert look(40000)[1] is True and look(16384) == (tiles, False)  # log2 ratio 0.29, 1
    tiles, keep = look(2048)  # nearer to 1k than to 32k
    assert (tiles["block_k"], tiles["num_splits"], keep) == (128, 4, False)
    assert look(1024)[1] is True
    # Another shape, another GPU, pages larger than every entry's KV block, or no GPU:
    # nothing.
    assert look(32768, rows=16) is None and look(32768, head_dim=128) is None
    assert tuned.decode_tiles(device_kind="NVIDIA H200", **QUERY, page_size=64,
                              window=32768) is None
    assert tuned.decode_tiles(device_kind=H100, **QUERY, page_size=256, window=32768) is None
    assert tuned.decode_tiles(device_kind=None, **QUERY, page_size=64, window=32768) is None


def test_record_replaces_the_same_shape_and_window_only(table_dir):
    tuned.record(_entry(32768, num_splits=16), device_kind=H100)
    tuned.record(_entry(1024, num_splits=4), device_kind=H100)
    path = tuned.record(_entry(32768, num_splits=64), device_kind=H100)
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
    with pytest.raises(InputError, match="block_sizes must have exactly"):
        tuned.record(_entry(1024) | {"block_sizes": {"block_q": 16}}, device_kind=H100)


def test_defaults_use_measured_tiles_on_that_gpu_only(table_dir, monkeypatch):
    shape = dict(batch=1, rows=128, k_heads=8, head_dim=64, page_size=64, itemsize=2)
    rule = da.default_block_sizes(**shape, window=32768)  # no GPU: the rule
    rule_cascade = ca.BlockSizes.for_shape(
        branches=1, tokens=32, group=4, k_heads=8, head_dim=64, shared_page_size=64,
        shared_window=32768, private_page_size=32).shared
    tuned.record(_entry(32768, block_q=64, block_k=64, num_splits=32, num_warps=8),
                 device_kind=H100)
    assert da.default_block_sizes(**shape, window=32768) == rule  # still no GPU
    monkeypatch.setattr(gpu_target, "device_kind", lambda: H100)
    measured = aa.BlockSizes(block_q=64, block_k=64, num_splits=32, num_warps=8,
                             num_stages=2)
    assert da.default_block_sizes(**shape, window=32768) == measured != rule
    # The cascade's shared part (rows of its branches folded) takes them as they are...
    cascade = ca.BlockSizes.for_shape(
        branches=1, tokens=32, group=4, k_heads=8, head_dim=64, shared_page_size=64,
        shared_window=32768, private_page_size=32)
    assert cascade.shared == measured != rule_cascade
    # ... and far from the measured window the split rule applies to the measured tiles.
    far = da.default_block_sizes(**shape, window=4096)
    assert far == aa.BlockSizes(64, 64, da.default_splits(
        batch=1, rows=128, k_heads=8, block_q=64, block_k=64, window=4096), 8, 2)


def test_the_bench_records_the_fastest_tiles_of_each_grid_shape(tmp_path):
    cfg = kb_config.get_config("cpu")
    cfg.update(repeats=1, append=(), cascade=(), tune_append=())
    results = kernel_bench.run(cfg, str(tmp_path / "run"))
    rows = [r for r in results["rows"] if r["kernel"] == "decode"]
    grid_shape = rows[0]["sessions"], rows[0]["context"], rows[0]["t"]
    timed = [r for r in rows if (r["sessions"], r["context"], r["t"]) == grid_shape]
    assert len(timed) == 1 + len(cfg.tune_decode)
    paths = kernel_bench.record_tuned(results, str(tmp_path / "tuned"))
    (entry,) = tuned.entries("cpu", tmp_path / "tuned")  # only the first shape had a grid
    assert paths == [str(tuned.table_path("cpu", tmp_path / "tuned"))]
    fastest = min(timed, key=lambda r: r["ms"])
    b, s, t, h, k, d = cfg.decode[0]
    assert entry["block_sizes"] == fastest["tiles"] and entry["ms"] == fastest["ms"]
    assert (entry["batch"], entry["rows"], entry["k_heads"], entry["head_dim"],
            entry["window"]) == (b, t * h // k, k, d, fastest["window"])
    assert entry["default_ms"] == timed[0]["ms"] and "jax" in entry["source"]
    found, keep = tuned.decode_tiles(device_kind="cpu", batch=b, rows=t * h // k, k_heads=k,
                                     head_dim=d, itemsize=4, page_size=cfg.page_size,
                                     window=fastest["window"], directory=tmp_path / "tuned")
    assert found == fastest["tiles"] and keep
