"""Measured tiles: the fastest block sizes the kernel benchmark found, per GPU model.

A kernel's default tiles follow a rule of its shape (`decode_attention.default_block_sizes`,
`cascade_attention.BlockSizes.for_shape`). A tuning grid run on the device can beat the rule
for one shape; `experiments/kernel_bench.py` (`tuned_dir`) then records the winner in
`kernels/tuned/<device kind>.json`, and the defaults look there first whenever kernels compile
for that GPU model (`platform.device_kind()`; in interpret mode nothing is looked up). So
tiles measured in one device call are what the model runs in the next part of the same call,
and what gets committed: data with its provenance, not an edited rule.

An entry is {kernel, shape, window, block_sizes, backend, ms, provenance...}:
- "decode" (the split-sequence paged flash kernel): shape (batch, rows = T x G, k_heads,
  head_dim, itemsize); block_sizes the five `BlockSizes` fields; backend "triton";
- "linear" (`fused_linear`, recorded by the step profile's tiles grid,
  `configs/step_profile.py:gpu-linear`): shape (rows = M, k = K, n = output columns,
  weights, strips = weight strips a program reads: 2 for "silu_mul", itemsize); window = M
  (the shape holds M, so only that M matches); block_sizes the five `LinearBlocks` fields;
  backend "triton";
- "cascade" (shared part + private part with the merge): shape (branches, tokens, group,
  k_heads, head_dim, itemsize); block_sizes {"shared": ..., "private": five fields}, the
  shared part's fields those of its backend: "triton" (five `BlockSizes` fields) or
  "mosaic_gpu" (the Mosaic GPU decode kernel's `MosaicDecodeBlockSizes`).
A missing backend is "triton" (tables written before there was a choice). The benchmark
records the fastest tiles of each backend it timed, and only tiles whose output matched the
reference in that run.

A call finds the entries of its kernel and shape whose backend it may run and whose tiles
suit it (page sizes); it takes those whose window is nearest in log2, and of them the fastest
(`ms`; Triton on a tie): so where a GPU model's table says the Mosaic shared part beat the
Triton one, a caller that leaves the backend to the table runs it. An entry also records the
time of the shape rule's Triton tiles in the same run (`default_ms`); where the rule was the
faster, a caller that may run Triton keeps the rule (a Mosaic grid's best can lose to it).
The split count stands within a factor sqrt(2) of the measured window; further away the
caller's split rule is applied to the measured tiles.

The table is read when a kernel call is traced; jax caches traced calls, so a process that
rewrites the table (the benchmark, then a study, run as separate processes by
`experiments/gpu_session.sh`) must call `jax.clear_caches()` before its new entries apply.
"""

import functools
import json
import math
import pathlib
import re
from typing import NamedTuple

from statejax.errors import InputError

TUNED_DIR = pathlib.Path(__file__).parent / "tuned"
SHAPES = {
    "decode": ("batch", "rows", "k_heads", "head_dim", "itemsize"),
    "cascade": ("branches", "tokens", "group", "k_heads", "head_dim", "itemsize"),
    "linear": ("rows", "k", "n", "weights", "strips", "itemsize"),
}
TILES = ("block_q", "block_k", "num_splits", "num_warps", "num_stages")
# Flags a Triton tile may carry besides `TILES` (absent: False): entries recorded before them
# stay valid.
TILE_FLAGS = ("preload_pages",)
LINEAR_TILES = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
# Shared-part tiles per cascade backend (`BlockSizes`, `MosaicDecodeBlockSizes` fields).
SHARED_TILES = {"triton": TILES, "mosaic_gpu": ("block_k", "max_concurrent_steps", "num_splits")}
BACKENDS = {"decode": ("triton",), "cascade": tuple(SHARED_TILES), "linear": ("triton",)}


class Found(NamedTuple):
    """A lookup's answer: the tiles as recorded, whether their splits stand (False: apply
    the caller's split rule to them), and the backend they were measured on."""

    block_sizes: dict
    keep_splits: bool
    backend: str


def backend_of(entry: dict) -> str:
    """The backend an entry was measured on ("triton" where the entry predates the field)."""
    return entry.get("backend", "triton")


