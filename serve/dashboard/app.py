"""The operators' and quants' dashboard: a thin Streamlit page over the `serve.dashboard` modules
(`client` for the signal API, `silver` for bars, `runs` for tune runs, `figures` for charts).

Run it next to a signal service (DESIGN.md §5)::

    QUANT_AI_CLIENT_ID=dev QUANT_AI_CLIENT_SECRET=... \\
        streamlit run serve/dashboard/app.py -- --api http://127.0.0.1:8000 --lake lake --runs runs

Settings: `--api` (or QUANT_AI_API_URL), `--lake` (QUANT_AI_LAKE), `--runs` (QUANT_AI_RUNS),
`--symbol`, `--hours`; credentials from QUANT_AI_CLIENT_ID / QUANT_AI_CLIENT_SECRET (exchanged at
POST /token for a `signals:read` token) or a ready token in QUANT_AI_TOKEN, or typed into the
sidebar. Shows the latest signal and serving model, the chosen symbol's last N hours of Silver
bars with SMA/EMA/Bollinger, RSI and MACD and the served BUY/SELL signals coloured by realised
outcome, the newest (or chosen) tune run's best trial against the sweep's own buy-and-hold
reference with its walk-forward folds, and its leaderboard.
Every failure is shown as a readable message, never a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import polars as pl
import streamlit as st

from models.evaluation import equity_curve
from models.report import curve_summary
from models.runs import BUY_AND_HOLD, RunDir, TrialRecord
from serve.dashboard import figures
from serve.dashboard import runs as dr
from serve.dashboard import silver as ds
from serve.dashboard.client import SignalApiClient, SignalApiError, outcome_counts, signals_frame
from serve.dashboard.settings import DashboardSettings, parse_settings

log = logging.getLogger("quant_ai.dashboard")
T = TypeVar("T")
HORIZON_MINUTES = 10
MAX_HISTORY = 1000  # the API's cap on /signals/history?limit=


def show_error(where: str, error: BaseException) -> None:
    """A readable message in the page for a failed section; details go to the server log."""
    if isinstance(error, SignalApiError):
        st.error(f"{where}: {error.message}")
    elif isinstance(error, FileNotFoundError | ValueError | OSError | KeyError):
        st.error(f"{where}: {error}")
    else:
        log.exception("%s failed", where)
        st.error(f"{where} failed ({type(error).__name__}: {error}); see the dashboard log.")


@st.cache_data(ttl=30, show_spinner=False)
def cached_silver_window(lake: str, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    return ds.load_silver_window(lake, symbol, start, end)


@st.cache_data(ttl=30, show_spinner=False)
def cached_latest_bar(lake: str, symbol: str) -> datetime | None:
    return ds.latest_silver_time(lake, symbol)


@st.cache_data(ttl=60, show_spinner=False)
def cached_run(path: str, mtime: float) -> dr.RunData:
    del mtime  # part of the cache key only: a rewritten leaderboard reloads the run
    return dr.load_run(path)


class Session:
    """The API client of this page view, logging in (again) when a token is missing or stale."""

    def __init__(self, api_url: str, client_id: str, secret: str, manual_token: str) -> None:
        self.client_id = client_id
        self.secret = secret
        key = f"{api_url}|{client_id}|{bool(manual_token)}"
        if st.session_state.get("auth_key") != key:
            st.session_state["auth_key"] = key
            st.session_state["token"] = manual_token or None
        self.client = SignalApiClient(api_url, token=st.session_state.get("token"))

    def ensure_login(self, force: bool = False) -> None:
        if self.client.token and not force:
            return
        if not (self.client_id and self.secret):
            raise SignalApiError(
                None,
                "not_logged_in",
                "enter a client id and secret (or a token) in the sidebar, or set "
                "QUANT_AI_CLIENT_ID / QUANT_AI_CLIENT_SECRET",
            )
        st.session_state["token"] = self.client.login(self.client_id, self.secret)

    def call(self, fetch: Callable[[SignalApiClient], T]) -> T:
        """`fetch(client)`, logging in first; on a 401 with credentials at hand, once more."""
        self.ensure_login()
        try:
            return fetch(self.client)
        except SignalApiError as error:
            if error.status != 401 or not (self.client_id and self.secret):
                raise
        self.ensure_login(force=True)
        return fetch(self.client)


@dataclass(frozen=True)
class Inputs:
    """What the sidebar's connection and data fields hold on this run of the script."""

    api_url: str
    client_id: str
    secret: str
    token: str
    relogin: bool
    lake: str
    runs: str


def sidebar(settings: DashboardSettings) -> Inputs:
    bar = st.sidebar
    bar.header("Signal API")
    api_url = bar.text_input("API URL", settings.api_url).strip().rstrip("/")
    client_id = bar.text_input("Client id", settings.client_id).strip()
    secret = bar.text_input("Client secret", settings.client_secret, type="password")
    token = bar.text_input("…or bearer token", settings.token, type="password").strip()
    relogin = bar.button("Log in again")
    bar.header("Data")
    lake = bar.text_input("Lake (Silver under <lake>/silver)", settings.lake).strip()
    runs = bar.text_input("Tune runs directory", settings.runs).strip()
    return Inputs(api_url, client_id, secret, token, relogin, lake, runs)


