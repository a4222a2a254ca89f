"""Device peaks measured in the same run, and the memory floor of a query step.

A query of a few dozen tokens at batch 1 is bound by memory traffic: it must read every weight
once and the session's K/V cells once. Its floor is those bytes over the device's copy
bandwidth, measured here the same way the anchors do (a device-to-device copy; bytes read +
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


def query_floor_ms(cfg: ModelConfig, context_tokens: int, new_tokens: int,
                   copy_bytes_per_s: float) -> float:
    """Memory floor of one step of `new_tokens` over `context_tokens` cached tokens, in ms.

    Bytes that must move: every weight once, plus the K/V cells of the context and of the new
    tokens once (`cfg.kv_bytes_per_token` each), at the measured copy bandwidth.
    """
    nbytes = cfg.weight_bytes + (context_tokens + new_tokens) * cfg.kv_bytes_per_token
    return 1e3 * nbytes / copy_bytes_per_s
