"""The flash-query study: its scores match what the data and an independent session say."""

import itertools

import ml_collections
import numpy as np
import pytest

from statejax import pretrained
from statejax.data.market import format_bar, iter_synthetic_bars
from statejax.errors import ItemsRefusedError
from statejax.model.config import preset
from statejax.model.llama import init_params
from statejax.studies import flash_study
from statejax.train import tasks

CONFIG = dict(seed=5, warmup_bars=12, updates=3, bars_per_update=2, k=4, cells=2048)


@pytest.fixture(scope="module")
def embedded():
    """The study on the embedded model, which answers the last close (held-out 0.99)."""
    config = ml_collections.ConfigDict(dict(model="default", **CONFIG))
    return config, flash_study.run_flash_study(config)


def test_accuracy_is_the_ground_truth_recomputed_from_the_bars(embedded):
    config, result = embedded
    bars = list(itertools.islice(iter_synthetic_bars(seed=config.seed),
                                 config.warmup_bars + config.updates * config.bars_per_update))
    assert set(result["questions"]) == set(tasks.QUESTION_TYPES)
    records = result["records"]
    assert len(records) == config.updates * len(tasks.QUESTION_TYPES)
    for q in tasks.QUESTION_TYPES:
        mine = [r for r in records if r["question_type"] == q]
        # Scored after each update, on every bar pushed so far.
        assert [r["bars"] for r in mine] == [config.warmup_bars + (u + 1) * config.bars_per_update
                                             for u in range(config.updates)]
        k = 1 if q == "last_close" else config.k
        truth = [tasks.answer(q, bars[:r["bars"]], k) for r in mine]
        expected = np.mean([r["text"].strip() == t for r, t in zip(mine, truth, strict=True)])
        assert result["questions"][q]["accuracy"] == pytest.approx(expected), q
    # Scored against the right data, the embedded model reads the last close off the stream.
    assert result["questions"]["last_close"]["accuracy"] >= 2 / 3
    assert result["accuracy"] == pytest.approx(
        np.mean([v["accuracy"] for v in result["questions"].values()]))


def test_flash_answers_equal_an_independent_fresh_session(embedded):
    _, result = embedded
    for r in result["records"]:
        assert r["hit"], r
        assert r["text"] == r["fresh_text"], r
    assert result["agreement"] == 1.0
    assert "flash == fresh query 1.00" in flash_study.flash_markdown(result)


def test_staleness_is_the_count_of_pushes_since_the_refresh(embedded):
    config, result = embedded
    tokenizer = pretrained.load_default()[2]
    prefix = pretrained.load_default()[3]["prompt_prefix"]
    bars = itertools.islice(iter_synthetic_bars(seed=config.seed),
                            config.warmup_bars + config.updates * config.bars_per_update)
    # The session holds the prefix and every pushed bar (nothing refused, nothing slid).
    assert result["context_tokens"] == tokenizer.encode(prefix).size + sum(
        tokenizer.encode(format_bar(b)).size for b in bars)
    assert [s["pushed_since_refresh"] for s in result["staleness"]] == (
        [config.bars_per_update] * config.updates)
    for s in result["staleness"]:
        assert s["hit"] and s["items_behind"] == s["pushed_since_refresh"], s
    # Asked after the refresh, no answer is behind.
    assert {r["items_behind"] for r in result["records"]} == {0}
    assert result["items_behind_before_refresh"] == config.bars_per_update
    assert 0 < result["hit_ms"] < result["refresh_ms"]


def test_agreement_counts_misses_and_differing_answers():
    def record(text, fresh_text, hit=True):
        return dict(question_type="last_close", bars=1, text=text, fresh_text=fresh_text,
                    hit=hit, items_behind=0, confidence=0.9)

    bars = list(itertools.islice(iter_synthetic_bars(seed=0), 1))
    right = tasks.answer("last_close", bars, 1)
    summary = flash_study._summary("Q", [record(right, right), record(right, "x"),
                                         record(right, right, hit=False)], bars, 1, 0)
    assert summary["agreement"] == pytest.approx(1 / 3)
    assert summary["accuracy"] == 1.0


def test_a_saved_model_and_a_stream_that_outgrows_the_cells(tmp_path):
    cfg = preset("tiny", vocab_size=320)
    info = {"name": "tiny-random", "prompt_prefix": tasks.prompt_prefix(),
            "stop_token": tasks.STOP_TOKEN, "heldout_accuracy": {}}
    pretrained.save(tmp_path / "m", init_params(cfg, seed=3), cfg, info)
    config = ml_collections.ConfigDict(dict(CONFIG, model=str(tmp_path / "m"), updates=1))
    result = flash_study.run_flash_study(config)
    assert result["model"]["name"] == "tiny"
    assert result["agreement"] == 1.0
    assert markdown_rows(flash_study.flash_markdown(result)) == len(tasks.QUESTION_TYPES)
    # Refused bars are reported, never scored as if the model had seen them.
    config.cells = 256
    with pytest.raises(ItemsRefusedError, match="refused"):
        flash_study.run_flash_study(config)


def markdown_rows(markdown: str) -> int:
    return markdown.count("| `Q: ")