def latest_signal_section(session: Session, symbol: str) -> None:
    st.subheader(f"Latest signal · {symbol}")
    try:
        signal = session.call(lambda c: c.signal(symbol))
    except Exception as error:
        show_error("Latest signal", error)
        return
    columns = st.columns(6)
    columns[0].metric(f"Signal {symbol}", str(signal.get("signal")))
    columns[1].metric("Confidence", _fmt(signal.get("confidence"), "{:.3f}"))
    columns[2].metric("P(up)", _fmt(signal.get("p_up"), "{:.3f}"))
    predicted = signal.get("predicted_return")
    columns[3].metric(
        f"Predicted {signal.get('horizon_minutes', HORIZON_MINUTES)}-min return",
        _fmt(None if predicted is None else (math.exp(predicted) - 1) * 1e4, "{:+.1f} bps"),
    )
    columns[4].metric("Predicted close", _fmt(signal.get("predicted_close"), "{:,.2f}"))
    columns[5].metric("Close", _fmt(signal.get("close"), "{:,.2f}"))
    reason = signal.get("reason")
    st.caption(
        f"As of {signal.get('as_of')} (bar close, UTC) · model {signal.get('model_version')} · "
        f"feature spec {str(signal.get('feature_spec_hash', ''))[:12]}"
        + (f" · {reason}" if reason else "")
    )


def model_section(model: dict[str, Any]) -> None:
    st.subheader("Serving model")
    metrics = model.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    columns = st.columns(4)
    columns[0].metric("Model version", str(model.get("version")))
    columns[1].metric("Family", str(model.get("family")))
    columns[2].metric("Window (1-min bars)", str(model.get("window_bars")))
    columns[3].metric("Walk-forward score (Sharpe)", _fmt(metrics.get("score"), "{:.3f}"))
    st.caption(
        f"Trained on {_ms_range(model.get('training_data_range'))} · "
        f"loaded {_ms_text(model.get('loaded_at_ms'))} · reloads {model.get('reloads')}"
    )


def market_section(
    session: Session | None, lake: str, symbol: str, hours: float, end_mode: ds.WindowEnd
) -> None:
    history: list[dict[str, Any]] = []
    if session is not None:
        limit = min(MAX_HISTORY, math.ceil(hours * 60) + HORIZON_MINUTES)
        try:
            history = session.call(lambda c: c.history(symbol, limit))
        except Exception as error:
            show_error("Signal history", error)
    signals = signals_frame(history)
    latest_signal = signals["time"].max() if signals.height else None
    latest_bar: datetime | None = None
    try:
        latest_bar = cached_latest_bar(lake, symbol)
    except Exception as error:
        show_error("Silver", error)
    start, end = ds.chart_window(
        hours,
        end_mode,
        latest_bar,
        latest_signal if isinstance(latest_signal, datetime) else None,
    )
    bars = pl.DataFrame()
    if latest_bar is not None:
        try:
            bars = cached_silver_window(lake, symbol, start, end)
        except Exception as error:
            show_error("Silver bars", error)
    shown = signals.filter(pl.col("time").is_between(start, end)) if signals.height else signals
    st.subheader(f"{symbol} · {hours:g} h to {end:%Y-%m-%d %H:%M} UTC")
    counts = outcome_counts(shown)
    scored = counts["hit"] + counts["miss"]
    rate = f"{counts['hit'] / scored:.1%}" if scored else "n/a"
    neutral = shown.height - sum(counts.values())
    st.caption(
        f"{bars.height} bars from Silver · {shown.height} served signals: "
        f"{counts['hit']} hit, {counts['miss']} miss, {counts['pending']} pending "
        f"(hit rate {rate}), {neutral} NEUTRAL. "
        "Markers at the decision bar's close: ▲ BUY, ▼ SELL; green hit, red miss, grey pending."
    )
    st.plotly_chart(figures.market_figure(bars, shown, symbol), width="stretch")


def backtest_section(runs: str) -> None:
    st.subheader("Backtest: best trial vs buy-and-hold")
    run_dirs = dr.find_run_dirs(runs)
    if not run_dirs:
        st.info(f"No tune runs with a leaderboard under {runs!r} (run `python -m jobs.tune`).")
        return
    chosen = st.sidebar.selectbox(
        "Tune run (newest first)", run_dirs, format_func=lambda p: Path(p).name
    )
    path = Path(chosen or run_dirs[0])
    mtime = RunDir(path).leaderboard_mtime()
    try:
        run = cached_run(str(path), mtime)
    except Exception as error:
        show_error(f"Tune run {path.name}", error)
        return
    for note in run.notes:
        st.caption(note)
    if run.best is not None:
        best_section(run.best, run.buy_and_hold)
    st.subheader(f"Leaderboard · {path.name}")
    st.dataframe(dr.leaderboard_view(run.leaderboard), hide_index=True)
    if run.report is not None:
        st.caption(f"Full robustness report: {run.report}")


