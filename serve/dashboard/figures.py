"""The dashboard's Plotly figures: the market chart and the backtest of a tune run.

`market_figure` draws one symbol's Silver bars (candlesticks with SMA/EMA/Bollinger overlays,
RSI and MACD panels) with the served BUY/SELL signals coloured by realised outcome.
`backtest_figure` draws equity and drawdown curves with the HTML report's line traces
(`models.report.curve_traces`), so a curve looks the same in both.

Units: times are UTC bar open times; prices are in the quote currency; equity is a multiple of
the starting capital; drawdown is a fraction of the running peak.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Final

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from models.report import curve_traces, downsample_minmax, drawdown
from serve.dashboard.client import OUTCOMES, SCORED_SIGNALS

# Plotly's default candlestick colours, with solid bodies (Plotly's default bodies are
# half-transparent), so they are recognisable pixel for pixel in a screenshot.
INCREASING_COLOUR: Final = "#3D9970"
DECREASING_COLOUR: Final = "#FF4136"
OUTCOME_COLOURS: Final[Mapping[str, str]] = dict(
    zip(OUTCOMES, ("#1a9850", "#d73027", "#969696"), strict=True)
)
SIGNAL_MARKERS: Final[Mapping[str, str]] = dict(
    zip(SCORED_SIGNALS, ("triangle-up", "triangle-down"), strict=True)
)
# The line traces of the market chart: feature column, legend label, colour, panel row
# (1: price overlays, 2: RSI, 3: MACD, drawn over the MACD histogram bars).
_LINES: Final[tuple[tuple[str, str, str, int], ...]] = (
    ("sma_5", "SMA 5", "#ff7f0e", 1),
    ("sma_10", "SMA 10", "#bcbd22", 1),
    ("sma_20", "SMA 20", "#1f77b4", 1),
    ("ema_12", "EMA 12", "#9467bd", 1),
    ("ema_26", "EMA 26", "#8c564b", 1),
    ("rsi_14", "RSI 14", "#6a3d9a", 2),
    ("macd", "MACD", "#1f77b4", 3),
    ("macd_signal", "MACD signal", "#ff7f0e", 3),
)
_BAND_COLOUR: Final = "#7f7f7f"


def _plot_times(values: pl.Series) -> list[datetime]:
    """UTC timestamps as naive datetimes (Plotly date axes have no time zones; axes say UTC)."""
    return values.dt.convert_time_zone("UTC").dt.replace_time_zone(None).to_list()


def market_figure(
    bars: pl.DataFrame, signals: pl.DataFrame, symbol: str, height_px: int = 900
) -> go.Figure:
    """Candlesticks with SMA/EMA/Bollinger overlays, an RSI panel and a MACD panel.

    `bars`: a `load_silver_window` frame. `signals`: a `signals_frame`; each BUY (triangle up)
    or SELL (triangle down) is drawn at its decision bar's open time and close, coloured by
    outcome (OUTCOME_COLOURS: hit, miss, pending), one legend entry per signal and outcome.
    """
    figure = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        row_heights=[0.6, 0.2, 0.2],
        subplot_titles=(f"{symbol} 1-minute bars", "RSI 14", "MACD 12/26/9"),
    )
    times = _plot_times(bars["open_time"]) if bars.height else []

    def series(name: str) -> list[float | None]:
        return bars[name].to_list() if name in bars.columns else []

    if bars.height:
        figure.add_trace(
            go.Scatter(
                x=times,
                y=series("bb_upper_20"),
                mode="lines",
                name="Bollinger 20, 2 sd",
                legendgroup="bollinger",
                line={"color": _BAND_COLOUR, "width": 1, "dash": "dot"},
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=times,
                y=series("bb_lower_20"),
                mode="lines",
                name="Bollinger lower",
                legendgroup="bollinger",
                showlegend=False,
                line={"color": _BAND_COLOUR, "width": 1, "dash": "dot"},
                fill="tonexty",
                fillcolor="rgba(127,127,127,0.08)",
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Candlestick(
                x=times,
                open=series("open"),
                high=series("high"),
                low=series("low"),
                close=series("close"),
                name="OHLC",
                increasing={
                    "line": {"color": INCREASING_COLOUR, "width": 1},
                    "fillcolor": INCREASING_COLOUR,
                },
                decreasing={
                    "line": {"color": DECREASING_COLOUR, "width": 1},
                    "fillcolor": DECREASING_COLOUR,
                },
            ),
            row=1,
            col=1,
        )
        # The histogram first, so that the MACD lines are drawn over its bars.
        hist = np.asarray(bars["macd_hist"].fill_null(np.nan).to_numpy(), dtype=np.float64)
        figure.add_trace(
            go.Bar(
                x=times,
                y=series("macd_hist"),
                name="MACD histogram",
                marker={
                    "color": np.where(hist >= 0, INCREASING_COLOUR, DECREASING_COLOUR).tolist(),
                    "opacity": 0.6,
                },
            ),
            row=3,
            col=1,
        )
        for column, label, colour, row in _LINES:
            figure.add_trace(
                go.Scatter(
                    x=times,
                    y=series(column),
                    mode="lines",
                    name=label,
                    line={"color": colour, "width": 1.2},
                ),
                row=row,
                col=1,
            )
        for level in (70, 30):
            figure.add_hline(
                y=level, line={"color": "#999999", "width": 1, "dash": "dash"}, row=2, col=1
            )
    for trace in signal_traces(signals):
        figure.add_trace(trace, row=1, col=1)
    figure.update_layout(
        height=height_px,
        margin={"l": 60, "r": 20, "t": 40, "b": 40},
        legend={"orientation": "v", "yanchor": "top", "y": 1.0, "x": 1.01, "xanchor": "left"},
        hovermode="x",
        bargap=0,
        plot_bgcolor="white",
    )
    figure.update_xaxes(rangeslider_visible=False, showgrid=True, gridcolor="#eeeeee")
    figure.update_yaxes(showgrid=True, gridcolor="#eeeeee")
    figure.update_xaxes(title_text="bar open time (UTC)", row=3, col=1)
    figure.update_yaxes(title_text="price", row=1, col=1)
    figure.update_yaxes(range=[0, 100], row=2, col=1)
    if not bars.height and signals.height == 0:
        figure.add_annotation(
            text="no bars or signals in this window",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.8,
        )
    return figure


def signal_traces(signals: pl.DataFrame) -> list[go.Scatter]:
    """One marker trace per (BUY/SELL, outcome) present in a `signals_frame`, in a fixed order;
    every marker of a trace has the outcome's colour (OUTCOME_COLOURS)."""
    traces = []
    for kind, symbol in SIGNAL_MARKERS.items():
        for outcome, colour in OUTCOME_COLOURS.items():
            rows = signals.filter((pl.col("signal") == kind) & (pl.col("outcome") == outcome))
            if rows.height == 0:
                continue
            text = [
                _signal_hover(kind, outcome, confidence, ret)
                for confidence, ret in zip(
                    rows["confidence"].to_list(), rows["realised_return"].to_list(), strict=True
                )
            ]
            traces.append(
                go.Scatter(
                    x=_plot_times(rows["time"]),
                    y=rows["close"].to_list(),
                    mode="markers",
                    name=f"{kind} · {outcome}",
                    legendgroup=f"signal-{outcome}",
                    marker={
                        "symbol": symbol,
                        "size": 12,
                        "color": [colour] * rows.height,
                        "line": {"color": "#222222", "width": 1},
                    },
                    text=text,
                    hovertemplate="%{text}<br>close %{y:.2f}<extra></extra>",
                )
            )
    return traces


