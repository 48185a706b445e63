"""The validation rule table and its polars form: one row per reason, rows exactly on each bound,
rule order, the duplicate rule, and what importing the package loads.

`CASES` is also what the Spark parity test (tests/integration/test_validation_parity.py) runs
through both forms.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import polars as pl
import pytest

from market import validation as v
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
from market.validation.polars_rules import check_bars, check_lines, first_of_each_minute

SYMBOL = "BTCUSDT"
T0 = 1_704_153_600_000  # 2024-01-02 00:00 UTC, epoch ms
GOOD: dict[str, object] = {
    "open": 100,
    "high": 101,
    "low": 99,
    "close": 100.5,
    "volume": 10,
    "quote_volume": 1000,
    "trades": 5,
    "taker_buy_base": 4,
    "taker_buy_quote": 400,
    "ignore": 0,
}


def line(minute: int, **fields: object) -> str:
    """A dump-style line for the bar opening `minute` minutes after T0, GOOD unless overridden.

    `open_time` / `close_time` overrides replace the derived epoch-ms values.
    """
    open_ms = T0 + minute * ONE_MINUTE_MS
    values = {"open_time": open_ms, "close_time": open_ms + ONE_MINUTE_MS - 1, **GOOD, **fields}
    order = ("open_time", "open", "high", "low", "close", "volume", "close_time")
    rest = ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote", "ignore")
    return ",".join(str(values[name]) for name in (*order, *rest))


@dataclass(frozen=True)
class Case:
    name: str
    line: str
    reason: str | None  # None: kept


def _rest_array(minute: int) -> str:
    """The bar of `line(minute)` as Binance's REST API sends it: a JSON array, prices quoted."""
    open_ms = T0 + minute * ONE_MINUTE_MS
    prices = '"100.0", "101.0", "99.0", "100.5", "10.0"'
    return f'[{open_ms}, {prices}, {open_ms + 59_999}, "1000.0", 5, "4.0", "400.0", "0"]'


