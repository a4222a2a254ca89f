"""Test-only: params as checkpoints stored them before `statejax.model.llama.Linear`
(flax `kernel` [*in, *out]), written independently of the library's own conversion."""

import jax
import numpy as np


def flax_kernel_layout(params) -> dict:
    """Today's params -> the old layout: every `weight` [*out, *in] becomes `kernel`
    [*in, *out]; o_proj has two input axes (heads, head_dim), the others one."""
    old = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [k.key for k in path]
        leaf = np.asarray(leaf)
        if keys[-1] == "weight":
            in_axes = 2 if keys[-2] == "o_proj" else 1
            leaf, keys[-1] = np.moveaxis(leaf, range(-in_axes, 0), range(in_axes)), "kernel"
        node = old
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return old
