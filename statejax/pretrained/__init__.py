"""Small models trained in-framework and shipped inside the package (no downloads).

A shipped model is a folder with two files:

- `params.msgpack`: the float32 params pytree, written by `flax.serialization` (msgpack is
  already a flax dependency, so loading needs nothing extra); format 2 stores projection
  weights [out, in] (`statejax.model.llama.Linear`); format 1 (flax's [in, out] `kernel`)
  is converted on load;
- `model.json`: the `ModelConfig` fields, the tokenizer identity, the serving format (prompt
  prefix, question template, stop token) and the held-out accuracies recorded at export.

`load_default()` returns the embedded default: the smallest model of the capability ladder
(docs/ladder.md) whose held-out answers are clearly useful.
"""

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from statejax.checkpoint.orbax_io import check_params, config_from_json, config_to_json
from statejax.errors import InputError
from statejax.model.config import ModelConfig
from statejax.model.llama import from_flax_kernel_layout
from statejax.tokenizer import ByteTokenizer

DEFAULT = "ladder-l-long"  # folder of the embedded default, beside this file
FORMAT = 2
_FORMATS = (1, 2)
_PARAMS, _META = "params.msgpack", "model.json"


def save(path, params, cfg: ModelConfig, info: dict[str, Any]) -> Path:
    """Writes `params` (as float32) and `cfg` + `info` to folder `path`; returns it.

    `info` must be JSON-serialisable; it should hold "prompt_prefix", "stop_token" and
    "heldout_accuracy" (per question type), as the trainer's export does.
    """
    reserved = sorted({"format", "model", "tokenizer"} & set(info))
    if reserved:
        raise InputError(f"info may not set {reserved}: save writes those itself")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    (path / _PARAMS).write_bytes(serialization.msgpack_serialize(_plain(host)))
    meta = {"format": FORMAT, "model": config_to_json(cfg),
            "tokenizer": ByteTokenizer.name, **info}
    (path / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load(path) -> tuple[ModelConfig, Any, ByteTokenizer, dict[str, Any]]:
    """Loads a folder written by `save`.

    Returns:
      (cfg, params as a nested dict of jax arrays, tokenizer, info): info is `model.json`
      without what `save` writes itself (format, model, tokenizer): the prompt prefix, stop
      token, recorded accuracies, ... (`save(path, params, cfg, info)` writes it back).
    """
    path = Path(path)
    for name in (_PARAMS, _META):
        if not (path / name).is_file():
            raise InputError(f"{path} is not a shipped model: {name} is missing")
    try:
        info = json.loads((path / _META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path / _META} is not JSON: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise InputError(f"{path / _META} lacks a \"model\" object (the model config)")
    if info.get("format") not in _FORMATS:
        raise InputError(f"{path / _META} has format {info.get('format')!r}; allowed: "
                         f"{', '.join(map(str, _FORMATS))}")
    tokenizer = info.pop("tokenizer", None)
    if tokenizer != ByteTokenizer.name:
        raise InputError(f"{path} needs tokenizer {tokenizer!r}; this loader "
                         f"knows {ByteTokenizer.name!r}")
    cfg = config_from_json(info.pop("model"))
    params = serialization.msgpack_restore((path / _PARAMS).read_bytes())
    if info.pop("format") == 1:
        params = from_flax_kernel_layout(params)
    params = jax.tree.map(lambda x: jnp.asarray(x, cfg.jnp_dtype), params)
    try:
        check_params(params, cfg)
    except InputError as e:
        raise InputError(f"{path / _PARAMS} does not hold the parameters of the config in "
                         f"{_META}: {e}") from e
    return cfg, params, ByteTokenizer(), info


def load_default() -> tuple[ModelConfig, Any, ByteTokenizer, dict[str, Any]]:
    """The embedded default model: (cfg, params, tokenizer, info); see `load`.

    info["prompt_prefix"] is the session prefix it was trained with, info["stop_token"] the
    id that ends an answer, info["heldout_accuracy"] the per-question-type accuracy recorded
    through the serving path (docs/ladder.md).
    """
    return load(Path(__file__).parent / DEFAULT)


def _plain(tree):
    """Nested dicts of numpy arrays (msgpack_restore gives them back as such)."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
