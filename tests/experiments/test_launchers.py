"""The latency study end to end at test size: results, report files, and the notebook."""

import json
import math
import pathlib

import pytest

from configs import stream_latency
from statejax.errors import InputError
from statejax.studies import latency
from tests import notebook_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMINGS = ("stateful_query_ms", "stateless_query_ms", "prefix_cache_query_ms", "flash_hit_ms",
           "append_ms", "ingest_ms_per_bar", "flash_refresh_ms")


def test_tiny_run_writes_results_and_notebook_plots_them(tmp_path):
    config = stream_latency.get_config("tiny")
    # A peer JSON in hf_peer.py's format with a row for two of the three context sizes.
    peer = {"torch": "x", "device": "cpu", "rows": [
        {"N": 64, "stateless_ms": 9.0, "hf_cache_append_ms": 7.5, "ratio": 1.2},
        {"N": 256, "stateless_ms": 9.0, "hf_cache_append_ms": 30.0, "ratio": 0.3}]}
    (tmp_path / "hf_peer.json").write_text(json.dumps(peer))
    config.roofline.update(peer_json=str(tmp_path / "hf_peer.json"), floor_bound=1e9,
                           peer_bound=0.0)
    results = latency.run_stream_latency(config)
    paths = latency.write_results(results, str(tmp_path))

    saved = json.loads(pathlib.Path(paths["json"]).read_text())
    for key in ("rows", "device", "jax_version", "model", "date", "tokens_per_bar", "config",
                "targets"):
        assert key in saved, key
    assert [r["target_tokens"] for r in saved["rows"]] == list(config.context_sizes)
    previous = 0
    for row in saved["rows"]:
        assert previous < row["context_tokens"] <= row["target_tokens"]
        previous = row["context_tokens"]
        for key in TIMINGS:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert row["same_first_token"]
        assert row["flash_items_behind"] == 0
        # The previous prompt is the context before the latest batch: its full pages are reused.
        assert row["prefix_cache_reused_tokens"] % config.budget.page_size == 0
        # The floor: weights + K/V of context and question, read once at the copy bandwidth.
        nbytes = (saved["model"]["weight_bytes"] + (row["context_tokens"] + 32)
                  * saved["model"]["kv_bytes_per_token"])
        assert math.isclose(row["floor_ms"], 1e3 * nbytes / saved["copy_bytes_per_s"])
        assert math.isclose(row["stateful_over_floor"],
                            row["stateful_query_ms"] / row["floor_ms"])
    hf = {r["target_tokens"]: r.get("hf_kept_cache_ms") for r in saved["rows"]}
    assert hf == {64: 7.5, 128: None, 256: 30.0}
    # The peer's own context (the target N) is recorded beside the session's, and shown.
    assert [r.get("hf_context_tokens") for r in saved["rows"]] == [64, None, 256]
    targets = {t["name"]: t for t in saved["targets"]}
    assert math.isclose(targets["stateful / floor, worst context"]["value"],
                        max(r["stateful_over_floor"] for r in saved["rows"]))
    assert math.isclose(targets["HF kept-cache / stateful, worst context"]["value"],
                        min(r["hf_kept_cache_ms"] / r["stateful_query_ms"]
                            for r in saved["rows"] if r["target_tokens"] != 128))
    model = saved["model"]
    for key in ("layers", "width", "heads", "kv_heads", "head_dim", "params", "weight_bytes",
                "kv_bytes_per_token"):
        assert model[key] > 0, key
    assert saved["tokens_per_bar"] > 0 and saved["question_tokens"] == 32
    md = pathlib.Path(paths["md"]).read_text()
    assert "| stateful ms |" in md and "| HF / stateful |" in md
    assert "30.0 @256 |" in md
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| context tokens"))
    header, rule = lines[at:at + 2]
    assert header.count("|") == rule.count("|") and "|  |" not in header
    assert pathlib.Path(paths["png"]).stat().st_size > 0

    outputs = notebook_run.execute("latency_vs_context.ipynb", tmp_path)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_floor_run_skips_the_baselines(tmp_path):
    """`baselines=False` (the :gpu-floor variant, Pallas kernels) times the stateful paths and
    the floor only, and the report, targets and plot cope with the missing columns."""
    config = stream_latency.get_config("tiny")
    config.baselines = False
    config.impl = "pallas"  # as :gpu-floor (interpret mode here)
    config.flash_max_new_tokens = 1  # as :gpu-floor: the flash refresh is a first-token step
    config.weights_layout = "packed"  # first-token queries on packed weights (model.layouts)
    config.context_sizes = (64, 128)
    partials = []  # what a run cut short after its first context would have written
    results = latency.run_stream_latency(
        config, on_progress=lambda p: partials.append((p, latency.write_results(p, tmp_path))))
    ((partial, partial_paths),) = partials
    assert not partial["complete"] and results["complete"]
    assert partial["rows"] == results["rows"][:1]
    assert partial["copy_bytes_per_s"] == results["copy_bytes_per_s"]
    assert "**partial**: 1 of 2 context sizes" in pathlib.Path(partial_paths["md"]).read_text()
    assert partial["targets"] == []  # no growth target from one context
    for row in results["rows"]:
        assert "stateless_query_ms" not in row and "prefix_cache_query_ms" not in row
        assert row["stateful_query_ms"] > 0 and row["flash_hit_ms"] > 0
        assert math.isclose(row["stateful_over_floor"],
                            row["stateful_query_ms"] / row["floor_ms"])
    assert [t["name"] for t in results["targets"]] == ["stateful largest / smallest"]
    paths = latency.write_results(results, str(tmp_path))
    md = pathlib.Path(paths["md"]).read_text()
    assert "| – | – |" in md and "stateless largest" not in md and "partial" not in md
    # Which tiles the kernels ran: none measured here (interpret mode reads no table).
    assert results["tuned_tiles"] == []
    assert ("attention impl `pallas` (kernel tiles: the shape rules); linear layers `xla`; "
            "weights packed;") in md
    floor = stream_latency.get_config("gpu-floor")
    assert (floor.impl, floor.baselines, floor.roofline.floor_bound,
            floor.flash_max_new_tokens, floor.weights_layout) == ("pallas", False, 1.3, 1,
                                                                "per_layer")
    # Packed weights run no generation loop: a generating flash query is refused up front.
    config.flash_max_new_tokens = 32
    with pytest.raises(ValueError, match="first-token queries only"):
        latency.run_stream_latency(config)
    assert floor.model == "llama-3.2-1b" and floor.context_sizes[-1] == 32768