# Each case has its own minute unless it is about duplicates, so that only those collide.
CASES: tuple[Case, ...] = (
    Case("valid", line(0), None),
    Case("valid_rest_array", _rest_array(1), None),
    Case(
        "valid_microseconds",
        line(
            2,
            open_time=(T0 + 2 * ONE_MINUTE_MS) * 1000,
            close_time=(T0 + 3 * ONE_MINUTE_MS) * 1000 - 1,
        ),
        None,
    ),
    Case("valid_whitespace_in_fields", line(3, open=" 100 ", high="\t101"), None),
    Case("valid_exponent_and_sign", line(4, open="1e2", high="+1.01e2"), None),
    Case(
        "valid_tiny_prices",
        line(5, open="1e-300", high="1e-300", low="1e-300", close="1e-300"),
        None,
    ),
    Case(
        "valid_amounts_at_floor",
        line(6, volume=0, quote_volume=0, trades=0, taker_buy_base=0, taker_buy_quote=0),
        None,
    ),
    Case("valid_negative_zero_volume", line(7, volume="-0.0", taker_buy_base="-0.0"), None),
    Case("valid_flat_bar", line(8, open=100, high=100, low=100, close=100), None),
    Case("valid_high_is_close_low_is_open", line(9, open=99, high=101, low=99, close=101), None),
    Case("valid_taker_equals_volume", line(10, taker_buy_base=10), None),
    Case("valid_taker_quote_above_quote_volume", line(11, taker_buy_quote=5000), None),
    Case("valid_ignore_is_not_parsed", line(12, ignore="anything"), None),
    Case("fields_three", "1,2,3", v.WRONG_FIELD_COUNT),
    Case("fields_none", "", v.WRONG_FIELD_COUNT),
    Case("fields_thirteen", line(13) + ",0", v.WRONG_FIELD_COUNT),
    Case("fields_eleven", line(14).rsplit(",", 1)[0], v.WRONG_FIELD_COUNT),
    Case("fields_count_before_parse", "abc," + line(15), v.WRONG_FIELD_COUNT),
    Case("price_text", line(16, open="abc"), v.UNPARSEABLE_VALUE),
    Case("price_nan", line(17, close="NaN"), v.UNPARSEABLE_VALUE),
    Case("price_infinite", line(18, high="inf"), v.UNPARSEABLE_VALUE),
    Case("volume_minus_infinity", line(19, volume="-Infinity"), v.UNPARSEABLE_VALUE),
    Case("volume_overflows_to_infinity", line(20, quote_volume="1e400"), v.UNPARSEABLE_VALUE),
    Case("price_empty", line(21, low=""), v.UNPARSEABLE_VALUE),
    Case("open_time_text", line(22, open_time="abc"), v.UNPARSEABLE_VALUE),
    Case("close_time_empty", line(23, close_time=""), v.UNPARSEABLE_VALUE),
    Case("trades_text", line(24, trades="x"), v.UNPARSEABLE_VALUE),
    Case("parse_before_timestamp", line(25, open_time=T0 + 5, low="x"), v.UNPARSEABLE_VALUE),
    Case("open_off_the_minute", line(26, open_time=T0 + 26 * ONE_MINUTE_MS + 5), v.BAD_TIMESTAMP),
    Case(
        "close_one_ms_late",
        line(27, close_time=T0 + 28 * ONE_MINUTE_MS),
        v.BAD_TIMESTAMP,
    ),
    Case(
        "close_one_ms_early",
        line(28, close_time=T0 + 29 * ONE_MINUTE_MS - 2),
        v.BAD_TIMESTAMP,
    ),
    Case(
        "microseconds_off_the_minute",
        line(
            29,
            open_time=(T0 + 29 * ONE_MINUTE_MS) * 1000 + 1000,
            close_time=(T0 + 30 * ONE_MINUTE_MS) * 1000,
        ),
        v.BAD_TIMESTAMP,
    ),
    Case(
        "timestamp_before_price",
        line(30, open_time=T0 + 30 * ONE_MINUTE_MS + 1, open=0),
        v.BAD_TIMESTAMP,
    ),
    Case("price_at_floor", line(31, open=0), v.NON_POSITIVE_PRICE),
    Case("price_negative_zero", line(32, close="-0"), v.NON_POSITIVE_PRICE),
    Case("price_negative", line(33, low=-1), v.NON_POSITIVE_PRICE),
    Case("price_before_volume", line(34, open=0, volume=-1), v.NON_POSITIVE_PRICE),
    Case("volume_negative", line(35, volume=-1), v.NEGATIVE_VOLUME),
    Case("quote_volume_just_negative", line(36, quote_volume=-0.001), v.NEGATIVE_VOLUME),
    Case("trades_negative", line(37, trades=-1), v.NEGATIVE_VOLUME),
    Case("taker_base_negative", line(38, taker_buy_base=-1), v.NEGATIVE_VOLUME),
    Case("taker_quote_negative", line(39, taker_buy_quote=-1), v.NEGATIVE_VOLUME),
    Case("volume_before_ohlc", line(40, volume=-1, high=98), v.NEGATIVE_VOLUME),
    Case("high_below_open", line(41, open=101.5, high=101), v.OHLC_INCONSISTENT),
    Case("high_below_close", line(42, close=101.01), v.OHLC_INCONSISTENT),
    Case("high_below_low", line(43, open=100, high=100, low=100.5, close=100), v.OHLC_INCONSISTENT),
    Case("low_above_open", line(44, open=98.9), v.OHLC_INCONSISTENT),
    Case("low_above_close", line(45, close=98), v.OHLC_INCONSISTENT),
    Case("ohlc_before_taker", line(46, close=98, taker_buy_base=11), v.OHLC_INCONSISTENT),
    Case("taker_just_above_volume", line(47, taker_buy_base=10.000001), v.TAKER_BUY_EXCEEDS_VOLUME),
    # Duplicates: among valid rows the first of a minute is kept; a rejected row shadows nothing.
    Case("duplicate_later_copy", line(0, trades=7), v.DUPLICATE_OPEN_TIME),
    Case(
        "duplicate_in_microseconds",
        line(0, open_time=T0 * 1000, close_time=(T0 + ONE_MINUTE_MS) * 1000 - 1),
        v.DUPLICATE_OPEN_TIME,
    ),
    Case("rejected_before_valid", line(48, open=0), v.NON_POSITIVE_PRICE),
    Case("valid_after_rejected", line(48), None),
    Case("valid_after_rejected_then_copy", line(48, trades=8), v.DUPLICATE_OPEN_TIME),
)

KNOWN_DIFFERENCES: tuple[tuple[Case, str | None], ...] = (
    # (the row and the polars reason, the Spark reason). Spark's non-ANSI string -> long cast
    # truncates a fraction; polars refuses it.
    (Case("trades_with_fraction", line(49, trades="1.5"), v.UNPARSEABLE_VALUE), None),
    (
        Case(
            "open_time_with_fraction",
            line(50, open_time=f"{T0 + 50 * ONE_MINUTE_MS}.0"),
            v.UNPARSEABLE_VALUE,
        ),
        None,
    ),
    # Java's Double parser takes a type suffix; polars does not.
    (Case("price_with_double_suffix", line(51, close="100.5d"), v.UNPARSEABLE_VALUE), None),
    # `\s` is Unicode whitespace in polars' regex, ASCII whitespace in Java's: a no-break space
    # is stripped by the feed but stays in Silver's field and spoils it.
    (Case("no_break_space_in_field", line(52, open="\u00a0100"), None), v.UNPARSEABLE_VALUE),
)


