"""OHLCV market-data streams: validated bars, a seeded synthetic generator, CSV input, and a
compact one-line text form for feeding bars to a language model.

Prices are in the instrument's quote currency, volumes in its traded units; both are absolute
(no relative or normalised forms), so a serialised bar stays human-readable.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from statejax.errors import InputError

_PRICE_FIELDS = ("open", "high", "low", "close")
_OHLCV = (*_PRICE_FIELDS, "volume")


def _as_real(name: str, value: Any) -> float:
    # bool is an int subclass, but a True price is surely a bug.
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"Bar.{name} must be a real number; got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Bar:
    """One OHLCV bar, validated on construction.

    Fields:
      index: bar number in its stream, an int >= 0.
      open, high, low, close: prices, finite and > 0, with low <= open, close <= high.
      volume: traded volume, finite and >= 0.
    """

    index: int
    open: float
    high: float
    low: float
    close: float
    volume: float

    def __post_init__(self):
        if isinstance(self.index, bool) or not isinstance(self.index, int | np.integer):
            raise InputError(f"Bar.index must be an int >= 0; got {self.index!r}")
        object.__setattr__(self, "index", int(self.index))
        for name in _OHLCV:
            object.__setattr__(self, name, _as_real(name, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raises InputError naming the first field that breaks an OHLCV rule."""
        if self.index < 0:
            raise InputError(f"Bar.index={self.index} is negative; allowed: an int >= 0")
        for name in _PRICE_FIELDS:
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InputError(f"Bar.{name}={v} is not allowed; prices must be finite and > 0")
        if not (math.isfinite(self.volume) and self.volume >= 0):
            raise InputError(
                f"Bar.volume={self.volume} is not allowed; volume must be finite and >= 0"
            )
        if self.high < self.low:
            raise InputError(
                f"Bar.high={self.high} is below Bar.low={self.low}; allowed: low <= high"
            )
        for name in ("open", "close"):
            v = getattr(self, name)
            if not self.low <= v <= self.high:
                raise InputError(
                    f"Bar.{name}={v} is outside [low={self.low}, high={self.high}]; "
                    f"allowed: low <= {name} <= high"
                )


# --- synthetic bars -------------------------------------------------------------------------

# Regimes of the hidden Markov chain: (name, drift in log-price per bar, volatility multiplier).
# Down-trends are steeper and more volatile than up-trends, as in equity markets.
_REGIMES = (("up", 0.0015, 0.9), ("down", -0.0020, 1.35), ("range", 0.0, 0.65))
_STAY = 0.985  # per-bar probability of keeping the regime: mean regime length ~67 bars
# GARCH(1,1) on the unscaled shock, so regime multipliers cannot make it explode.
_GARCH_ALPHA, _GARCH_BETA = 0.08, 0.90
_LONG_RUN_VOL = 0.012  # per-bar std of log returns before the regime multiplier
_GARCH_OMEGA = _LONG_RUN_VOL**2 * (1.0 - _GARCH_ALPHA - _GARCH_BETA)
_REVERT = 0.002  # weak pull of log-price towards the start, so an infinite stream stays bounded
_T_DOF = 5.0  # Student-t shocks for fat tails, rescaled to unit variance
_SURPRISE_CAP = 6.0  # in long-run standard deviations; see the volume line below
_CHUNK = 256  # random draws are made per chunk; chunking does not change the stream


