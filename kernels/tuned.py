"""Measured tiles: the fastest block sizes the kernel benchmark found, per GPU model.

A kernel's default tiles follow a rule of its shape (`decode_attention.default_block_sizes`).
A tuning grid run on the device can beat the rule for one shape; `experiments/kernel_bench.py`
(`tuned_dir`) then records the winner in `kernels/tuned/<device kind>.json`, and the defaults
look there first whenever kernels compile for that GPU model (`gpu_target.device_kind()`; in
interpret mode nothing is looked up). So tiles measured in one device call are what the model
runs in the next part of the same call, and what gets committed: data, not an edited rule.

Served: the split-sequence paged flash kernel's tiles (`decode_attention`'s defaults and the
shared part of `cascade_attention`, which is that kernel with all branches' rows folded).
An entry matches a call on (batch, rows = T x G, kv-heads, head dim, itemsize), if its KV
block is a power-of-two multiple of the pool's page size; among matches the one whose window is
nearest in log2 wins. Its split count is kept within a factor sqrt(2) of the measured window;
further away the default split rule is applied to the measured tiles.
"""

import functools
import json
import math
import pathlib
import re

from statejax.errors import InputError

TUNED_DIR = pathlib.Path(__file__).parent / "tuned"
KERNELS = ("decode",)
_KEY = ("kernel", "batch", "rows", "k_heads", "head_dim", "itemsize")
_TILES = ("block_q", "block_k", "num_splits", "num_warps", "num_stages")


def table_path(device_kind: str, directory: str | pathlib.Path | None = None) -> pathlib.Path:
    """`directory/<device kind with non-alphanumerics as _>.json` (default: `TUNED_DIR`)."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_")
    return pathlib.Path(TUNED_DIR if directory is None else directory) / f"{name}.json"


def _check_entry(entry, where: str) -> dict:
    missing = [k for k in (*_KEY, "window", "block_sizes") if k not in entry]
    if missing:
        raise InputError(f"{where}: tuned entry {entry} lacks {missing}")
    if entry["kernel"] not in KERNELS:
        raise InputError(f"{where}: kernel {entry['kernel']!r}; allowed: {KERNELS}")
    if sorted(entry["block_sizes"]) != sorted(_TILES):
        raise InputError(f"{where}: block_sizes must have exactly {_TILES}, got "
                         f"{entry['block_sizes']}")
    return entry


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


def decode_tiles(*, device_kind: str | None, batch: int, rows: int, k_heads: int,
                 head_dim: int, itemsize: int, page_size: int, window: int,
                 directory: str | pathlib.Path | None = None) -> tuple[dict, bool] | None:
    """Measured tiles of the split-sequence paged flash kernel for this call, if any.

    Args:
      device_kind: the GPU model compiled for; None (interpret mode) finds nothing.
      batch, rows, k_heads, head_dim, itemsize: the call (rows = T x G query rows per
        kv-head of one batch row).
      page_size: the pool's page size; the entry's block_k must be a power-of-two multiple.
      window: the call's window S.

    Returns:
      None, or ({block_q, block_k, num_splits, num_warps, num_stages}, keep_splits):
      keep_splits False means the caller applies its split rule to these tiles.
    """
    if device_kind is None:
        return None
    call = dict(kernel="decode", batch=batch, rows=rows, k_heads=k_heads, head_dim=head_dim,
                itemsize=itemsize)
    matches = []
    for e in entries(device_kind, directory):
        block_k = e["block_sizes"]["block_k"]
        ratio = block_k // page_size
        if all(e[k] == call[k] for k in _KEY) and block_k % page_size == 0 and (
                ratio & (ratio - 1)) == 0:
            matches.append(e)
    if not matches:
        return None
    best = min(matches, key=lambda e: abs(math.log2(e["window"] / window)))
    return dict(best["block_sizes"]), abs(math.log2(best["window"] / window)) <= 0.5


def record(entry: dict, *, device_kind: str,
           directory: str | pathlib.Path | None = None) -> pathlib.Path:
    """Adds `entry` to `device_kind`'s table, replacing one with the same key and window.

    Args:
      entry: {kernel, batch, rows, k_heads, head_dim, itemsize, window, block_sizes: {...},
        and free-form provenance (ms, default_ms, dtype, source)}.

    Returns:
      The table's path.
    """
    _check_entry(entry, "record")
    path = table_path(device_kind, directory)
    old = list(entries(device_kind, directory))
    same = lambda e: all(e[k] == entry[k] for k in (*_KEY, "window"))  # noqa: E731
    table = {"device_kind": device_kind,
             "entries": sorted([e for e in old if not same(e)] + [entry],
                               key=lambda e: tuple(e[k] for k in (*_KEY, "window")))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path
