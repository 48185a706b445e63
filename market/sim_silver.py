"""Silver straight from the simulator through the polars engine, for tests and benchmarks.

Writes the same layout and columns as the Spark ETL (Parquet partitioned symbol/month, open_time
a UTC millisecond timestamp) without Bronze or RayDP; the two engines are held equal by the
feature parity tests, so model code reads either the same way.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl

from configs.schema import SimConfig
from market.features.polars_engine import compute_features
from market.lake import Lake
from market.sources.sim import MarketSimulator


def simulated_bars(config: SimConfig, symbols: list[str], days: int) -> pl.DataFrame:
    """Validated-bar columns (open_time in epoch ms) of `days` days from the anchor date."""
    frames = []
    last = config.anchor_date + timedelta(days=days - 1)
    for symbol in symbols:
        for _, day in MarketSimulator(config, symbol).days(config.anchor_date, last):
            keep = day.present
            frames.append(
                pl.DataFrame(
                    {
                        "symbol": symbol,
                        "open_time": day.open_time_ms[keep],
                        "open": day.open[keep],
                        "high": day.high[keep],
                        "low": day.low[keep],
                        "close": day.close[keep],
                        "volume": day.volume[keep],
                        "quote_volume": day.volume[keep] * day.close[keep],
                        "trades": day.trades[keep].astype(np.int64),
                        "taker_buy_base": day.taker_buy_base[keep],
                        "taker_buy_quote": day.taker_buy_base[keep] * day.close[keep],
                    }
                )
            )
    return pl.concat(frames)


def silver_frame(bars: pl.DataFrame) -> pl.DataFrame:
    """Features and targets of `bars`, with open_time as Silver's UTC ms timestamp."""
    return compute_features(bars).with_columns(
        pl.from_epoch("open_time", time_unit="ms").dt.replace_time_zone("UTC").alias("open_time")
    )


def write_sim_silver(lake: Path, config: SimConfig, symbols: list[str], days: int) -> None:
    """Simulated bars -> polars features -> `<lake>/silver/symbol=/month=/*.parquet`."""
    silver = silver_frame(simulated_bars(config, symbols, days)).with_columns(
        pl.col("open_time").dt.strftime("%Y-%m").alias("month")
    )
    silver.write_parquet(Lake.at(lake).silver, partition_by=["symbol", "month"])
