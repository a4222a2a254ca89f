"""Questions about a stream of OHLCV bars whose answers are computed exactly from the bars.

Serving format (the same in training, evaluation and the main job): a session holds
`prompt_prefix()` then one `format_bar` line per bar; a question is asked on a branch as
`format_question(qtype, k)` = "Q: <question>\\nA: " and the model writes the answer followed by
"\\n" (`STOP_TOKEN`). Every question looks only at the last few bars, so the answer does not
depend on how long the context is.

Question types, from easy to hard (k in `KS`):

- `last_close` (copy): "last close?" -> the last bar's close as written, e.g. "101.77".
- `direction` (compare two numbers): "direction of last k?" -> "up" / "down" / "flat",
  the last close against the close k bars before it.
- `high_index` (argmax, then copy): "highest high of last k?" -> that bar's index as
  written, e.g. "1234" (the latest bar on ties).
- `ma_side` (average): "close vs k-bar average?" -> "above" if the last close is above the
  mean of the last k closes, else "below".
- `up_count` (count): "up bars in last k?" -> "0".."k", bars with close > open.

Ground truth uses exact decimal arithmetic on the numbers as written, so it never depends on
float rounding.
"""

from collections.abc import Sequence
from decimal import Decimal

import numpy as np

from statejax.data.market import Bar, format_bar
from statejax.errors import InputError

QUESTION_TYPES = ("last_close", "direction", "high_index", "ma_side", "up_count")
KS = (3, 5)  # window lengths the questions ask about
STOP_TOKEN = ord("\n")  # answers end with a newline; generation stops there
PREFIX = "bars: idx open high low close volume\n"

_TEMPLATES = {
    "last_close": "last close?",
    "direction": "direction of last {k}?",
    "high_index": "highest high of last {k}?",
    "ma_side": "close vs {k}-bar average?",
    "up_count": "up bars in last {k}?",
}


def prompt_prefix() -> str:
    """The session's frozen prefix (a one-line header naming the bar fields)."""
    return PREFIX


def format_question(qtype: str, k: int) -> str:
    """Branch text of a question, e.g. "Q: up bars in last 5?\\nA: "; the answer follows."""
    _check_type(qtype)
    return f"Q: {_TEMPLATES[qtype].format(k=k)}\nA: "


def bars_needed(qtype: str, k: int) -> int:
    """Bars the context must hold for the question to have an answer."""
    _check_type(qtype)
    return {"last_close": 1, "direction": k + 1}.get(qtype, k)


def valid_ks(qtype: str, num_bars: int) -> tuple[int, ...]:
    """The k values (from `KS`; just (1,) for `last_close`) askable with `num_bars` bars."""
    ks = (1,) if qtype == "last_close" else KS
    return tuple(k for k in ks if bars_needed(qtype, k) <= num_bars)


def answer(qtype: str, bars: Sequence[Bar], k: int) -> str:
    """Exact answer of a question about the last bars of `bars` (oldest first).

    Args:
      qtype: one of `QUESTION_TYPES`.
      bars: the bars in the context, in stream order; only the last `bars_needed` are read.
      k: the window length (ignored by `last_close`).

    Returns:
      The answer text without the trailing newline, e.g. "up", "1234", "101.77", "3".
    """
    if len(bars) < bars_needed(qtype, k):
        raise InputError(f"{qtype} with k={k} needs {bars_needed(qtype, k)} bars; "
                         f"got {len(bars)}")
    last = bars[-1]
    if qtype == "last_close":
        return _field_text(last, "close")
    window = bars[-k:]
    if qtype == "direction":
        now, then = _dec(last.close), _dec(bars[-1 - k].close)
        return "up" if now > then else "down" if now < then else "flat"
    if qtype == "high_index":
        highs = [_dec(b.high) for b in window]
        top = max(highs)
        latest = max(i for i, h in enumerate(highs) if h == top)
        return str(window[latest].index)
    if qtype == "ma_side":
        # close > mean(closes)  <=>  k * close > sum(closes), exactly.
        total = sum(_dec(b.close) for b in window)
        return "above" if k * _dec(last.close) > total else "below"
    # up_count
    return str(sum(_dec(b.close) > _dec(b.open) for b in window))


def make_question(qtype: str, bars: Sequence[Bar], rng: np.random.Generator,
                  ) -> tuple[str, str]:
    """A random question of type `qtype` about the end of `bars`.

    Returns:
      (branch text from `format_question`, answer text without the newline).
    """
    ks = valid_ks(qtype, len(bars))
    if not ks:
        raise InputError(f"{len(bars)} bars are too few for any {qtype} question")
    k = int(ks[rng.integers(len(ks))])
    return format_question(qtype, k), answer(qtype, bars, k)


def _dec(x: float) -> Decimal:
    # repr is the shortest exact decimal form, the one `format_bar` writes.
    return Decimal(repr(float(x)))


def _field_text(bar: Bar, name: str) -> str:
    """A field exactly as `format_bar` writes it."""
    fields = format_bar(bar).split()
    return fields[1 + ("open", "high", "low", "close", "volume").index(name)]


def _check_type(qtype: str):
    if qtype not in QUESTION_TYPES:
        raise InputError(f"unknown question type {qtype!r}; allowed: {QUESTION_TYPES}")
