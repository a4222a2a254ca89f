"""orbax checkpoints: bit-exact params round trip with model config and tokenizer identity."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from statejax.checkpoint import orbax_io
from statejax.errors import InputError
from statejax.model.config import preset
from statejax.model.llama import init_params
from tests import old_layouts


def _assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    cfg = preset("tiny", dtype=dtype)
    params = init_params(cfg, seed=3)
    where = orbax_io.save(tmp_path / "ckpt", params, cfg, "hf:0123456789ab")
    restored, restored_cfg, tokenizer_name = orbax_io.restore(where)
    _assert_bit_identical(params, restored)
    assert restored_cfg == cfg  # rope scaling included
    assert tokenizer_name == "hf:0123456789ab"
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))


def test_steps_restore_the_latest_or_a_chosen_one(tmp_path, tiny):
    cfg, params = tiny
    other = jax.tree.map(lambda x: x + 1, params)
    orbax_io.save(tmp_path, params, cfg, "bytes-v1", step=3)
    orbax_io.save(tmp_path, other, cfg, "bytes-v1", step=10)
    assert orbax_io.latest_step(tmp_path) == 10
    _assert_bit_identical(orbax_io.restore(tmp_path)[0], other)
    _assert_bit_identical(orbax_io.restore(tmp_path, step=3)[0], params)


def test_restore_into_a_different_config_is_refused(tmp_path, tiny):
    cfg, params = tiny
    orbax_io.save(tmp_path / "ckpt", params, cfg, "bytes-v1")
    # Only the name differs: fine.
    orbax_io.restore(tmp_path / "ckpt", cfg=cfg.replace(name="renamed"))
    with pytest.raises(InputError, match=r"different model config: num_layers: stored 2, "
                                         r"requested 3; dtype: stored 'float32'"):
        orbax_io.restore(tmp_path / "ckpt", cfg=cfg.replace(num_layers=3, dtype="bfloat16"))


def test_params_not_matching_the_config_are_refused(tmp_path, tiny):
    cfg, params = tiny
    with pytest.raises(InputError, match=r"\['final_norm'\]\['scale'\] is float32\[2, 64\]; "
                                         r"model config tiny requires float32\[64\]"):
        bad = {**params, "final_norm": {"scale": jnp.ones((2, 64), jnp.float32)}}
        orbax_io.save(tmp_path / "a", bad, cfg, "bytes-v1")
    with pytest.raises(InputError, match="leaves differ in name"):
        orbax_io.save(tmp_path / "b", {k: v for k, v in params.items() if k != "final_norm"},
                      cfg, "bytes-v1")


def test_bad_paths_and_names_are_refused(tmp_path, tiny):
    cfg, params = tiny
    orbax_io.save(tmp_path / "ckpt", params, cfg, "bytes-v1")
    with pytest.raises(InputError, match="already exists"):
        orbax_io.save(tmp_path / "ckpt", params, cfg, "bytes-v1")
    with pytest.raises(InputError, match="tokenizer_name"):
        orbax_io.save(tmp_path / "other", params, cfg, "")
    with pytest.raises(InputError, match="step=-1"):
        orbax_io.save(tmp_path / "run", params, cfg, "bytes-v1", step=-1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no statejax checkpoint"):
        orbax_io.restore(tmp_path / "empty")


def test_v1_checkpoints_restore_in_todays_layout(tmp_path, tiny):
    """A checkpoint written before weights were stored [out, in] (statejax-orbax-v1, flax
    kernels) restores bit-identically to today's params."""
    cfg, params = tiny
    target = tmp_path / "v1"
    meta = {"format": "statejax-orbax-v1", "model_config": orbax_io.config_to_json(cfg),
            "tokenizer_name": "bytes-v1", "step": None}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(target, args=ocp.args.Composite(
            params=ocp.args.StandardSave(old_layouts.flax_kernel_layout(params)),
            meta=ocp.args.JsonSave(meta)))
    restored, restored_cfg, tokenizer_name = orbax_io.restore(target, cfg=cfg)
    _assert_bit_identical(params, restored)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    assert restored_cfg == cfg and tokenizer_name == "bytes-v1"
