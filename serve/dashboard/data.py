"""Data and figures of the operators' dashboard (`serve/dashboard/app.py`), as small pure functions.

Nothing here runs at import time and nothing here imports Streamlit, so every piece is unit-
testable and reusable from a notebook:

- `SignalApiClient`: the signal API of DESIGN.md §5 over httpx (`POST /token`, `GET /signal`,
  `GET /signals/history`, `GET /models/current`); every failure becomes an `ApiError` whose
  `message` is one readable sentence (never a traceback).
- Silver: `silver_symbols` and `load_silver_window` read `<lake>/silver` (Parquet partitioned
  `symbol=/month=`, written by the Spark ETL or `market.sim_silver`) for one symbol and a time
  range, with polars; Bollinger bands are derived from `sma_20` and `bb_width_20`.
- Tune runs: `find_run_dirs`, `load_run` (leaderboard, best trial's out-of-sample record) and
  `buy_and_hold_curve` (buy-and-hold over the same out-of-sample minutes, scored by the same
  `models.evaluation.evaluate` the sweep's report uses).
- Figures (Plotly): `market_figure` (candlesticks with SMA/EMA/Bollinger overlays, RSI and MACD
  panels, BUY/SELL markers coloured by realised outcome) and `backtest_figure` (equity and
  drawdown of the best trial against buy-and-hold); `leaderboard_view` for the table.

Units: times are UTC (epoch milliseconds where a name ends in `_ms`); prices are in the quote
currency; returns are fractions unless a name ends in `_bps` (basis points, 1e-4); equity is a
multiple of the starting capital; drawdown is a fraction of the running peak; windows are hours
of 1-minute bars.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from configs.schema import BacktestConfig
from market.features.polars_engine import compute_features
from market.features.spec import WARMUP_BARS
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
from market.lake import Lake
from models.dataset import MarketArrays
from models.evaluation import Evaluation, OutOfSampleBars, evaluate, load_record
from models.folds import Fold
from models.report import (
    LEADERBOARD_CSV,
    LEADERBOARD_PARQUET,
    downsample_minmax,
    drawdown,
    sort_leaderboard,
)

DEFAULT_API_URL: Final = "http://127.0.0.1:8000"
DEFAULT_LAKE: Final = "lake"
DEFAULT_RUNS: Final = "runs"
DEFAULT_HOURS: Final = 6.0
READ_SCOPE: Final = "signals:read"

# Trial status of a finished, evaluated trial (models.sweep.COMPLETED; importing models.sweep
# would load torch and Lightning into the dashboard for one string, so the unit tests hold the
# two equal instead).
COMPLETED: Final = "completed"
BUY_AND_HOLD: Final = "buy_and_hold"

# Plotly's default candlestick colours, with solid bodies (Plotly's default bodies are
# half-transparent), so they are recognisable pixel for pixel in a screenshot.
INCREASING_COLOUR: Final = "#3D9970"
DECREASING_COLOUR: Final = "#FF4136"
OUTCOME_COLOURS: Final[Mapping[str, str]] = {
    "hit": "#1a9850",
    "miss": "#d73027",
    "pending": "#969696",
}
SIGNAL_MARKERS: Final[Mapping[str, str]] = {"BUY": "triangle-up", "SELL": "triangle-down"}
_OVERLAYS: Final[tuple[tuple[str, str, str], ...]] = (
    ("sma_5", "SMA 5", "#ff7f0e"),
    ("sma_10", "SMA 10", "#bcbd22"),
    ("sma_20", "SMA 20", "#1f77b4"),
    ("ema_12", "EMA 12", "#9467bd"),
    ("ema_26", "EMA 26", "#8c564b"),
)
_BAND_COLOUR: Final = "#7f7f7f"
_BEST_COLOUR: Final = "#1f77b4"
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
LEADERBOARD_COLUMNS: Final[tuple[str, ...]] = (
    "rank",
    "trial_id",
    "status",
    "score",
    "dsr",
    "sharpe",
    "worst_fold_sharpe",
    "total_return",
    "max_drawdown",
    "signal_hit_rate",
    "directional_accuracy",
    "trades",
    "turnover",
    "exposure",
    "val_loss",
    "family",
    "hidden_size",
    "num_layers",
    "window_bars",
    "learning_rate",
)

Outcome = Literal["hit", "miss", "pending", "none"]
WindowEnd = Literal["latest signal", "latest Silver bar"]


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class DashboardSettings:
    """Start-up settings: command line first, then environment, then defaults.

    `hours` is the width of the market chart's window in hours of 1-minute bars.
    """

    api_url: str = DEFAULT_API_URL
    lake: str = DEFAULT_LAKE
    runs: str = DEFAULT_RUNS
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    symbol: str | None = None
    hours: float = DEFAULT_HOURS


def parse_settings(argv: Sequence[str], env: Mapping[str, str]) -> DashboardSettings:
    """Settings from `argv` (the arguments after `streamlit run serve/dashboard/app.py --`) and
    `env` (QUANT_AI_API_URL, QUANT_AI_CLIENT_ID, QUANT_AI_CLIENT_SECRET, QUANT_AI_TOKEN,
    QUANT_AI_LAKE, QUANT_AI_RUNS). Secrets are read from the environment only, never from the
    command line (where `ps` would show them). Unknown arguments are ignored.
    """
    parser = argparse.ArgumentParser(prog="dashboard", add_help=False)
    parser.add_argument("--api", default=None)
    parser.add_argument("--lake", default=None)
    parser.add_argument("--runs", default=None)
    parser.add_argument("--symbol", default=None)
    parser.add_argument("--hours", type=float, default=None)
    args, _ = parser.parse_known_args(list(argv))
    hours = args.hours if args.hours is not None and args.hours > 0 else DEFAULT_HOURS
    return DashboardSettings(
        api_url=(args.api or env.get("QUANT_AI_API_URL") or DEFAULT_API_URL).rstrip("/"),
        lake=args.lake or env.get("QUANT_AI_LAKE") or DEFAULT_LAKE,
        runs=args.runs or env.get("QUANT_AI_RUNS") or DEFAULT_RUNS,
        client_id=env.get("QUANT_AI_CLIENT_ID", ""),
        client_secret=env.get("QUANT_AI_CLIENT_SECRET", ""),
        token=env.get("QUANT_AI_TOKEN", ""),
        symbol=args.symbol,
        hours=hours,
    )


# --------------------------------------------------------------------------------------------
# The signal API


class ApiError(Exception):
    """A failed call to the signal API: `status` (None when no HTTP answer came), the API's
    error `code` and `detail`, and `retry_after_s` (seconds) on a 429."""

    def __init__(
        self, status: int | None, code: str, detail: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        """One readable sentence for the dashboard: what failed and what to do about it."""
        hints = {
            401: "log in again (the token is missing, expired or was not issued by this service)",
            403: f"this client lacks the `{READ_SCOPE}` scope",
            404: "pick another symbol",
            422: "the request was malformed",
            503: "the service is not ready yet; it recovers on its own once a model and fresh "
            "bars are in",
        }
        if self.status is None:
            return f"Signal API unavailable ({self.code}): {self.detail}"
        hint = hints.get(self.status, "")
        if self.code == "invalid_client":
            hint = "check the client id and secret"
        if self.status == 429:
            wait = f" in {self.retry_after_s:.0f} s" if self.retry_after_s is not None else ""
            hint = f"rate limited; try again{wait}"
        text = f"Signal API answered {self.status} {self.code}: {self.detail}"
        return f"{text} — {hint}." if hint else f"{text}."

    def __str__(self) -> str:
        return self.message


class SignalApiClient:
    """A small synchronous client of the signal API; `timeout_s` bounds every call (seconds).

    `transport` lets tests answer without a server (httpx.MockTransport).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)

    def __enter__(self) -> SignalApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def login(self, client_id: str, client_secret: str, scope: str = READ_SCOPE) -> str:
        """POST /token (OAuth2 client credentials); keeps and returns the bearer token."""
        if not client_id or not client_secret:
            raise ApiError(None, "no_credentials", "a client id and a client secret are needed")
        body = self._call(
            "POST",
            "/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": client_secret,
                "scope": scope,
            },
        )
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(200, "bad_response", "POST /token answered without an access_token")
        self.token = token
        return token

    def signal(self, symbol: str) -> dict[str, Any]:
        """GET /signal: the latest signal of `symbol`."""
        return self._object("/signal", {"symbol": symbol})

    def history(self, symbol: str | None, limit: int = 500) -> list[dict[str, Any]]:
        """GET /signals/history: served signals with outcomes, newest first (at most `limit`)."""
        params: dict[str, Any] = {"limit": limit}
        if symbol:
            params["symbol"] = symbol
        rows = self._object("/signals/history", params).get("signals")
        if not isinstance(rows, list):
            raise ApiError(200, "bad_response", "/signals/history answered without `signals`")
        return [row for row in rows if isinstance(row, dict)]

    def current_model(self) -> dict[str, Any]:
        """GET /models/current: version, metrics and data range of the serving model."""
        return self._object("/models/current", None)

    def _object(self, path: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        if not self.token:
            raise ApiError(None, "not_logged_in", "log in first (client id and secret, or token)")
        body = self._call(
            "GET", path, params=params, headers={"Authorization": f"Bearer {self.token}"}
        )
        if not isinstance(body, dict):
            raise ApiError(200, "bad_response", f"{path} did not answer with a JSON object")
        return body

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(
                None, "timeout", f"{self.base_url}{path} gave no answer within {self.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as error:
            raise ApiError(
                None,
                "unreachable",
                f"cannot reach {self.base_url} ({type(error).__name__}: {error})",
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            code, detail = "http_error", response.text[:300] or response.reason_phrase
            if isinstance(body, dict):
                code = str(body.get("error") or code)
                detail = str(body.get("detail") or detail)
            retry = response.headers.get("retry-after")
            retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
            raise ApiError(response.status_code, code, detail, retry_after)
        if body is None:
            raise ApiError(response.status_code, "bad_response", f"{path} did not answer JSON")
        return body


def signal_outcome(record: Mapping[str, Any]) -> Outcome:
    """The realised outcome of a served signal (a /signals/history item).

    `none` for NEUTRAL (no position, nothing to score), `pending` until bar t+10 is in and the
    outcome filled, then `hit` or `miss` (the Gold store's `hit`).
    """
    if record.get("signal") not in SIGNAL_MARKERS:
        return "none"
    if record.get("filled_at_ms") is None or record.get("hit") is None:
        return "pending"
    return "hit" if bool(record["hit"]) else "miss"


def signals_frame(history: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """/signals/history items as a frame, oldest first: `time` (the decision bar's open time,
    UTC), signal, confidence, p_up, close, realised_return, pnl_bps and `outcome`."""
    schema: dict[str, Any] = {
        "time": pl.Datetime("ms", "UTC"),
        "symbol": pl.String,
        "signal": pl.String,
        "confidence": pl.Float64,
        "p_up": pl.Float64,
        "close": pl.Float64,
        "realised_return": pl.Float64,
        "pnl_bps": pl.Float64,
        "model_version": pl.String,
        "outcome": pl.String,
    }
    rows = [
        {
            "time": datetime.fromtimestamp(int(item["bar_open_time_ms"]) / 1000, tz=UTC),
            "symbol": item.get("symbol"),
            "signal": item.get("signal"),
            "confidence": _float_or_none(item.get("confidence")),
            "p_up": _float_or_none(item.get("p_up")),
            "close": _float_or_none(item.get("close")),
            "realised_return": _float_or_none(item.get("realised_return")),
            "pnl_bps": _float_or_none(item.get("pnl_bps")),
            "model_version": item.get("model_version"),
            "outcome": signal_outcome(item),
        }
        for item in history
        if item.get("bar_open_time_ms") is not None
    ]
    return pl.DataFrame(rows, schema=schema).sort("time")


def outcome_counts(signals: pl.DataFrame) -> dict[str, int]:
    """Number of BUY/SELL signals per outcome (hit, miss, pending) in a `signals_frame`."""
    counts = {name: 0 for name in OUTCOME_COLOURS}
    for name, count in signals.group_by("outcome").len().iter_rows():
        if name in counts:
            counts[name] = int(count)
    return counts


def _float_or_none(value: object) -> float | None:
    """A finite float, or None for anything else (missing, NaN, text, booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Silver


def _silver_root(lake: str | Path) -> str:
    return Lake.at(lake).silver_location


def _silver_scan(lake: str | Path) -> pl.LazyFrame:
    """A lazy scan of every Silver Parquet file, with the symbol/month partition columns."""
    root = _silver_root(lake)
    if "://" not in root and not Path(root).is_dir():
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
    root = Path(_silver_root(lake))
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


# --------------------------------------------------------------------------------------------
# Tune runs


@dataclass(frozen=True)
class RunData:
    """What the dashboard shows of one tune run directory.

    `leaderboard`: every trial, sorted by score (mean fold net Sharpe, annualised) descending.
    `best`: the out-of-sample track record of the best completed trial that left a record
    (per-bar net simple returns on the portfolio timeline), None when none did.
    `notes`: readable remarks about what is missing.
    """

    path: Path
    leaderboard: pd.DataFrame
    best: Evaluation | None
    report: Path | None
    notes: tuple[str, ...] = ()


def _has_leaderboard(directory: Path) -> bool:
    return (directory / LEADERBOARD_PARQUET).is_file() or (directory / LEADERBOARD_CSV).is_file()


def run_mtime(directory: Path) -> float:
    files = [directory / LEADERBOARD_PARQUET, directory / LEADERBOARD_CSV]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def find_run_dirs(runs: str | Path) -> list[Path]:
    """Tune run directories under `runs` (each with a leaderboard), newest first.

    `runs` may itself be a run directory. Newest means the most recently written leaderboard;
    ties go by name, descending (`tune-<UTC time>` names sort in time order).
    """
    root = Path(runs)
    if not root.is_dir():
        return []
    if _has_leaderboard(root):
        return [root]
    found = [p for p in root.iterdir() if p.is_dir() and _has_leaderboard(p)]
    return sorted(found, key=lambda p: (run_mtime(p), p.name), reverse=True)


def read_leaderboard(run_dir: Path) -> pd.DataFrame:
    """The run's leaderboard (Parquet, else CSV), sorted by score descending, NaN last."""
    parquet, csv = run_dir / LEADERBOARD_PARQUET, run_dir / LEADERBOARD_CSV
    if parquet.is_file():
        board = pd.read_parquet(parquet)
    elif csv.is_file():
        board = pd.read_csv(csv)
    else:
        raise FileNotFoundError(f"{run_dir} has no {LEADERBOARD_PARQUET} or {LEADERBOARD_CSV}")
    if "trial_id" in board.columns:
        board["trial_id"] = board["trial_id"].astype(str)
    return sort_leaderboard(board)


def load_trial_record(trial_dir: Path, name: str) -> Evaluation:
    """A trial's out-of-sample record as the sweep saved it (`models.evaluation.save_record`)."""
    return load_record(trial_dir, name)


def load_run(run_dir: str | Path) -> RunData:
    """Leaderboard, best completed trial's record and report path of a tune run directory."""
    path = Path(run_dir)
    board = read_leaderboard(path)
    notes: list[str] = []
    best: Evaluation | None = None
    if "trial_id" not in board.columns:
        notes.append("the leaderboard has no trial_id column")
    else:
        statuses = board["status"].astype(str) if "status" in board.columns else None
        for position, trial_id in enumerate(board["trial_id"]):
            if statuses is not None and statuses.iloc[position] != COMPLETED:
                continue
            trial_dir = path / "trials" / str(trial_id)
            if (trial_dir / "record.npz").is_file() and (trial_dir / "evaluation.json").is_file():
                best = load_trial_record(trial_dir, str(trial_id))
                break
            notes.append(f"trial {trial_id} has no record.npz/evaluation.json")
        if best is None:
            notes.append("no completed trial left an out-of-sample record")
    report = path / "report.html"
    return RunData(
        path=path,
        leaderboard=board,
        best=best,
        report=report if report.is_file() else None,
        notes=tuple(notes),
    )


def equity_curve(evaluation: Evaluation) -> pd.Series:
    """Equity (multiple of starting capital) of a record, cumprod(1 + returns), indexed by UTC
    bar open time: the same curve `models.selection` draws in the HTML report."""
    index = pd.to_datetime(evaluation.open_time_ms, unit="ms", utc=True)
    return pd.Series(
        np.cumprod(1.0 + np.asarray(evaluation.returns, dtype=np.float64)),
        index=index,
        name=evaluation.name,
    )


def _folds_of(evaluation: Evaluation) -> list[Fold]:
    """The walk-forward folds of a record, from its per-fold metrics (test ranges are what
    scoring needs; validation ranges are not recorded and are filled in as empty)."""
    folds = []
    for row in evaluation.fold_metrics:
        train_end = int(row.get("train_end_ms", row["test_start_ms"]))
        folds.append(
            Fold(
                index=int(row["fold"]),
                train_start_ms=int(row.get("train_start_ms", train_end)),
                train_end_ms=train_end,
                val_start_ms=train_end,
                val_end_ms=train_end,
                test_start_ms=int(row["test_start_ms"]),
                test_end_ms=int(row["test_end_ms"]),
            )
        )
    if not folds and len(evaluation.open_time_ms):
        first, last = int(evaluation.open_time_ms[0]), int(evaluation.open_time_ms[-1])
        folds.append(Fold(0, first, first, first, first, first, last + ONE_MINUTE_MS))
    return folds


def price_arrays(prices: pl.DataFrame) -> MarketArrays:
    """MarketArrays with prices only (symbol, open_time, open, close) for scoring buy-and-hold:
    no model inputs, targets NaN; segments break at a missing minute or a new symbol."""
    frame = prices.sort("symbol", "open_time")
    symbol_col = frame["symbol"].to_numpy().astype(str)
    symbols = tuple(sorted(set(symbol_col.tolist())))
    code = np.searchsorted(np.array(symbols), symbol_col).astype(np.int32)
    open_time = frame["open_time"].dt.epoch("ms").to_numpy().astype(np.int64)
    step = np.diff(open_time, prepend=open_time[:1] - 2 * ONE_MINUTE_MS)
    new_segment = (step != ONE_MINUTE_MS) | (np.diff(code, prepend=-1) != 0)
    n = frame.height
    return MarketArrays(
        symbols=symbols,
        symbol_index=code,
        open_time_ms=open_time,
        open=frame["open"].cast(pl.Float64).to_numpy(),
        close=frame["close"].cast(pl.Float64).to_numpy(),
        inputs=np.empty((n, 0), dtype=np.float32),
        target_ret=np.full(n, np.nan, dtype=np.float32),
        target_up=np.full(n, np.nan, dtype=np.float32),
        segment=np.cumsum(new_segment).astype(np.int64) - 1,
        valid_run=np.zeros(n, dtype=np.int64),
    )


def buy_and_hold_curve(
    lake: str | Path,
    evaluation: Evaluation,
    symbols: Sequence[str] | None = None,
    config: BacktestConfig | None = None,
) -> pd.Series:
    """Buy-and-hold equity over the out-of-sample minutes of `evaluation`, from Silver.

    Scored exactly as the sweep scores its buy-and-hold reference (`models.evaluation.evaluate`
    with no predictions: long from the first to the last open of every test block, fees both
    ways, equal-weight sleeves per symbol) over the record's fold test ranges, for `symbols`
    (default: every Silver symbol with bars there; the run directory does not record which
    symbols the sweep traded). `config` defaults to BacktestConfig() (10 bps taker fee a side).
    Raises ValueError when Silver has no bars in the range.
    """
    folds = _folds_of(evaluation)
    if not folds:
        raise ValueError(f"{evaluation.name} has an empty track record")
    start_ms = min(f.test_start_ms for f in folds)
    end_ms = max(f.test_end_ms for f in folds)
    start = datetime.fromtimestamp(start_ms / 1000, tz=UTC)
    end = datetime.fromtimestamp(end_ms / 1000, tz=UTC)
    scan = _utc_open_time(_silver_scan(lake))
    if symbols:
        scan = scan.filter(pl.col("symbol").is_in(list(symbols)))
    if "month" in scan.collect_schema().names():
        scan = scan.filter(pl.col("month").is_in(_months_between(start, end)))
    prices = (
        scan.filter((pl.col("open_time") >= start) & (pl.col("open_time") < end))
        .select("symbol", "open_time", "open", "close")
        .collect()
    )
    if prices.height == 0:
        raise ValueError(
            f"Silver has no bars between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC, "
            "the run's out-of-sample range"
        )
    arrays = price_arrays(prices)
    test = OutOfSampleBars.of(arrays, folds)
    reference = evaluate(BUY_AND_HOLD, arrays, folds, test, config or BacktestConfig(), None, None)
    return equity_curve(reference)


# --------------------------------------------------------------------------------------------
# Figures


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
        for column, label, colour in _OVERLAYS:
            figure.add_trace(
                go.Scatter(
                    x=times,
                    y=series(column),
                    mode="lines",
                    name=label,
                    line={"color": colour, "width": 1.2},
                ),
                row=1,
                col=1,
            )
        figure.add_trace(
            go.Scatter(
                x=times,
                y=series("rsi_14"),
                mode="lines",
                name="RSI 14",
                line={"color": "#6a3d9a", "width": 1.2},
            ),
            row=2,
            col=1,
        )
        for level in (70, 30):
            figure.add_hline(
                y=level, line={"color": "#999999", "width": 1, "dash": "dash"}, row=2, col=1
            )
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
        figure.add_trace(
            go.Scatter(
                x=times,
                y=series("macd"),
                mode="lines",
                name="MACD",
                line={"color": "#1f77b4", "width": 1.2},
            ),
            row=3,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=times,
                y=series("macd_signal"),
                mode="lines",
                name="MACD signal",
                line={"color": "#ff7f0e", "width": 1.2},
            ),
            row=3,
            col=1,
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
    peak, losses pointing down) of each curve; `buy_and_hold` drawn dotted black, others solid.

    Curves are downsampled for plotting with `models.report.downsample_minmax` (first, last and
    every bucket's min and max kept), as in the HTML report.
    """
    figure = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.65, 0.35],
        subplot_titles=("Equity after costs (x starting capital)", "Drawdown from running peak"),
    )
    palette = (_BEST_COLOUR, "#2ca02c", "#9467bd", "#ff7f0e")
    others = [name for name in curves if name != BUY_AND_HOLD]
    order = others + ([BUY_AND_HOLD] if BUY_AND_HOLD in curves else [])
    for position, name in enumerate(order):
        curve = curves[name]
        if len(curve) == 0:
            continue
        line: dict[str, Any] = (
            {"color": "#000000", "dash": "dot", "width": 1.5}
            if name == BUY_AND_HOLD
            else {"color": palette[position % len(palette)], "width": 2}
        )
        label = "buy and hold" if name == BUY_AND_HOLD else name
        plotted = downsample_minmax(curve, max_points)
        falls = downsample_minmax(drawdown(curve), max_points)
        figure.add_trace(
            go.Scatter(
                x=_naive_utc(plotted.index),
                y=plotted.to_numpy(np.float64),
                mode="lines",
                name=label,
                legendgroup=name,
                line=line,
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=_naive_utc(falls.index),
                y=falls.to_numpy(np.float64),
                mode="lines",
                name=f"{label} drawdown",
                legendgroup=name,
                showlegend=False,
                line=line,
            ),
            row=2,
            col=1,
        )
    figure.update_layout(
        height=height_px,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        hovermode="x unified",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.06, "x": 0},
        plot_bgcolor="white",
    )
    figure.update_xaxes(showgrid=True, gridcolor="#eeeeee")
    figure.update_yaxes(showgrid=True, gridcolor="#eeeeee")
    figure.update_yaxes(tickformat=".1%", autorange="reversed", row=2, col=1)
    figure.update_xaxes(title_text="bar open time (UTC)", row=2, col=1)
    return figure


def _naive_utc(index: pd.Index) -> list[datetime]:
    stamps = pd.DatetimeIndex(index)
    if stamps.tz is not None:
        stamps = stamps.tz_convert("UTC").tz_localize(None)
    return list(stamps.to_pydatetime())


def curve_summary(curve: pd.Series) -> dict[str, float]:
    """`total_return` (fraction), `final_equity` (x starting capital) and `max_drawdown`
    (fraction of the running peak) of an equity curve, on every bar."""
    if len(curve) == 0:
        return {"total_return": math.nan, "final_equity": math.nan, "max_drawdown": math.nan}
    values = curve.to_numpy(np.float64)
    return {
        "total_return": float(values[-1] / values[0] - 1.0) if values[0] else math.nan,
        "final_equity": float(values[-1]),
        "max_drawdown": float(drawdown(curve).max()),
    }


def leaderboard_view(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as shown: a 1-based `rank` in score order, the LEADERBOARD_COLUMNS
    present first, then the remaining columns; an all-empty `error` column is dropped."""
    view = board.reset_index(drop=True).copy()
    view.insert(0, "rank", range(1, len(view) + 1))
    if "error" in view.columns and not view["error"].fillna("").astype(str).str.strip().any():
        view = view.drop(columns="error")
    first = [c for c in LEADERBOARD_COLUMNS if c in view.columns]
    return view[first + [c for c in view.columns if c not in first]]