def polars_reasons(cases: tuple[Case, ...]) -> list[str | None]:
    """Each case's reason from the polars form: row rules, then the duplicate rule."""
    checked = check_lines([case.line for case in cases], SYMBOL).with_row_index("row")
    kept = set(first_of_each_minute(checked.filter(pl.col("reason").is_null()))["row"])
    return [
        v.DUPLICATE_OPEN_TIME if reason is None and row not in kept else reason
        for row, reason in zip(checked["row"], checked["reason"], strict=True)
    ]


def test_the_rule_table_lists_every_reason_once_in_check_order() -> None:
    assert v.REASONS == (
        v.WRONG_FIELD_COUNT,
        v.UNPARSEABLE_VALUE,
        v.BAD_TIMESTAMP,
        v.NON_POSITIVE_PRICE,
        v.NEGATIVE_VOLUME,
        v.OHLC_INCONSISTENT,
        v.TAKER_BUY_EXCEEDS_VOLUME,
        v.DUPLICATE_OPEN_TIME,
    )
    assert v.RULES[-1] is v.DUPLICATE_RULE
    for rule in v.RULES:
        assert rule.description and "\n" not in rule.description


def test_conditions_must_cover_exactly_the_row_rules() -> None:
    everything = {rule.reason: rule.reason.upper() for rule in v.ROW_RULES}
    assert [reason for reason, _ in v.in_rule_order(everything)] == list(v.REASONS[:-1])
    with pytest.raises(ValueError, match="expected"):
        v.in_rule_order({k: c for k, c in everything.items() if k != v.BAD_TIMESTAMP})
    with pytest.raises(ValueError, match="expected"):
        v.in_rule_order({**everything, v.DUPLICATE_OPEN_TIME: "x"})


def test_the_cases_cover_every_reason_and_valid_rows() -> None:
    assert {case.reason for case in CASES} == {*v.REASONS, None}


def test_polars_form_gives_each_row_its_reason() -> None:
    reasons = dict(zip([case.name for case in CASES], polars_reasons(CASES), strict=True))
    assert reasons == {case.name: case.reason for case in CASES}


def test_polars_form_of_the_known_differences() -> None:
    cases = tuple(case for case, _ in KNOWN_DIFFERENCES)
    assert polars_reasons(cases) == [case.reason for case in cases]


def test_kept_rows_are_typed_bars_in_epoch_ms() -> None:
    checked = check_lines([line(0), _rest_array(1), CASES[2].line], SYMBOL)
    assert checked.columns == [*BAR_COLUMNS, "reason"]
    assert checked["reason"].null_count() == 3
    assert checked["open_time"].to_list() == [T0 + i * ONE_MINUTE_MS for i in range(3)]
    assert checked["symbol"].to_list() == [SYMBOL] * 3
    assert checked.drop("open_time").slice(0, 2).n_unique() == 1  # dump and REST alike


def test_typed_bars_get_the_reasons_of_their_lines() -> None:
    # check_bars sees parsed values: only the rules after the timestamp check can apply.
    after_parse = [
        case
        for case in CASES
        if case.reason not in (v.WRONG_FIELD_COUNT, v.UNPARSEABLE_VALUE, v.BAD_TIMESTAMP)
    ]
    from_lines = check_lines([case.line for case in after_parse], SYMBOL)
    from_bars = check_bars(from_lines.drop("reason"))
    assert from_bars.equals(from_lines)


def test_the_first_copy_of_a_minute_is_kept_in_frame_order() -> None:
    bars = check_lines([line(1), line(0, trades=1), line(1, trades=2), line(0, trades=3)], SYMBOL)
    kept = first_of_each_minute(bars.drop("reason"))
    assert kept["trades"].to_list() == [5, 1]


def test_importing_the_rules_loads_no_engine() -> None:
    # The package holds plain data; the Spark form imports pyspark only when it builds columns.
    probe = (
        "import sys, market.validation;"
        "print('pyspark' in sys.modules, 'polars' in sys.modules);"
        "import market.validation.spark_rules;"
        "print('pyspark' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False", "False"]