def iter_synthetic_bars(
    *, seed: int, start_price: float = 100.0, base_volume: float = 10_000.0
) -> Iterator[Bar]:
    """Infinite, seeded stream of valid synthetic bars, index 0, 1, 2, ...

    Model: a 3-regime Markov chain (up-trend, down-trend, range) sets the drift and scales a
    GARCH(1,1) volatility driven by Student-t shocks; each bar opens near the previous close,
    high/low extend past max/min(open, close), and volume is lognormal and grows with
    |return| / volatility. Prices are rounded to 2 decimals (cents) and volumes to integers.
    The same arguments always give the same stream.

    Args:
      seed: int >= 0 for `numpy.random.default_rng`.
      start_price: first open, finite and >= 1 (prices are in cents, so smaller would be coarse).
      base_volume: typical volume of a quiet bar, finite and >= 1.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be an int >= 0; got {seed!r}")
    for name, v in (("start_price", start_price), ("base_volume", base_volume)):
        real = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        if not (real and math.isfinite(v) and v >= 1):
            raise InputError(f"{name} must be a finite number >= 1; got {v!r}")
    return _synthetic(np.random.default_rng(seed), float(start_price), float(base_volume))


def _synthetic(rng: np.random.Generator, start_price: float, base_volume: float) -> Iterator[Bar]:
    log_p0 = math.log(start_price)
    prev_close = start_price
    regime = int(rng.integers(len(_REGIMES)))
    var = _LONG_RUN_VOL**2
    t_scale = math.sqrt((_T_DOF - 2.0) / _T_DOF)
    index = 0
    while True:
        switch_u = rng.random(_CHUNK)
        switch_to = rng.integers(1, len(_REGIMES), _CHUNK)  # offset to one of the other regimes
        shock = rng.standard_t(_T_DOF, _CHUNK) * t_scale
        gap = rng.standard_normal(_CHUNK)
        wick = np.abs(rng.standard_normal((_CHUNK, 2)))
        vol_noise = rng.standard_normal(_CHUNK)
        for j in range(_CHUNK):
            if switch_u[j] > _STAY:
                regime = (regime + int(switch_to[j])) % len(_REGIMES)
            _, drift, mult = _REGIMES[regime]
            sigma = math.sqrt(var)
            eps = sigma * float(shock[j])
            var = _GARCH_OMEGA + _GARCH_ALPHA * eps * eps + _GARCH_BETA * var
            step_vol = mult * sigma
            # Overnight-style gap from the previous close, then the bar's own move.
            o = prev_close * math.exp(0.15 * step_vol * float(gap[j]))
            r = drift - _REVERT * (math.log(o) - log_p0) + mult * eps
            c = o * math.exp(r)
            h = max(o, c) * math.exp(0.5 * step_vol * float(wick[j, 0]))
            lo = min(o, c) * math.exp(-0.5 * step_vol * float(wick[j, 1]))
            # Rounding to cents can push open/close past high/low; re-impose the rules after it,
            # with one cent as the floor so prices stay > 0.
            o, c = max(round(o, 2), 0.01), max(round(c, 2), 0.01)
            h = max(round(h, 2), o, c)
            lo = min(max(round(lo, 2), 0.01), o, c)
            # Volume rises with the move's size in long-run standard deviations; the cap keeps
            # fat-tailed shocks from making thousand-fold spikes (real ones are ~10-30x).
            surprise = min(abs(mult * eps) / _LONG_RUN_VOL, _SURPRISE_CAP)
            v = max(1, round(base_volume * math.exp(0.45 * surprise + 0.3 * float(vol_noise[j]))))
            yield Bar(index, o, h, lo, c, float(v))
            prev_close = c
            index += 1


def synthetic_bars(
    num_bars: int, *, seed: int, start_price: float = 100.0, base_volume: float = 10_000.0
) -> list[Bar]:
    """The first `num_bars` bars of `iter_synthetic_bars(seed=..., ...)`.

    A prefix of a longer run: `synthetic_bars(n, seed=s) == synthetic_bars(m, seed=s)[:n]`, n<=m.
    """
    if isinstance(num_bars, bool) or not isinstance(num_bars, int | np.integer) or num_bars < 0:
        raise InputError(f"num_bars must be an int >= 0; got {num_bars!r}")
    stream = iter_synthetic_bars(seed=seed, start_price=start_price, base_volume=base_volume)
    return list(itertools.islice(stream, int(num_bars)))


# --- CSV input ------------------------------------------------------------------------------


def read_csv_bars(path: str | os.PathLike) -> list[Bar]:
    """Reads bars from a CSV with Open/High/Low/Close/Volume columns (any letter case).

    Other columns (a date index, "Adj Close", ...) are ignored; blank lines are skipped. Bars are
    numbered 0, 1, ... in file order. Raises InputError for a missing file, missing columns
    (listing required and found), or a bad row (naming its line number, header = line 1).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no CSV file at {p}")
    # utf-8-sig drops a byte-order mark, which would otherwise glue itself to the first header.
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{p} is empty; allowed: a header row with {', '.join(_OHLCV)}")
        names = [h.strip().lower() for h in header]
        missing = [c for c in _OHLCV if c not in names]
        if missing:
            raise InputError(
                f"{p} lacks column(s) {missing}; required (any case): Open, High, Low, Close, "
                f"Volume; found: {header}"
            )
        dupes = [c for c in _OHLCV if names.count(c) > 1]
        if dupes:
            raise InputError(f"{p} has duplicate column(s) {dupes}; allowed: one of each")
        cols = [names.index(c) for c in _OHLCV]
        bars = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{p} line {reader.line_num}"
            if len(row) != len(header):
                raise InputError(f"{where}: {len(row)} cells but the header has {len(header)}")
            try:
                values = [float(row[i]) for i in cols]
            except ValueError as e:
                raise InputError(f"{where}: a value is not a number ({e})") from e
            try:
                bars.append(Bar(len(bars), *values))
            except InputError as e:
                raise InputError(f"{where}: {e}") from e
    if not bars:
        raise InputError(f"{p} has a header but no data rows; allowed: at least one bar")
    return bars


