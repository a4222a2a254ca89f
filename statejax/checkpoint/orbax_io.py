"""statejax's own checkpoints: params plus model config and tokenizer identity, via orbax.

A checkpoint is one orbax composite directory with two items: `params` (the pytree, stored
bit-exactly in its dtype) and `meta` (JSON: format tag, `ModelConfig` fields, tokenizer name,
step). With `step` given, checkpoints live in `path/<step>` (the `ocp.CheckpointManager`
layout), so a training run can resume from the latest one.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from statejax.errors import InputError
from statejax.model.config import ModelConfig, RopeScaling
from statejax.model.llama import from_flax_kernel_layout, init_params

FORMAT = "statejax-orbax-v2"  # projection weights [out, in] (statejax.model.llama.Linear)
_FORMAT_V1 = "statejax-orbax-v1"  # flax [in, out] kernels: converted on restore


def config_to_json(cfg: ModelConfig) -> dict:
    """`ModelConfig` -> a JSON-able dict (rope scaling nested or None)."""
    return dataclasses.asdict(cfg)


def config_from_json(data: dict) -> ModelConfig:
    """Inverse of `config_to_json`; InputError on unknown or missing fields."""
    data = dict(data)
    scaling = data.pop("rope_scaling", None)
    try:
        return ModelConfig(**data, rope_scaling=None if scaling is None else RopeScaling(
            **scaling))
    except TypeError as e:
        raise InputError(f"stored model config {data} does not fit ModelConfig: {e}") from e


def _abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of `cfg`'s params on the default device (nothing is computed)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        jax.eval_shape(lambda: init_params(cfg)))


def check_params(params, cfg: ModelConfig):
    """InputError unless `params` has the leaf names, shapes and dtypes of `cfg`'s."""
    expected = jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]
    found = jax.tree_util.tree_flatten_with_path(params)[0]
    describe = lambda v: f"{jnp.dtype(v.dtype).name}{list(v.shape)}"
    exp = {jax.tree_util.keystr(k): describe(v) for k, v in expected}
    got = {jax.tree_util.keystr(k): describe(v) for k, v in found}
    if exp.keys() != got.keys():
        diff = sorted(exp.keys() ^ got.keys())
        raise InputError(f"params do not match model config {cfg.name}: {len(diff)} leaves "
                         f"differ in name, e.g. {diff[:5]}")
    for name, want in exp.items():
        if got[name] != want:
            raise InputError(f"params leaf {name} is {got[name]}; model config "
                             f"{cfg.name} requires {want}")


def _step_dir(path: Path, step: int | None) -> Path:
    if step is None:
        return path
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step={step!r}; allowed: None or an int >= 0")
    return path / str(step)


def save(path: str | os.PathLike, params, cfg: ModelConfig, tokenizer_name: str,
         step: int | None = None) -> Path:
    """Saves params with their config and tokenizer identity; returns the checkpoint directory.

    Args:
      path: checkpoint directory (step None) or the run directory holding `<step>/`.
      params: params pytree of `cfg` (shapes and dtypes are checked against it).
      cfg: the model config.
      tokenizer_name: the tokenizer's identity (`Tokenizer.name`, e.g. "bytes-v1").
      step: training step, or None.

    Raises InputError if params do not match `cfg`, or the directory already exists.
    """
    if not isinstance(tokenizer_name, str) or not tokenizer_name:
        raise InputError(f"tokenizer_name={tokenizer_name!r}; allowed: a non-empty str")
    check_params(params, cfg)
    target = _step_dir(Path(path).absolute(), step)
    if target.exists():
        raise InputError(f"checkpoint directory {target} already exists; allowed: a new path")
    meta = {"format": FORMAT, "model_config": config_to_json(cfg),
            "tokenizer_name": tokenizer_name, "step": step}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(target, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                   meta=ocp.args.JsonSave(meta)))
    return target


def latest_step(path: str | os.PathLike) -> int | None:
    """Largest `<step>` subdirectory of a run directory, or None (unfinished saves, which orbax
    writes under temporary names, do not count)."""
    p = Path(path)
    steps = [int(c.name) for c in p.iterdir() if c.is_dir() and c.name.isdigit()] if (
        p.is_dir()) else []
    return max(steps, default=None)


def _differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f.name}: stored {getattr(a, f.name)!r}, requested {getattr(b, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name != "name" and getattr(a, f.name) != getattr(b, f.name)]


def restore(path: str | os.PathLike, *, cfg: ModelConfig | None = None,
            step: int | None = None) -> tuple[Any, ModelConfig, str]:
    """Restores `(params, cfg, tokenizer_name)` saved by `save`.

    Args:
      path: a checkpoint directory, or a run directory of `<step>/` checkpoints (then `step`,
        default the latest).
      cfg: if given, the stored config must equal it (names may differ); else InputError
        listing the differing fields.
      step: which step of a run directory.

    Returns:
      params (jax arrays on the default device, bit-identical to what was saved), the stored
      `ModelConfig`, and the tokenizer name.
    """
    p = Path(path).absolute()
    if step is None and not (p / "meta").exists():
        step = latest_step(p)
        if step is None:
            raise InputError(f"{p} holds no statejax checkpoint (no meta item and no <step> "
                             "subdirectories)")
    target = _step_dir(p, step)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            meta = ckptr.restore(target, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"]
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise InputError(f"{target} is not a readable statejax checkpoint: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, _FORMAT_V1):
            raise InputError(f"{target} has metadata format "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}; "
                             f"allowed: {FORMAT!r}, {_FORMAT_V1!r}")
        stored = config_from_json(meta["model_config"])
        if cfg is not None and (diff := _differences(stored, cfg)):
            raise InputError(f"checkpoint {target} was saved for a different model config: "
                             + "; ".join(diff))
        v1 = meta["format"] == _FORMAT_V1
        try:
            # v1 leaves have the old shapes: restored as stored, converted, then checked.
            params = ckptr.restore(target, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(None if v1 else _abstract_params(stored))))[
                    "params"]
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise InputError(f"{target}: params do not match the stored config {stored.name}: "
                             f"{e}") from e
    if v1:
        params = jax.tree.map(jnp.asarray, from_flax_kernel_layout(params))
        check_params(params, stored)
    return params, stored, meta["tokenizer_name"]
