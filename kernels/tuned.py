"""Measured tiles: the fastest block sizes the kernel benchmark found, per GPU model.

A kernel's default tiles follow a rule of its shape (`decode_attention.default_block_sizes`,
`cascade_attention.BlockSizes.for_shape`). A tuning grid run on the device can beat the rule
for one shape; `experiments/kernel_bench.py` (`tuned_dir`) then records the winner in
`kernels/tuned/<device kind>.json`, and the defaults look there first whenever kernels compile
for that GPU model (`gpu_target.device_kind()`; in interpret mode nothing is looked up). So
tiles measured in one device call are what the model runs in the next part of the same call,
and what gets committed: data with its provenance, not an edited rule.

An entry is {kernel, shape, window, block_sizes, provenance...}:
- "decode" (the split-sequence paged flash kernel): shape (batch, rows = T x G, k_heads,
  head_dim, itemsize); block_sizes the five `BlockSizes` fields;
- "cascade" (shared part + private part with the merge): shape (branches, tokens, group,
  k_heads, head_dim, itemsize); block_sizes {"shared": five fields, "private": five fields}.

A call finds the entries of its kernel and shape whose tiles suit it (page sizes), and takes
the one whose window is nearest in log2; its split count stands within a factor sqrt(2) of
the measured window, further away the caller's split rule is applied to the measured tiles.
"""

import functools
import json
import math
import pathlib
import re

from statejax.errors import InputError

TUNED_DIR = pathlib.Path(__file__).parent / "tuned"
SHAPES = {
    "decode": ("batch", "rows", "k_heads", "head_dim", "itemsize"),
    "cascade": ("branches", "tokens", "group", "k_heads", "head_dim", "itemsize"),
}
TILES = ("block_q", "block_k", "num_splits", "num_warps", "num_stages")


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
    bs = entry["block_sizes"]
    parts = [bs] if kernel == "decode" else [bs.get("shared", {}), bs.get("private", {})]
    if (kernel == "cascade" and sorted(bs) != ["private", "shared"]) or any(
            sorted(p) != sorted(TILES) for p in parts):
        layout = TILES if kernel == "decode" else f"{{shared: {TILES}, private: {TILES}}}"
        raise InputError(f"{where}: {kernel} block_sizes must be {layout}, got {bs}")
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


def fits_pages(tiles: dict, page_size: int) -> bool:
    """A KV block of `tiles` is a power-of-two number of pages."""
    pages, rest = divmod(tiles["block_k"], page_size)
    return rest == 0 and pages >= 1 and pages & (pages - 1) == 0


def lookup(kernel: str, shape: dict, window: int, *, device_kind: str | None,
           usable=lambda block_sizes: True,
           directory: str | pathlib.Path | None = None) -> tuple[dict, bool] | None:
    """Measured tiles of `kernel` for a call, if any.

    Args:
      kernel, shape: as in the module docstring (shape: exactly `SHAPES[kernel]`).
      window: the call's window S (the shared window for "cascade").
      device_kind: the GPU model compiled for; None (interpret mode) finds nothing.
      usable: predicate on an entry's block_sizes (e.g. its KV blocks suit the pages).

    Returns:
      None, or (block_sizes as recorded, keep_splits): keep_splits False means the caller
      applies its split rule to these tiles.
    """
    if device_kind is None:
        return None
    if sorted(shape) != sorted(SHAPES[kernel]):
        raise InputError(f"a {kernel} shape has exactly {SHAPES[kernel]}, got {shape}")
    matches = [e for e in entries(device_kind, directory)
               if e["kernel"] == kernel and e["shape"] == shape and usable(e["block_sizes"])]
    if not matches:
        return None
    best = min(matches, key=lambda e: abs(math.log2(e["window"] / window)))
    return best["block_sizes"], abs(math.log2(best["window"] / window)) <= 0.5


def record(entry: dict, *, device_kind: str,
           directory: str | pathlib.Path | None = None) -> pathlib.Path:
    """Adds `entry` to `device_kind`'s table, replacing one of the same kernel, shape and
    window; returns the table's path."""
    _check_entry(entry, "record")
    path = table_path(device_kind, directory)
    key = lambda e: (e["kernel"], sorted(e["shape"].items()), e["window"])  # noqa: E731
    kept = [e for e in entries(device_kind, directory) if key(e) != key(entry)]
    table = {"device_kind": device_kind, "entries": sorted(kept + [entry], key=key)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path