def backtesting_csv(name: str) -> Path:
    """Path of a sample CSV shipped with the optional `backtesting` package.

    `name` is a file stem such as "GOOG" (daily), "EURUSD" (hourly) or "BTCUSD" (monthly), any
    case. The package is located without importing it (its import pulls in pandas and bokeh).
    """
    spec = importlib.util.find_spec("backtesting")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "backtesting_csv needs the `backtesting` package: pip install backtesting "
            "(or pip install statejax[data])"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "test"
    available = {f.stem.upper(): f for f in sorted(folder.glob("*.csv"))}
    if not isinstance(name, str) or name.upper() not in available:
        raise InputError(f"unknown backtesting CSV {name!r}; available: {sorted(available)}")
    return available[name.upper()]


# --- text form ------------------------------------------------------------------------------


def _num(x: float) -> str:
    # Shortest repr round-trips exactly and keeps every decimal the source had (EURUSD quotes
    # use 5); dropping a trailing ".0" saves bytes on integer volumes and round prices.
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def format_bar(bar: Bar) -> str:
    """One bar as a text line: "index open high low close volume\\n", space-separated.

    Numbers use their shortest exact decimal form ("101.5", not "101.50"; "12000", not
    "12000.0"), so `parse_bar(format_bar(b)) == b` for every bar.
    Example: "17 101.5 102.31 100.98 101.77 12034\\n".
    """
    if not isinstance(bar, Bar):
        raise InputError(f"format_bar needs a Bar; got {type(bar).__name__}")
    fields = " ".join(_num(getattr(bar, n)) for n in _OHLCV)
    return f"{bar.index} {fields}\n"


def parse_bar(line: str) -> Bar:
    """Inverse of `format_bar`: a line "index open high low close volume" (newline optional)."""
    if not isinstance(line, str):
        raise InputError(f"parse_bar needs a str; got {type(line).__name__}")
    parts = line.split()
    if len(parts) != 6:
        raise InputError(
            f"bar line {line!r} has {len(parts)} fields; allowed: 6, "
            "'index open high low close volume'"
        )
    if not (parts[0].isascii() and parts[0].isdigit()):
        raise InputError(f"bar line {line!r}: index {parts[0]!r} is not an int >= 0")
    try:
        values = [float(x) for x in parts[1:]]
    except ValueError as e:
        raise InputError(f"bar line {line!r}: a value is not a number ({e})") from e
    try:
        return Bar(int(parts[0]), *values)
    except InputError as e:
        raise InputError(f"bar line {line!r}: {e}") from e


def tokens_per_bar(tokenizer: Any, bars: Iterable[Bar]) -> float:
    """Mean number of tokens in `format_bar(b)` over `bars` (a statejax Tokenizer)."""
    counts = [len(tokenizer.encode(format_bar(b))) for b in bars]
    if not counts:
        raise InputError("tokens_per_bar needs at least one bar; got none")
    return float(np.mean(counts))
