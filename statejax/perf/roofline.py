"""Device peaks measured in the same run, and the memory floor of a query step.

A query of a few dozen tokens at batch 1 is bound by memory traffic: it must read every weight
once and the session's K/V cells once. Its floor is those bytes over the device's copy
bandwidth, measured here as the peer measurements do (a device-to-device copy; bytes read +
written per second), so ratios to the floor hold within one run on any card.
"""

import statistics
import time

import jax
import jax.numpy as jnp

from statejax.model.config import ModelConfig

_INNER = 5  # calls per timed sample: launches pipeline, so short calls are not launch-bound


def median_seconds(fn, *args, warmup: int, repeats: int, inner: int = _INNER) -> float:
    """Median seconds per call of fn(*args), after one compiling call and `warmup` calls.

    Each of the `repeats` samples times `inner` back-to-back calls and one sync.
    """
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


class BelowResolution(RuntimeError):
    """A timed difference that came out zero or negative."""


def chained(fn, calls: int):
    """jit of `calls` dependent calls of fn: x -> fn(x, *rest)[0] -> fn(that, *rest)[0] ...

    fn's first output (or its only one) must hold x's number of elements; it is reshaped and
    cast to x's shape and dtype (free for attention, whose output is shaped like q) and fed
    to the next call, so XLA can neither merge the calls nor hoist them. Returns the last x.
    """
    def run(x, *rest):
        for _ in range(calls):
            out = fn(x, *rest)
            out = out[0] if isinstance(out, (tuple, list)) else out
            x = out.reshape(x.shape).astype(x.dtype)
        return x

    return jax.jit(run)


def device_seconds_per_call(fn, x, *rest, calls: int, warmup: int, repeats: int) -> float:
    """Median seconds per call of fn(x, *rest) on the device, without dispatch or sync.

    Times one program of `calls` chained calls (`chained`) and one of a single call; their
    difference over calls - 1 cancels what both pay once (dispatch, argument handling, the
    sync), which for a kernel of a few microseconds is most of a timed Python call. Raises
    if the difference is not positive (below the timing's resolution).
    """
    if calls < 2:
        raise ValueError(f"calls={calls}; need >= 2 chained calls to take a difference")
    timed = dict(warmup=warmup, repeats=repeats)
    many = median_seconds(chained(fn, calls), x, *rest, **timed)
    one = median_seconds(chained(fn, 1), x, *rest, **timed)
    if many <= one:
        raise BelowResolution(f"{calls} chained calls took {many:.3g} s, one took {one:.3g} s: "
                           "below the timing's resolution")
    return (many - one) / (calls - 1)


def copy_bandwidth(mib: int, *, warmup: int = 2, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write) of a `mib` MiB bf16 array."""
    x = jnp.ones((mib << 19,), jnp.bfloat16)
    seconds = median_seconds(jax.jit(lambda x: x * 2), x, warmup=warmup, repeats=repeats)
    return 2 * x.nbytes / seconds


def matmul_rate(n: int, *, warmup: int = 2, repeats: int = 10) -> float:
    """bf16 matmul rate in FLOP/s of an n x n x n product."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    seconds = median_seconds(jax.jit(jnp.matmul), a, b, warmup=warmup, repeats=repeats)
    return 2 * n**3 / seconds


def tree_nbytes(tree) -> int:
    """Bytes of a pytree's arrays (e.g. the weights a call must read once)."""
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def query_floor_bytes(cfg: ModelConfig, context_tokens: int, new_tokens: int) -> int:
    """Bytes one step of `new_tokens` over `context_tokens` cached tokens must move: every
    weight once (`cfg.step_weight_bytes`: of an untied input embedding only the new tokens'
    rows), plus the K/V cells of the context and of the new tokens once
    (`cfg.kv_bytes_per_token` each)."""
    return (cfg.step_weight_bytes(new_tokens)
            + (context_tokens + new_tokens) * cfg.kv_bytes_per_token)


def query_floor_ms(cfg: ModelConfig, context_tokens: int, new_tokens: int,
                   copy_bytes_per_s: float) -> float:
    """Memory floor of one step of `new_tokens` over `context_tokens` cached tokens, in ms:
    `query_floor_bytes` at the measured copy bandwidth (bytes/s)."""
    return 1e3 * query_floor_bytes(cfg, context_tokens, new_tokens) / copy_bytes_per_s
