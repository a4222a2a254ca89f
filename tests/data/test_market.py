"""OHLCV bars: validation, the synthetic generator's statistics, CSV input and the text form."""

import dataclasses
import itertools

import numpy as np
import pytest

from statejax.data.market import (
    Bar,
    backtesting_csv,
    format_bar,
    iter_synthetic_bars,
    parse_bar,
    read_csv_bars,
    synthetic_bars,
    tokens_per_bar,
)
from statejax.errors import InputError
from statejax.tokenizer import ByteTokenizer

# --- Bar ------------------------------------------------------------------------------------


def test_bar_coerces_numbers_to_float():
    b = Bar(3, 10, 12, 9, np.float32(11.5), np.int64(500))
    assert b == Bar(3, 10.0, 12.0, 9.0, 11.5, 500.0)
    assert all(type(getattr(b, f)) is float for f in ("open", "high", "low", "close", "volume"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.close = 1.0


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((0, float("nan"), 2, 1, 1.5, 10), r"Bar.open=nan .*finite and > 0"),
        ((0, 1, float("inf"), 1, 1, 10), r"Bar.high=inf .*finite and > 0"),
        ((0, -1, 2, 1, 1.5, 10), r"Bar.open=-1.0 .*finite and > 0"),
        ((0, 1, 2, 0, 1.5, 10), r"Bar.low=0.0 .*finite and > 0"),
        ((0, 1.5, 2, 1, 1.5, -5), r"Bar.volume=-5.0 .*finite and >= 0"),
        ((0, 1.5, 1, 2, 1.5, 5), r"Bar.high=1.0 is below Bar.low=2.0; allowed: low <= high"),
        ((0, 3, 2, 1, 1.5, 5), r"Bar.open=3.0 is outside \[low=1.0, high=2.0\]"),
        ((0, 1.5, 2, 1, 0.5, 5), r"Bar.close=0.5 is outside .*low <= close <= high"),
        ((-1, 1.5, 2, 1, 1.5, 5), r"Bar.index=-1 is negative"),
        ((0.0, 1.5, 2, 1, 1.5, 5), r"Bar.index must be an int"),
        ((0, "1.5", 2, 1, 1.5, 5), r"Bar.open must be a real number"),
    ],
)
def test_bar_rejects_invalid(args, pattern):
    with pytest.raises(InputError, match=pattern):
        Bar(*args)


def test_bar_allows_zero_volume_and_flat_bar():
    b = Bar(0, 1.0, 1.0, 1.0, 1.0, 0.0)
    assert b.volume == 0.0


# --- synthetic bars -------------------------------------------------------------------------


def _closes(bars):
    return np.array([b.close for b in bars])


def test_synthetic_deterministic_per_seed_and_prefix_stable():
    a = synthetic_bars(500, seed=7)
    assert a == synthetic_bars(500, seed=7)
    assert a[:123] == synthetic_bars(123, seed=7)  # chunked draws do not change the stream
    assert a == list(itertools.islice(iter_synthetic_bars(seed=7), 500))
    assert a != synthetic_bars(500, seed=8)
    assert [b.index for b in a] == list(range(500))
    assert a[0].open == pytest.approx(100.0, rel=0.05)
    assert synthetic_bars(0, seed=1) == []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_bars_valid_and_rounded(seed):
    bars = synthetic_bars(2000, seed=seed, start_price=50.0)
    for b in bars:
        assert b.high >= max(b.open, b.close) and b.low <= min(b.open, b.close)
        assert min(b.open, b.high, b.low, b.close) > 0 and b.volume >= 1
        for v in (b.open, b.high, b.low, b.close):
            assert round(v, 2) == v
        assert b.volume == int(b.volume)
    # Consecutive bars are linked: open stays near the previous close.
    gaps = [abs(n.open / p.close - 1) for p, n in itertools.pairwise(bars)]
    assert max(gaps) < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_has_up_and_down_trends(seed):
    c = _closes(synthetic_bars(2000, seed=seed))
    ret100 = np.log(c[100:] / c[:-100])
    assert ret100.max() > 0.10 and ret100.min() < -0.10


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_volatility_varies(seed):
    r = np.diff(np.log(_closes(synthetic_bars(2000, seed=seed))))
    window_std = r[: 19 * 100].reshape(19, 100).std(axis=1)
    assert window_std.max() > 1.5 * window_std.min()


def test_synthetic_volume_tracks_abs_return():
    bars = synthetic_bars(2000, seed=0)
    abs_ret = np.abs(np.log([b.close / b.open for b in bars]))
    log_vol = np.log([b.volume for b in bars])
    assert np.corrcoef(abs_ret, log_vol)[0, 1] > 0.3


