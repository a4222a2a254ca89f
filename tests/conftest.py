"""Strict numerics for every test: implicit rank promotion is an error."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def tiny():
    """(cfg, params) of the tiny preset in float32."""
    from statejax.model.config import preset
    from statejax.model.llama import init_params

    cfg = preset("tiny")
    return cfg, init_params(cfg, seed=0)