def _signal_hover(kind: str, outcome: str, confidence: float | None, realised: float | None) -> str:
    parts = [kind]
    if confidence is not None:
        parts.append(f"confidence {confidence:.2f}")
    if realised is not None:
        parts.append(f"{outcome} ({(math.exp(realised) - 1) * 1e4:+.1f} bps in 10 min)")
    else:
        parts.append(outcome)
    return ", ".join(parts)


def backtest_figure(
    curves: Mapping[str, pd.Series], max_points: int = 2_000, height_px: int = 560
) -> go.Figure:
    """Equity (top, multiple of starting capital) and drawdown (bottom, fraction of the running
    peak, losses pointing down) of each curve, styled as in the HTML report: candidates solid,
    `buy_and_hold` dotted black. Curves are downsampled for plotting with
    `models.report.downsample_minmax` (first, last and every bucket's min and max kept).
    """
    figure = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.65, 0.35],
        subplot_titles=("Equity after costs (x starting capital)", "Drawdown from running peak"),
    )
    shown = {name: curve for name, curve in curves.items() if len(curve)}
    equity = {name: downsample_minmax(curve, max_points) for name, curve in shown.items()}
    falls = {name: downsample_minmax(drawdown(curve), max_points) for name, curve in shown.items()}
    for trace in curve_traces(equity):
        figure.add_trace(trace, row=1, col=1)
    for trace in curve_traces(falls, suffix=" drawdown", showlegend=False):
        figure.add_trace(trace, row=2, col=1)
    figure.update_layout(
        height=height_px,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        hovermode="x unified",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.06, "x": 0},
        plot_bgcolor="white",
    )
    # The traces' x values are epoch milliseconds, which only a date axis reads as times.
    figure.update_xaxes(type="date", showgrid=True, gridcolor="#eeeeee")
    figure.update_yaxes(showgrid=True, gridcolor="#eeeeee")
    figure.update_yaxes(tickformat=".1%", autorange="reversed", row=2, col=1)
    figure.update_xaxes(title_text="bar open time (UTC)", row=2, col=1)
    return figure
