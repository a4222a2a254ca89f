"""The flash-query study: cached answers equal fresh queries, staleness is reported."""

import ml_collections

from statejax import pretrained
from statejax.model.config import preset
from statejax.model.llama import init_params
from statejax.studies import flash_study
from statejax.train import tasks


def test_flash_study_on_a_saved_model(tmp_path):
    cfg = preset("tiny", vocab_size=320)
    info = {"name": "tiny-random", "prompt_prefix": tasks.prompt_prefix(),
            "stop_token": tasks.STOP_TOKEN, "heldout_accuracy": {}}
    pretrained.save(tmp_path / "m", init_params(cfg, seed=3), cfg, info)
    config = ml_collections.ConfigDict(dict(model=str(tmp_path / "m"), seed=1, warmup_bars=8,
                                            updates=3, bars_per_update=2, k=3, cells=1024))
    result = flash_study.run_flash_study(config)

    assert set(result["questions"]) == set(tasks.QUESTION_TYPES)
    assert result["agreement"] == 1.0  # every cached answer equals a fresh query
    assert result["items_behind_before_refresh"] == 2  # one update of two bars
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0 < result["hit_ms"] < result["refresh_ms"]
    assert result["context_tokens"] > 14 * 30
    markdown = flash_study.flash_markdown(result)
    assert "flash == fresh query 1.00" in markdown
    assert markdown.count("| `Q: ") == len(tasks.QUESTION_TYPES)
