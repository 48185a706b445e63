"""Silver as the dashboard reads it: one symbol's bars over a time window, with polars.

Silver lives where `market.lake.Lake` says (Parquet partitioned `symbol=`/`month=`, written by
the Spark ETL or `market.sim_silver`). Bollinger bands are derived from `sma_20` and
`bb_width_20`; a lake of validated bars without features gets them from the online polars
engine. Times are UTC; windows are hours of 1-minute bars; prices are in the quote currency.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import polars as pl

from market.features.polars_engine import compute_features
from market.features.spec import WARMUP_BARS
from market.klines import BAR_COLUMNS
from market.lake import Lake
from market.silver import open_silver
from market.storage import is_uri, local_path

WindowEnd = Literal["latest signal", "latest Silver bar"]

# Silver columns the market chart reads (besides symbol and open_time).
CHART_COLUMNS: Final[tuple[str, ...]] = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "sma_5",
    "sma_10",
    "sma_20",
    "ema_12",
    "ema_26",
    "bb_width_20",
    "rsi_14",
    "macd",
    "macd_signal",
    "macd_hist",
)


def _silver_scan(lake: str | Path) -> pl.LazyFrame:
    """A lazy scan of every Silver Parquet file, with the symbol/month partition columns. On an
    object store, the files Silver's last commit lists (`market.silver.open_silver`)."""
    root = Lake.at(lake).silver_location
    if is_uri(root) and local_path(root) is None:
        return pl.scan_pyarrow_dataset(open_silver(lake))
    if not is_uri(root) and not Path(root).is_dir():
        raise FileNotFoundError(
            f"no Silver at {root}: run `python -m jobs.features --lake {lake}` first"
        )
    return pl.scan_parquet(
        f"{root}/**/*.parquet",
        hive_partitioning=True,
        hive_schema={"symbol": pl.String(), "month": pl.String()},
        missing_columns="insert",
        extra_columns="ignore",
    )


def _utc_open_time(frame: pl.LazyFrame) -> pl.LazyFrame:
    """`open_time` as a UTC millisecond timestamp, whatever unit or zone Silver stored."""
    dtype = frame.collect_schema()["open_time"]
    column = pl.col("open_time")
    if isinstance(dtype, pl.Datetime):
        column = (
            column.dt.convert_time_zone("UTC")
            if dtype.time_zone
            else column.dt.replace_time_zone("UTC")
        )
    else:
        column = pl.from_epoch(column.cast(pl.Int64), time_unit="ms").dt.replace_time_zone("UTC")
    return frame.with_columns(column.cast(pl.Datetime("ms", "UTC")).alias("open_time"))


def silver_symbols(lake: str | Path) -> list[str]:
    """The symbols that have Silver partitions (`symbol=NAME` directories), sorted."""
    if local_path(Lake.at(lake).root) is None:
        symbols = open_silver(lake).to_table(columns=["symbol"])["symbol"].unique()
        return sorted(symbols.to_pylist())
    root = Path(Lake.at(lake).silver_location)
    if not root.is_dir():
        return []
    return sorted(
        p.name.split("=", 1)[1]
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("symbol=")
    )


def latest_silver_time(lake: str | Path, symbol: str) -> datetime | None:
    """The open time (UTC) of the newest Silver bar of `symbol`; None when it has none."""
    frame = _utc_open_time(_silver_scan(lake).filter(pl.col("symbol") == symbol))
    latest = frame.select(pl.col("open_time").max()).collect().item()
    return latest if isinstance(latest, datetime) else None


def chart_window(
    hours: float,
    end: WindowEnd,
    latest_bar: datetime | None,
    latest_signal: datetime | None,
    now: datetime | None = None,
) -> tuple[datetime, datetime]:
    """The market chart's [start, end] in UTC: `hours` hours ending at the newest signal's bar
    ("latest signal", when there is one) or at the newest Silver bar, else at `now`.

    Silver comes from the batch ETL and can lag the live feed, so either end can be wanted.
    """
    if hours <= 0:
        raise ValueError(f"hours must be > 0, got {hours}")
    if end == "latest signal" and latest_signal is not None:
        stop = latest_signal
    elif latest_bar is not None:
        stop = latest_bar
    elif latest_signal is not None:
        stop = latest_signal
    else:
        stop = now or datetime.now(UTC)
    return stop - timedelta(hours=hours), stop


def load_silver_window(
    lake: str | Path, symbol: str, start: datetime, end: datetime
) -> pl.DataFrame:
    """Silver bars of `symbol` with open time in [start, end] (UTC), oldest first.

    Columns: `open_time` (UTC ms timestamp), the CHART_COLUMNS and `bb_upper_20`/`bb_lower_20`
    (Bollinger bands, sma_20 * (1 ± bb_width_20 / 2), i.e. mid ± 2 population std). When the
    lake holds validated bars without features, the features are computed here with the online
    polars engine over the window plus WARMUP_BARS earlier bars (so they are warm).
    """
    scan = _utc_open_time(_silver_scan(lake).filter(pl.col("symbol") == symbol))
    available = set(scan.collect_schema().names())
    start = start.astimezone(UTC)
    end = end.astimezone(UTC)
    months = _months_between(start - timedelta(minutes=WARMUP_BARS), end)
    if "month" in available:
        scan = scan.filter(pl.col("month").is_in(months) | pl.col("month").is_null())
    if all(column in available for column in CHART_COLUMNS):
        bars = (
            scan.filter(pl.col("open_time").is_between(start, end))
            .select("open_time", *CHART_COLUMNS)
            .sort("open_time")
            .collect()
        )
    else:
        missing = sorted(set(BAR_COLUMNS) - available)
        if missing:
            raise ValueError(f"Silver of {symbol} lacks the bar columns {', '.join(missing)}")
        raw = (
            scan.filter(pl.col("open_time").is_between(start - timedelta(minutes=WARMUP_BARS), end))
            .select(*BAR_COLUMNS)
            .with_columns(pl.lit(symbol).alias("symbol"))
            .sort("open_time")
            .collect()
        )
        if raw.height:
            bars = (
                compute_features(raw)
                .filter(pl.col("open_time").is_between(start, end))
                .select("open_time", *CHART_COLUMNS)
            )
        else:
            schema: dict[str, Any] = {"open_time": pl.Datetime("ms", "UTC")}
            bars = pl.DataFrame(schema=schema | {c: pl.Float64 for c in CHART_COLUMNS})
    half_width = pl.col("bb_width_20") / 2.0
    return bars.with_columns(
        (pl.col("sma_20") * (1.0 + half_width)).alias("bb_upper_20"),
        (pl.col("sma_20") * (1.0 - half_width)).alias("bb_lower_20"),
    )


def _months_between(start: datetime, end: datetime) -> list[str]:
    """Silver's `month` partition values ("YYYY-MM") from start's month to end's, inclusive."""
    months, year, month = [], start.year, start.month
    while (year, month) <= (end.year, end.month):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months
