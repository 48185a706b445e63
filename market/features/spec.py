"""The feature specification shared by the three engines that implement it.

The Spark ETL runs market.features.numpy_kernel, POST /predict and the live engine the batch
(polars) engine market.features.polars_engine, and market.features.incremental advances the same
features one bar at a time; the parity tests hold the three equal. Everything here is data: the
names, windows and constants that the engines read, plus a version and a hash of the
definitions. Silver, every model and every served signal record the hash, so a model is only
ever fed features computed by the definitions it was trained on.
Units: every window is a number of 1-minute bars; returns are natural-log returns.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Final

SPEC_VERSION = "1.1.0"

# Bars at the start of each segment whose features are null (DESIGN.md section 4).
WARMUP_BARS = 240
# Horizons (in 1-minute bars) that Silver carries targets for; a sweep picks among them.
TARGET_HORIZONS_BARS: tuple[int, ...] = (10, 30, 60, 240)
# The default horizon (bars): what a model that does not say otherwise was trained and serves for.
HORIZON_BARS: Final = 10
# The longest target horizon (bars): how far back a new bar can complete an older bar's target.
MAX_HORIZON_BARS = max(TARGET_HORIZONS_BARS)

RETURN_LAGS: tuple[int, ...] = (1, 5, 10)
SMA_WINDOWS: tuple[int, ...] = (5, 10, 20)
EMA_FAST, EMA_SLOW, MACD_SIGNAL = 12, 26, 9
RSI_PERIOD = 14
BOLLINGER_WINDOW, BOLLINGER_K = 20, 2.0
REALISED_VOL_WINDOWS: tuple[int, ...] = (10, 30, 60)
TAKER_RATIO_MA_WINDOW = 10
VOLUME_Z_WINDOW = 60
MINUTES_PER_DAY = 1440
DAYS_PER_WEEK = 7


@dataclass(frozen=True)
class FeatureDef:
    """One Silver column: its name and the definition both engines implement."""

    name: str
    definition: str


FEATURES: tuple[FeatureDef, ...] = (
    *(FeatureDef(f"ret_{k}", f"ln(close_t / close_(t-{k}))") for k in RETURN_LAGS),
    *(FeatureDef(f"sma_{k}", f"mean of the last {k} closes") for k in SMA_WINDOWS),
    *(FeatureDef(f"close_sma_{k}", f"close / sma_{k} - 1") for k in SMA_WINDOWS),
    FeatureDef("ema_12", "EMA(close), alpha=2/13, seeded with the segment's first close"),
    FeatureDef("ema_26", "EMA(close), alpha=2/27, seeded with the segment's first close"),
    FeatureDef("macd", "ema_12 - ema_26"),
    FeatureDef("macd_signal", "EMA(macd), alpha=2/10, seeded with the segment's first macd"),
    FeatureDef("macd_hist", "macd - macd_signal"),
    FeatureDef(
        "rsi_14",
        "100 - 100/(1+RS); Wilder means of gains and losses (alpha=1/14) seeded at the "
        "segment's first change; 100 when the mean loss is 0",
    ),
    FeatureDef(
        "bb_pctb_20",
        "(close-low)/(up-low), up/low = sma_20 +- 2*std_pop(last 20 closes); 0.5 if up=low",
    ),
    FeatureDef("bb_width_20", "(up-low)/sma_20"),
    *(
        FeatureDef(f"rv_{k}", f"sample std (ddof=1) of ret_1 over the last {k} bars")
        for k in REALISED_VOL_WINDOWS
    ),
    FeatureDef("taker_buy_ratio", "taker_buy_base / volume; 0.5 when volume is 0"),
    FeatureDef("taker_buy_ratio_ma_10", "mean of the last 10 taker_buy_ratio"),
    FeatureDef("volume_z_60", "(volume - mean_60)/std_60, ddof=1; 0 when std_60 is 0"),
    FeatureDef("log_volume", "ln(1 + volume)"),
    FeatureDef("log_trades", "ln(1 + trades)"),
    FeatureDef("hl_range", "(high - low) / close"),
    FeatureDef("minute_sin", "sin(2 pi minute_of_day / 1440), minute_of_day in UTC"),
    FeatureDef("minute_cos", "cos(2 pi minute_of_day / 1440)"),
    FeatureDef("dow_sin", "sin(2 pi dow / 7), dow = ISO weekday - 1 (Monday = 0), UTC"),
    FeatureDef("dow_cos", "cos(2 pi dow / 7)"),
)


def target_close_column(horizon_bars: int) -> str:
    """Silver's column of the close `horizon_bars` minutes later."""
    return f"target_close_{horizon_bars}"


def target_ret_column(horizon_bars: int) -> str:
    """Silver's column of the forward log return over `horizon_bars` minutes."""
    return f"target_ret_{horizon_bars}"


def target_up_column(horizon_bars: int) -> str:
    """Silver's column of the 1/0 up label over `horizon_bars` minutes."""
    return f"target_up_{horizon_bars}"


def _targets_at(h: int) -> tuple[FeatureDef, ...]:
    return (
        FeatureDef(
            target_close_column(h),
            f"close {h} minutes later, null unless that bar is in the segment",
        ),
        FeatureDef(target_ret_column(h), f"ln({target_close_column(h)} / close)"),
        FeatureDef(
            target_up_column(h),
            f"1 if {target_close_column(h)} > close else 0 (null with the target)",
        ),
    )


# Per horizon, in TARGET_HORIZONS_BARS order: close, log return, up label.
TARGETS: tuple[FeatureDef, ...] = tuple(
    target for h in TARGET_HORIZONS_BARS for target in _targets_at(h)
)

FEATURE_COLUMNS: tuple[str, ...] = tuple(f.name for f in FEATURES)
TARGET_COLUMNS: tuple[str, ...] = tuple(t.name for t in TARGETS)

# Windows that decide how many past bars a feature reads, and so how much history the online
# engine must hold so that its values equal the offline ones.
LONGEST_WINDOW_BARS = max(
    max(RETURN_LAGS),
    max(SMA_WINDOWS),
    BOLLINGER_WINDOW,
    max(REALISED_VOL_WINDOWS) + 1,
    TAKER_RATIO_MA_WINDOW,
    VOLUME_Z_WINDOW,
)


def spec_document() -> dict[str, object]:
    """The canonical description of the spec that its hash is taken over."""
    return {
        "version": SPEC_VERSION,
        "warmup_bars": WARMUP_BARS,
        "horizon_bars": HORIZON_BARS,
        "target_horizons_bars": list(TARGET_HORIZONS_BARS),
        "features": [asdict(f) for f in FEATURES],
        "targets": [asdict(t) for t in TARGETS],
    }


def spec_hash() -> str:
    """sha256 (hex, first 16 digits) of the canonical JSON of the definitions."""
    canonical = json.dumps(spec_document(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
