"""Online features: the shared feature spec over the latest bars the feed holds.

Serve computes features with the polars engine of the spec (market.features.polars_engine), the
one the parity tests hold equal to the Spark engine of the offline ETL, so the model sees the
definitions it was trained on (DESIGN.md section 4). Online, a segment starts at the oldest bar
held, not where the offline history started; `min_history_bars` says how many bars make the
values of the newest rows equal the offline ones.
"""

from __future__ import annotations

import polars as pl

from market.features import spec
from market.features.polars_engine import compute_features
from market.klines import BAR_COLUMNS

# Bars before a row that make its online features equal the offline (full-history) ones.
#
# Rolling features (SMA, Bollinger, realised volatility, volume z-score, returns) read at most
# spec.LONGEST_WINDOW_BARS = 61 bars and are exact once the spec's warm-up is over. Recursive
# ones (EMA 12/26, MACD and its EMA 9 signal, Wilder RSI 14) are seeded with the first bar held
# and never converge exactly: the seed's weight decays by (1 - alpha) per bar, slowest for RSI
# (13/14) and the MACD chain. Measured on the real BTCUSDT 1-minute data (571,680 bars,
# 2023-12..2024-12; online frames started every 250 bars, 2,284 of them, compared with the
# offline features of the whole year), the largest relative difference over every feature, at
# and after N bars into the online frame, with the error measured against max(|offline value|,
# the column's median |value|) as DESIGN.md section 4 does (MACD crosses zero):
#
#     N = 240: 6.1e-7 (macd_signal; rsi_14 3.8e-7)   N = 260: 1.3e-7   N = 300: 5.5e-9
#
# so the spec's own warm-up, WARMUP_BARS = 240, already brings every feature within 1e-6.
# The online warm-up nulls the first WARMUP_BARS rows anyway, so fewer bars are never usable.
CONVERGENCE_BARS = spec.WARMUP_BARS
# The relative difference (scaled as above) online and offline features stay within.
ONLINE_RELATIVE_TOLERANCE = 1e-6


def min_history_bars(window_bars: int) -> int:
    """Bars (1-minute) to hold so that the last `window_bars` feature rows equal offline ones.

    The last `window_bars` rows of `latest_features` over that many bars lie at least
    CONVERGENCE_BARS (= WARMUP_BARS = 240) bars into the frame: past the warm-up, whose features
    are null, and far enough that recursive features (EMA, MACD, Wilder RSI), seeded with the
    first bar held, are within ONLINE_RELATIVE_TOLERANCE (1e-6; measured worst case 6.1e-7 on a
    year of real BTCUSDT minutes) of the offline values computed over the full history. Rolling
    features are exact there. Raises ValueError when `window_bars` < 1.
    """
    if window_bars < 1:
        raise ValueError(f"window_bars must be at least 1, got {window_bars}")
    return CONVERGENCE_BARS + window_bars


def latest_features(bars: pl.DataFrame) -> pl.DataFrame:
    """Every spec feature (and target) row of `bars`, computed by the online (polars) engine.

    `bars`: validated 1-minute bars with the market.klines.BAR_COLUMNS columns (`open_time` in
    epoch ms or a UTC datetime), any number of symbols, any order. Returns them sorted by symbol
    and open time with `segment` and the spec's feature and target columns: all rows; the caller
    takes the tail it needs. Feature values of a row are null within WARMUP_BARS (240) bars of
    the start of its segment (the oldest bar held, or the first bar after a missing minute);
    rows at least CONVERGENCE_BARS in equal the offline values (see `min_history_bars`).
    Each horizon's targets are null for its newest h rows (spec.TARGET_HORIZONS_BARS): their
    future is not known yet.
    Raises ValueError when a bar column is missing.
    """
    missing = [name for name in BAR_COLUMNS if name not in bars.columns]
    if missing:
        raise ValueError(f"bars lack the column(s) {missing}; expected {list(BAR_COLUMNS)}")
    return compute_features(bars)