def test_synthetic_stays_bounded_over_a_long_stream():
    c = _closes(itertools.islice(iter_synthetic_bars(seed=1), 50_000))
    assert 10.0 < c.min() and c.max() < 1000.0


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_bars=-1, seed=0), "num_bars must be an int >= 0"),
        (dict(num_bars=5, seed=-3), "seed must be an int >= 0"),
        (dict(num_bars=5, seed=1.5), "seed must be an int >= 0"),
        (dict(num_bars=5, seed=0, start_price=0.5), "start_price must be a finite number >= 1"),
        (dict(num_bars=5, seed=0, base_volume=float("nan")), "base_volume must be a finite"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        synthetic_bars(**kwargs)


# --- text form ------------------------------------------------------------------------------


def test_format_bar_exact_text():
    assert format_bar(Bar(17, 101.5, 102.31, 100.98, 101.77, 12034.0)) == (
        "17 101.5 102.31 100.98 101.77 12034\n"
    )
    assert format_bar(Bar(0, 1.0716, 1.0722, 1.07083, 1.07219, 1413)) == (
        "0 1.0716 1.0722 1.07083 1.07219 1413\n"
    )


def test_format_parse_round_trip():
    bars = synthetic_bars(300, seed=4)
    bars.append(Bar(300, 4.58, 7.38, 3.8, 5.55, 2012.25343589))  # fractional volume
    for b in bars:
        line = format_bar(b)
        assert line.endswith("\n") and line.count("\n") == 1
        assert parse_bar(line) == b
    assert parse_bar("5 1 2 1 1.5 0") == Bar(5, 1.0, 2.0, 1.0, 1.5, 0.0)  # newline optional


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("1 2 3 4 5\n", "has 5 fields; allowed: 6"),
        ("x 1 2 1 1.5 10\n", "index 'x' is not an int >= 0"),
        ("-1 1 2 1 1.5 10\n", "index '-1' is not an int >= 0"),
        ("1 1 2 1 abc 10\n", "a value is not a number"),
        ("1 1 1 2 1.5 10\n", r"Bar.high=1.0 is below Bar.low=2.0"),
        ("1 1 2 1 1.5 nan\n", r"Bar.volume=nan"),
    ],
)
def test_parse_bar_rejects_malformed(line, pattern):
    with pytest.raises(InputError, match=pattern):
        parse_bar(line)


def test_tokens_per_bar_byte_tokenizer_is_mean_utf8_length():
    bars = synthetic_bars(1000, seed=2)
    expected = np.mean([len(format_bar(b).encode()) for b in bars])
    assert tokens_per_bar(ByteTokenizer(), bars) == pytest.approx(expected)
    assert 25 < expected < 45
    with pytest.raises(InputError, match="at least one bar"):
        tokens_per_bar(ByteTokenizer(), [])


# --- CSV ------------------------------------------------------------------------------------


def _write(tmp_path, text, name="bars.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_read_csv_mixed_case_headers_and_extra_columns(tmp_path):
    p = _write(
        tmp_path,
        "Date,OPEN,high,Low,close,Adj Close,VoLuMe\n"
        "2024-01-02,10,11,9.5,10.5,10.4,1200\n"
        "\n"
        "2024-01-03,10.5,10.75,10,10.25,10.2,800.5\n",
    )
    assert read_csv_bars(p) == [
        Bar(0, 10.0, 11.0, 9.5, 10.5, 1200.0),  # "Close" taken, "Adj Close" ignored
        Bar(1, 10.5, 10.75, 10.0, 10.25, 800.5),
    ]
    assert read_csv_bars(str(p)) == read_csv_bars(p)


@pytest.mark.parametrize(
    "row, pattern",
    [
        ("d,nan,11,9,10,100", r"line 3: Bar.open=nan"),
        ("d,10,11,9,10,-100", r"line 3: Bar.volume=-100.0 .*>= 0"),
        ("d,10,9,11,10,100", r"line 3: Bar.high=9.0 is below Bar.low=11.0"),
        ("d,10,11,9,ten,100", r"line 3: a value is not a number"),
        ("d,10,11,9", r"line 3: 4 cells but the header has 6"),
    ],
)
def test_read_csv_rejects_bad_rows_with_line_number(tmp_path, row, pattern):
    p = _write(tmp_path, f"date,open,high,low,close,volume\nd,10,11,9,10,100\n{row}\n")
    with pytest.raises(InputError, match=pattern):
        read_csv_bars(p)


def test_read_csv_missing_columns(tmp_path):
    p = _write(tmp_path, "Date,Open,High,Close\nd,1,2,1.5\n")
    with pytest.raises(InputError) as info:
        read_csv_bars(p)
    msg = str(info.value)
    assert "lacks column(s) ['low', 'volume']" in msg
    assert "required (any case): Open, High, Low, Close, Volume" in msg
    assert "found: ['Date', 'Open', 'High', 'Close']" in msg


def test_read_csv_missing_empty_and_header_only(tmp_path):
    with pytest.raises(InputError, match="no CSV file at"):
        read_csv_bars(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="is empty"):
        read_csv_bars(_write(tmp_path, "", "empty.csv"))
    with pytest.raises(InputError, match="no data rows"):
        read_csv_bars(_write(tmp_path, "open,high,low,close,volume\n", "header.csv"))


def test_backtesting_csvs():
    pytest.importorskip("backtesting")
    goog = backtesting_csv("GOOG")
    assert goog.name == "GOOG.csv" and goog.is_file()
    assert backtesting_csv("goog") == goog
    bars = read_csv_bars(goog)
    assert len(bars) > 2000
    assert bars[0] == Bar(0, 100.0, 104.06, 95.96, 100.34, 22351900.0)
    for name in ("EURUSD", "BTCUSD"):
        assert len(read_csv_bars(backtesting_csv(name))) > 100
    with pytest.raises(InputError, match=r"unknown backtesting CSV 'SPY'; available: \[.*'GOOG'"):
        backtesting_csv("SPY")