def test_floor_and_peer_targets_are_opt_in():
    row = dict(stateful_query_ms=2.0, stateless_query_ms=40.0, stateful_over_floor=1.6,
               hf_over_stateful=9.0)
    names = lambda targets: [t["name"] for t in targets]
    assert len(latency.check_targets([row, row])) == 3
    targets = latency.check_targets([row, row], floor_bound=1.3, peer_bound=8.0)
    assert names(targets)[3:] == ["stateful / floor, worst context",
                                  "HF kept-cache / stateful, worst context"]
    assert [t["passed"] for t in targets[3:]] == [False, True]


def test_a_file_that_is_not_a_peer_json_is_refused(tmp_path):
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"rows": [{"N": 1024}]}))
    with pytest.raises(InputError, match="not an hf_peer.json"):
        latency.load_peer(str(path))


def test_committed_results_still_render():
    # Results written by earlier versions (no floor, no impl field) stay readable.
    for name in ("stream_latency_cpu", "stream_latency_h100"):
        results = latency.load_results(str(ROOT / "docs" / "results" / name))
        md = latency.results_markdown(results)
        first = results["rows"][0]
        assert f"| {first['context_tokens']} | " in md
        header = next(line for line in md.splitlines() if line.startswith("| context tokens"))
        assert "|  |" not in header  # no empty column where there is no floor or peer
        assert ("stateful / floor" in md) == ("copy_bytes_per_s" in results)
