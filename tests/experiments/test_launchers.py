"""The launchers and the latency study end to end at test size: results, report files, the
notebook, default workdirs, `--help`."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from configs import kernel_bench, step_census, step_profile, stream_latency, train
from experiments import launch
from statejax.errors import InputError
from statejax.studies import latency
from tests import notebook_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHERS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                   if p.stem not in ("__init__", "launch"))
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
    assert latency.floor_note() is not None, "these tests run on a CPU"
    results = latency.run_stream_latency(config)
    paths = latency.write_results(results, str(tmp_path))

    saved = json.loads(pathlib.Path(paths["json"]).read_text())
    for key in ("rows", "device", "jax_version", "model", "date", "tokens_per_bar", "config",
                "targets"):
        assert key in saved, key
    # On a CPU no floor is reported (a query beats any copy-measured one), and the file says why.
    assert saved["copy_bytes_per_s"] is None and "no floor" in saved["floor_note"]
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
        assert "floor_ms" not in row and "stateful_over_floor" not in row
    hf = {r["target_tokens"]: r.get("hf_kept_cache_ms") for r in saved["rows"]}
    assert hf == {64: 7.5, 128: None, 256: 30.0}
    # The peer's own context (the target N) is recorded beside the session's, and shown.
    assert [r.get("hf_context_tokens") for r in saved["rows"]] == [64, None, 256]
    targets = {t["name"]: t for t in saved["targets"]}
    assert "stateful / floor, worst context" not in targets  # no floor, no floor target
    # The tiny shape is not what the targets were set for: ratios, no verdicts.
    assert not saved["targets_checked"] and {t["passed"] for t in saved["targets"]} == {None}
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
    assert "stateful / floor" not in md and "- no floor on a CPU" in md
    assert "not checked at the tiny shape" in md and "FAIL" not in md and "PASS" not in md
    assert "30.0 @256 |" in md
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| context tokens"))
    header, rule = lines[at:at + 2]
    assert header.count("|") == rule.count("|") and "|  |" not in header
    assert pathlib.Path(paths["png"]).stat().st_size > 0

    outputs = notebook_run.execute("latency_vs_context.ipynb", tmp_path)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_floor_run_skips_the_baselines(tmp_path, monkeypatch):
    """`baselines=False` (the :gpu-floor variant, Pallas kernels) times the stateful paths and
    the floor only, and the report, targets and plot cope with the missing columns. The floor
    is computed as on a GPU (here, where it is no lower bound, only to check its sums)."""
    monkeypatch.setattr(latency, "floor_note", lambda: None)
    config = stream_latency.get_config("tiny")
    config.targets_set_for = ("tiny",)
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
        # The floor: weights + K/V of context and question, read once at the copy bandwidth.
        nbytes = (results["model"]["weight_bytes"] + (row["context_tokens"] + 32)
                  * results["model"]["kv_bytes_per_token"])
        assert math.isclose(row["floor_ms"], 1e3 * nbytes / results["copy_bytes_per_s"])
        assert math.isclose(row["stateful_over_floor"],
                            row["stateful_query_ms"] / row["floor_ms"])
    assert [t["name"] for t in results["targets"]] == ["stateful largest / smallest"]
    assert results["targets_checked"] and results["targets"][0]["passed"] is not None
    paths = latency.write_results(results, str(tmp_path))
    md = pathlib.Path(paths["md"]).read_text()
    assert "| – | – |" in md and "stateless largest" not in md and "partial" not in md
    assert "| stateful / floor |" in md and "not checked" not in md
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
    # Rows without a floor (a CPU run) get no floor target, whatever the bound.
    no_floor = {k: v for k, v in row.items() if k != "stateful_over_floor"}
    assert "stateful / floor, worst context" not in names(
        latency.check_targets([no_floor, no_floor], floor_bound=1.3))
    unchecked = latency.check_targets([row, row], floor_bound=1.3, checked=False)
    assert [t["passed"] for t in unchecked] == [None] * 4


def test_targets_are_checked_only_at_the_shapes_they_were_set_for():
    assert latency.targets_note(stream_latency.get_config()) is None
    assert latency.targets_note(stream_latency.get_config("gpu")) is None
    note = latency.targets_note(stream_latency.get_config("tiny"))
    assert note == ("targets set for the cpu, gpu and gpu-floor shapes; not checked at the "
                    "tiny shape: ratios only")


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
        assert ("stateful / floor" in md) == (results.get("copy_bytes_per_s") is not None)


def test_each_variant_has_its_own_default_workdir():
    for experiment, module, variants in (
            ("stream_latency", stream_latency, (None, "gpu", "gpu-floor", "tiny")),
            ("kernel_bench", kernel_bench, (None, "gpu-tune", "gpu-query", "cpu")),
            ("step_profile", step_profile, (None, "gpu", "gpu-linear", "tiny", "tiny-linear")),
            ("step_census", step_census, (None, "tiny"))):
        dirs = [launch.default_workdir(experiment, module.get_config(v).variant)
                for v in variants]
        assert len(set(dirs)) == len(dirs), dirs
        assert all(d.startswith(f"runs/{experiment}/") for d in dirs), dirs
    assert launch.default_workdir("stream_latency", "cpu") == "runs/stream_latency/cpu"
    # The ladder's rungs keep their run names: a continued rung starts from its base's folder.
    quick = launch.rung_workdir(train.get_config("ladder-l,quick").variant)
    assert launch.rung_workdir(train.get_config("ladder-l").variant) == (
        "runs/ladder-l") != quick == "runs/ladder-l-quick"
    assert train.get_config("ladder-l-long").train.init_from == "runs/ladder-l/params"
    assert launch.beside_log("w/step_profile.log") == "w/step_profile"


def _launch(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})


def test_a_tiny_run_writes_beside_the_main_run_and_says_its_targets_are_unchecked(tmp_path):
    """Run as the README writes it (no --workdir), the tiny variant writes its own folder."""
    proc = _launch("experiments.stream_latency",
                   f"--config={ROOT / 'configs' / 'stream_latency.py'}:tiny",
                   "--config.flash.enabled=False", "--config.context_sizes=(64, 128)",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "stream_latency").iterdir()) == ["tiny"]
    md = (tmp_path / "runs" / "stream_latency" / "tiny" / "results.md").read_text()
    assert "not checked at the tiny shape" in md and "FAIL" not in md
    assert "not checked at the tiny shape" in proc.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_help_exits_zero_and_lists_the_flags(launcher):
    assert launch.asked_for_help(["--help"]) and not launch.asked_for_help(["--help=false"])
    proc = _launch(f"experiments.{launcher}", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--workdir" in proc.stdout, proc.stdout
    assert launcher == "command_buffer_log" or "--config" in proc.stdout