def best_section(record: TrialRecord, hold: TrialRecord | None) -> None:
    """The best trial's equity against the sweep's stored buy-and-hold reference (when the run
    has one), and its walk-forward folds."""
    best = record.evaluation
    curves = {best.name: equity_curve(best)}
    if hold is not None:
        curves[BUY_AND_HOLD] = equity_curve(hold.evaluation)
    else:
        st.info(
            "This run predates stored reference records, so no buy-and-hold is drawn; "
            "a new sweep stores the one it scored."
        )
    missing_folds = dr.missing_folds_message(record)
    if missing_folds is not None:
        st.warning(missing_folds)
    summary = curve_summary(curves[best.name])
    columns = st.columns(5)
    columns[0].metric("Best trial", best.name)
    columns[1].metric("Score (mean fold Sharpe)", _fmt(best.metrics.get("score"), "{:.3f}"))
    columns[2].metric("Total return", _fmt(summary["total_return"], "{:+.2%}"))
    columns[3].metric("Max drawdown", _fmt(summary["max_drawdown"], "{:.2%}"))
    if BUY_AND_HOLD in curves:
        hold_return = curve_summary(curves[BUY_AND_HOLD])["total_return"]
        columns[4].metric("Buy-and-hold return", _fmt(hold_return, "{:+.2%}"))
    st.plotly_chart(figures.backtest_figure(curves), width="stretch")
    st.caption(
        "Out-of-sample walk-forward record after fees; score = mean fold net Sharpe, "
        "annualised from 1-minute bars. Buy-and-hold is the sweep's own reference: the same "
        "folds, test minutes, fees and symbols (equal weight) as the trials."
    )
    if record.folds:  # None: recorded before folds were; empty: a CPCV record (paths, no folds)
        st.markdown("**Walk-forward folds** (UTC; each range is [start, end) of bar open times)")
        st.dataframe(dr.folds_view(record.folds, best.fold_metrics), hide_index=True)


def connect(session: Session, relogin: bool) -> tuple[bool, dict[str, Any]]:
    """Log in and read /models/current: (whether the API is usable, the model). Not usable
    when it is unreachable or refuses the credentials, so later sections skip it instead of
    repeating the error."""
    try:
        if relogin:
            session.ensure_login(force=True)
        return True, session.call(lambda c: c.current_model())
    except SignalApiError as error:
        show_error("Connecting", error)
        return error.status is not None and error.status not in (401, 403), {}
    except Exception as error:
        show_error("Connecting", error)
        return False, {}


def main() -> None:
    st.set_page_config(page_title="Quant-AI dashboard", page_icon="📈", layout="wide")
    settings = parse_settings(sys.argv[1:], os.environ)
    inputs = sidebar(settings)
    st.title("Quant-AI signal dashboard")
    st.caption(f"API {inputs.api_url} · Silver {inputs.lake}/silver · runs {inputs.runs}")
    session = Session(inputs.api_url, inputs.client_id, inputs.secret, inputs.token)
    try:
        usable, model = connect(session, inputs.relogin)
        page(settings, inputs, session if usable else None, model)
    finally:
        session.client.close()


def page(
    settings: DashboardSettings,
    inputs: Inputs,
    session: Session | None,
    model: dict[str, Any],
) -> None:
    """Everything below the title: symbol and window choice, then the sections."""
    served = [str(s) for s in model.get("symbols") or []]
    symbols = list(dict.fromkeys(served + ds.silver_symbols(inputs.lake)))
    st.sidebar.header("Chart")
    if not symbols:
        st.warning("No symbols: the API serves none and Silver has none.")
        backtest_section(inputs.runs)
        return
    default = symbols.index(settings.symbol) if settings.symbol in symbols else 0
    symbol = str(st.sidebar.selectbox("Symbol", symbols, index=default))
    hours = float(st.sidebar.slider("Hours shown", 1.0, 48.0, min(48.0, settings.hours), step=1.0))
    ends = st.sidebar.radio("Window ends at", ["latest signal", "latest Silver bar"])
    end_mode: ds.WindowEnd = "latest Silver bar" if ends == "latest Silver bar" else "latest signal"
    if st.sidebar.button("Refresh"):
        st.cache_data.clear()

    if session is not None:
        latest_signal_section(session, symbol)
    if model:
        model_section(model)
    market_section(session, inputs.lake, symbol, hours, end_mode)
    backtest_section(inputs.runs)


def _fmt(value: object, pattern: str) -> str:
    """`value` formatted with `pattern` when it is a finite number, "—" when missing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—" if value is None or isinstance(value, bool) else str(value)
    return pattern.format(value) if math.isfinite(value) else "—"


def _ms_text(value: object) -> str:
    if not isinstance(value, int | float):
        return "—"
    return pd.Timestamp(int(value), unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M UTC")


def _ms_range(value: object) -> str:
    if not isinstance(value, dict):
        return "—"
    return f"{_ms_text(value.get('start_ms'))} to {_ms_text(value.get('end_ms'))}"


main()
