"""The embedded default model loads and still reaches its recorded held-out accuracy."""

import json

import jax
import numpy as np
import pytest

from statejax import pretrained
from statejax.errors import InputError
from statejax.tokenizer import ByteTokenizer
from statejax.train import data, evaluate, tasks
from tests import old_layouts

TOLERANCE = 0.1  # per question type: two of 20 answers (float differences across CPUs)


@pytest.fixture(scope="module")
def default():
    return pretrained.load_default()


def test_default_model_loads(default):
    cfg, params, tok, info = default
    assert isinstance(tok, ByteTokenizer) and cfg.vocab_size >= tok.vocab_size
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
    assert info["prompt_prefix"] == tasks.prompt_prefix()
    assert info["stop_token"] == tasks.STOP_TOKEN
    assert set(info["heldout_accuracy"]) == set(tasks.QUESTION_TYPES)


def test_default_model_reaches_recorded_accuracy(default):
    cfg, params, _, info = default
    ev = info["check_eval"]  # a fixed held-out stream of 100 questions, 20 per type
    result = evaluate.serving_eval(
        params, cfg, data.PackSpec(**ev["pack_spec"]), seed=ev["seed"],
        num_questions=ev["num_questions"], context_tokens=ev["context_tokens"],
        max_new_tokens=ev["max_new_tokens"])
    for qtype, recorded in ev["accuracy"].items():
        assert result["accuracy"][qtype] >= recorded - TOLERANCE, (qtype, result["accuracy"])
    # Useful where docs/ladder.md says it is: the last close, copied from a stream (chance
    # ~1%). The comparison and arithmetic types are at chance for every CPU-trained rung.
    assert result["accuracy"]["last_close"] >= 0.8


def test_load_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(InputError, match="params.msgpack is missing"):
        pretrained.load(tmp_path)


def test_format_1_folders_load_as_the_same_model(default, tmp_path):
    """A folder written before weights were stored [out, in] (format 1: flax `kernel`
    [*in, *out]) loads to exactly the params of today's format."""
    cfg, params, _, info = default
    kernels = old_layouts.flax_kernel_layout(params)
    old = pretrained.save(tmp_path / "old", kernels, cfg, info)
    meta = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**meta, "format": 1}))
    _, loaded, _, loaded_info = pretrained.load(old)
    assert loaded_info == info
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_refuses_an_unknown_format(default, tmp_path):
    cfg, params, _, info = default
    folder = pretrained.save(tmp_path / "m", params, cfg, info)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(InputError, match="format 3; allowed: 1, 2"):
        pretrained.load(folder)


def test_a_broken_folder_is_refused_clearly_and_info_round_trips(default, tmp_path):
    cfg, params, _, info = default
    folder = pretrained.save(tmp_path / "m", params, cfg, info)
    assert pretrained.load(folder)[3] == info  # load -> save -> load keeps info
    with pytest.raises(InputError, match=r"info may not set \['model'\]"):
        pretrained.save(tmp_path / "x", params, cfg, {**info, "model": {}})
    meta = json.loads((folder / "model.json").read_text())
    for broken, match in (("{not json", "is not JSON"),
                          (json.dumps({k: v for k, v in meta.items() if k != "model"}),
                           'lacks a "model" object'),
                          (json.dumps({**meta, "model": {**meta["model"], "mlp_dim": 96}}),
                           "does not hold the parameters of the config")):
        (folder / "model.json").write_text(broken)
        with pytest.raises(InputError, match=match):
            pretrained.load(folder)