def table_path(device_kind: str, directory: str | pathlib.Path | None = None) -> pathlib.Path:
    """`directory/<device kind with non-alphanumerics as _>.json` (default: `TUNED_DIR`)."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_")
    return pathlib.Path(TUNED_DIR if directory is None else directory) / f"{name}.json"


def _check_entry(entry, where: str) -> dict:
    missing = [k for k in ("kernel", "shape", "window", "block_sizes") if k not in entry]
    if missing:
        raise InputError(f"{where}: tuned entry {entry} lacks {missing}")
    kernel = entry["kernel"]
    if kernel not in SHAPES:
        raise InputError(f"{where}: kernel {kernel!r}; allowed: {tuple(SHAPES)}")
    if sorted(entry["shape"]) != sorted(SHAPES[kernel]):
        raise InputError(f"{where}: a {kernel} shape has exactly {SHAPES[kernel]}, got "
                         f"{entry['shape']}")
    backend = backend_of(entry)
    if backend not in BACKENDS[kernel]:
        raise InputError(f"{where}: a {kernel} entry's backend is one of {BACKENDS[kernel]}, "
                         f"got {backend!r}")
    bs = entry["block_sizes"]
    if kernel in ("decode", "linear"):
        fields = TILES if kernel == "decode" else LINEAR_TILES
        layout, parts = fields, [(bs, fields)]
    else:
        shared = SHARED_TILES[backend]
        layout = f"{{shared: {shared}, private: {TILES}}}"
        parts = [(bs.get("shared", {}), shared), (bs.get("private", {}), TILES)]
    flags = lambda fields: TILE_FLAGS if fields == TILES else ()  # noqa: E731
    if (kernel == "cascade" and sorted(bs) != ["private", "shared"]) or any(
            sorted(k for k in p if k not in flags(fields)) != sorted(fields)
            for p, fields in parts):
        raise InputError(f"{where}: {kernel} block_sizes ({backend}) must be {layout} "
                         f"(Triton tiles may add {TILE_FLAGS}), got {bs}")
    # Values too: a lookup takes log2 of the window and compares times and shapes.
    ints = {"window": entry["window"], **{f"shape.{k}": v for k, v in entry["shape"].items()},
            **{f"block_sizes.{k}": v for p, fields in parts for k, v in p.items()
               if k not in flags(fields)}}
    bad = {k: v for k, v in ints.items() if not _is_positive_int(v)}
    bad |= {f"block_sizes.{k}": v for p, fields in parts for k, v in p.items()
            if k in flags(fields) and not isinstance(v, bool)}
    if bad:
        raise InputError(f"{where}: tuned entry values must be positive ints (flags: bools),"
                         f" got {bad}")
    for field in ("ms", "default_ms"):
        ms = entry.get(field)
        if ms is not None and (not isinstance(ms, int | float) or isinstance(ms, bool)
                               or not ms > 0):
            raise InputError(f"{where}: tuned entry {field}={ms!r}; allowed: a positive "
                             "number or null")
    return entry


def _is_positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@functools.cache
def _read(path: str, stamp: tuple[int, int]) -> tuple[dict, ...]:
    del stamp  # (mtime, size) in the cache key: a rewritten table is read again
    try:
        table = json.loads(pathlib.Path(path).read_text())
        entries = table["entries"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a tuned-tiles table ({{'device_kind', 'entries'}}): "
                         f"{e}") from e
    return tuple(_check_entry(e, path) for e in entries)


def entries(device_kind: str, directory: str | pathlib.Path | None = None) -> tuple[dict, ...]:
    """The recorded entries for `device_kind` (empty when it has no table)."""
    path = table_path(device_kind, directory)
    if not path.exists():
        return ()
    stat = path.stat()
    return _read(str(path), (stat.st_mtime_ns, stat.st_size))


def fits_pages(tiles: dict, page_size: int) -> bool:
    """A KV block of `tiles` is a power-of-two number of pages."""
    pages, rest = divmod(tiles["block_k"], page_size)
    return rest == 0 and pages >= 1 and pages & (pages - 1) == 0


def lookup(kernel: str, shape: dict, window: int, *, device_kind: str | None,
           usable=lambda block_sizes: True, backends: tuple[str, ...] = ("triton",),
           directory: str | pathlib.Path | None = None) -> Found | None:
    """Measured tiles of `kernel` for a call, if any.

    Args:
      kernel, shape: as in the module docstring (shape: exactly `SHAPES[kernel]`).
      window: the call's window S (the shared window for "cascade").
      device_kind: the GPU model compiled for; None (interpret mode) finds nothing.
      usable: predicate on an entry's block_sizes (e.g. its KV blocks suit the pages).
      backends: the backends the caller may run; of the entries at the nearest window, the
        fastest (`ms`) of these is taken.

    Returns:
      None (no entry, or the shape rule measured faster where "triton" is allowed), or a
      `Found`.
    """
    if device_kind is None:
        return None
    if sorted(shape) != sorted(SHAPES[kernel]):
        raise InputError(f"a {kernel} shape has exactly {SHAPES[kernel]}, got {shape}")
    matches = [e for e in entries(device_kind, directory)
               if e["kernel"] == kernel and e["shape"] == shape and backend_of(e) in backends
               and usable(e["block_sizes"])]
    if not matches:
        return None
    distance = lambda e: abs(math.log2(e["window"] / window))  # noqa: E731
    # One window first (the nearer, the smaller on a tie), then its fastest entry (Triton on
    # a tie, or where times are missing): times at different windows do not compare.
    nearest = min(matches, key=lambda e: (distance(e), e["window"]))["window"]
    best = min((e for e in matches if e["window"] == nearest),
               key=lambda e: (_ms(e), backend_of(e) != "triton"))
    # The shape rule (Triton tiles) was timed in the same run (`default_ms`): where it beat
    # every entry there, a caller that may run it keeps it.
    rule_ms = best.get("default_ms")
    if "triton" in backends and rule_ms is not None and rule_ms < _ms(best):
        return None
    return Found(best["block_sizes"], distance(best) <= 0.5, backend_of(best))


def _ms(entry: dict) -> float:
    ms = entry.get("ms")
    return math.inf if ms is None else ms


def record(entry: dict, *, device_kind: str,
           directory: str | pathlib.Path | None = None) -> pathlib.Path:
    """Adds `entry` to `device_kind`'s table, replacing one of the same kernel, shape, window
    and backend; returns the table's path."""
    _check_entry(entry, "record")
    path = table_path(device_kind, directory)
    key = lambda e: (e["kernel"], sorted(e["shape"].items()), e["window"],  # noqa: E731
                     backend_of(e))
    # Read past the cache: a rewrite within the file system's timestamp resolution that keeps
    # the size would look unchanged to it.
    old = _read.__wrapped__(str(path), (0, 0)) if path.exists() else ()
    kept = [e for e in old if key(e) != key(entry)]
    table = {"device_kind": device_kind, "entries": sorted(kept + [entry], key=key)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    _read.cache_clear()
    return path
