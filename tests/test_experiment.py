"""The latency study end to end at test size: results, report files, and the notebook."""

import json
import math
import os
import pathlib

import nbclient
import nbformat

from configs import stream_latency
from statejax import latency

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMINGS = ("stateful_query_ms", "stateless_query_ms", "prefix_cache_query_ms", "flash_hit_ms",
           "append_ms", "ingest_ms_per_bar", "flash_refresh_ms")


def test_tiny_run_writes_results_and_notebook_plots_them(tmp_path):
    config = stream_latency.get_config("tiny")
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
    model = saved["model"]
    for key in ("layers", "width", "heads", "kv_heads", "head_dim", "params", "weight_bytes",
                "kv_bytes_per_token"):
        assert model[key] > 0, key
    assert saved["tokens_per_bar"] > 0 and saved["question_tokens"] == 32
    assert "| stateful ms |" in pathlib.Path(paths["md"]).read_text()
    assert pathlib.Path(paths["png"]).stat().st_size > 0

    nb = nbformat.read(ROOT / "notebooks" / "latency_vs_context.ipynb", as_version=4)
    env = {**os.environ, "STATEJAX_RESULTS": str(tmp_path)}
    env.pop("MPLBACKEND", None)  # the inline backend must emit the figure
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute(cwd=str(ROOT),
                                                                            env=env)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
