"""Sweep outputs: the leaderboard files and a self-contained HTML robustness report.

`write_leaderboard` writes every trial of a sweep to the run directory's leaderboard files
(Parquet and CSV, named by `models.runs`), sorted by score (mean fold net Sharpe, annualised
from 1-minute bars) descending with NaN last. `write_html_report` renders one
offline-viewable HTML page: the promotion decision and its reasons, the leaderboard, per-trial
metric charts, the Probability of Backtest Overfitting with its CSCV logit histogram, equity
and drawdown curves of the best candidates against the baselines and buy-and-hold, the
fold-by-fold table and the regime breakdown.

Units: Sharpe ratios are those the backtest computed (annualised from 1-minute bars unless
the caller states otherwise); returns, drawdowns, hit rates and turnover are fractions as
supplied; equity is a multiple of the starting capital (starts near 1.0); timestamps are UTC
bar open times.

The page embeds plotly.js exactly once (a single `<script>` in the head; every figure is
rendered without it) and references nothing external, so it opens without a network. All
caller text is HTML-escaped; Plotly escapes `<` in its figure JSON itself.

Plotted curves are downsampled (see `downsample_minmax`): at most `DEFAULT_MAX_POINTS` points a
curve, keeping the first and last point and the minimum and maximum of every bucket, so a
year of 1-minute bars (525,600 points a curve) costs a few hundred kB instead of tens of MB,
while peaks, troughs and the deepest drawdown stay visible. Summary numbers (final equity,
max drawdown) are computed on the full-resolution series.

Every file is written whole through `market.storage.Location.write_bytes` (locally a temporary
name in the target directory renamed into place, on an object store one PUT), so a reader never
sees a half-written file and a failed write leaves the previous one intact.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from plotly.subplots import make_subplots

from market.storage import Location, as_location
from models.evaluation import PathDistribution
from models.pbo import PboResult
from models.runs import BUY_AND_HOLD, COMPLETED, EARLY_STOPPED, ERRORED, RunDir

DEFAULT_MAX_POINTS = 5_000
"""Most points a plotted curve keeps (first, last, and a min and a max per bucket)."""

LEADERBOARD_METRICS: tuple[str, ...] = (
    "score",
    "worst_fold_sharpe",
    "sharpe",
    "total_return",
    "score_taker",
    "score_maker",
    "total_return_taker",
    "total_return_maker",
    "max_drawdown",
    "signal_hit_rate",
    "directional_accuracy",
    "meta_accuracy",
    "trades",
    "turnover",
    "exposure",
    "val_loss",
)
"""A trial's metrics in a leaderboard, in column order: Sharpe ratios annualised from 1-minute
bars (`score` is their mean over folds, or under CPCV the mean path Sharpe, the other metrics
then being means over paths), returns and drawdowns as fractions, `val_loss` the last
validation loss; NaN where the trial did not complete. `score_taker` / `score_maker` and
`total_return_taker` / `total_return_maker` are the execution scenarios: the same positions
with every fill at the taker, or the maker, fee (one of them is the configured side, equal to
`score` and `total_return`)."""

SECTION_HEADINGS: tuple[str, ...] = (
    "Promotion decision",
    "Leaderboard",
    "Per-trial metrics",
    "Backtest overfitting",
    "Path Sharpe distribution",
    "Equity curves",
    "Drawdowns",
    "Fold-by-fold results",
    "Regime breakdown",
    "Notes",
)
"""The `<h2>` headings of the HTML report, in page order."""

REGIME_ORDER: tuple[str, ...] = ("high_vol", "low_vol", "up_trend", "down_trend")

# Columns that may name the model a fold or regime row belongs to, most specific first.
_MODEL_COLUMNS: tuple[str, ...] = ("model", "name", "candidate", "trial_id")
_BASELINE_PREFIX = "baseline:"
_STATUS_SYMBOLS: Mapping[str, str] = {
    COMPLETED: "circle",
    EARLY_STOPPED: "x",
    ERRORED: "diamond-open",
}
_PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
)
_PLOT_CONFIG: Mapping[str, Any] = {"displaylogo": False, "responsive": True}
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { margin-bottom: 4px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.meta { color: #666; margin-top: 0; }
.gate { border: 2px solid; border-radius: 6px; padding: 12px 16px; margin: 12px 0; }
.gate.promoted { border-color: #2ca02c; background: #eef8ee; }
.gate.rejected { border-color: #d62728; background: #fcefef; }
.decision { font-size: 1.4em; font-weight: bold; }
.promoted .decision { color: #1e7a1e; }
.rejected .decision { color: #b01e1e; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.status-early_stopped td { color: #777; }
tr.status-error td { color: #b01e1e; }
.empty { color: #777; font-style: italic; }
nav a { margin-right: 12px; }
"""


# --------------------------------------------------------------------------------------------
# Leaderboard files


def sort_leaderboard(leaderboard: pd.DataFrame) -> pd.DataFrame:
    """Trials by `score` (mean fold net Sharpe, annualised) descending, NaN last.

    The sort is stable, so ties keep the caller's order. Non-numeric scores count as NaN. A
    frame without a `score` column is returned unsorted only when it has no rows.
    """
    if "score" not in leaderboard.columns:
        if len(leaderboard) == 0:
            return leaderboard.reset_index(drop=True)
        raise ValueError("leaderboard has no 'score' column to rank trials by")
    ordered = leaderboard.sort_values(
        "score",
        ascending=False,
        na_position="last",
        kind="mergesort",
        key=lambda column: pd.to_numeric(column, errors="coerce"),
    )
    return ordered.reset_index(drop=True)


def write_leaderboard(
    leaderboard: pd.DataFrame, out_dir: str | Path | Location
) -> tuple[Location, Location]:
    """Write the sweep leaderboard as Parquet and CSV in the run directory `out_dir`.

    Both files hold the same rows and columns: every trial the caller passes (completed,
    early-stopped and failed), sorted by `score` (mean fold net Sharpe, annualised from
    1-minute bars) descending with NaN last, without the index. Object columns holding
    values that Parquet cannot store as one type (lists, dicts, mixed types: typically
    hyperparameters) are stored as JSON text in both files. `out_dir` (a local path or a
    URI, `market.storage`) is created if missing; each file is written atomically. Returns
    (parquet location, csv location).
    """
    run = RunDir(out_dir)
    table = _storable(sort_leaderboard(leaderboard))
    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    run.leaderboard_parquet.write_bytes(parquet.getvalue())
    run.leaderboard_csv.write_text(table.to_csv(index=False))
    return run.leaderboard_parquet, run.leaderboard_csv


def _storable(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every object column reduced to one scalar type Parquet and CSV share."""
    converted = frame.copy()
    for name in converted.columns:
        column = converted[name]
        if column.dtype != object:
            continue
        present = [value for value in column if not _is_missing(value)]
        if all(isinstance(value, str) for value in present) or all(
            isinstance(value, bool | np.bool_) for value in present
        ):
            continue
        if all(_is_number(value) for value in present):
            converted[name] = pd.to_numeric(column, errors="coerce")
            continue
        converted[name] = [None if _is_missing(value) else _as_text(value) for value in column]
    return converted


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _as_text(value: object) -> str:
    """JSON for containers and numbers, so the text parses back; str() for anything else."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=_json_fallback)
    except (TypeError, ValueError):
        return str(value)


def _json_fallback(value: object) -> object:
    # NumPy scalars and arrays hide inside hyperparameter dicts; plain values serialise cleanly.
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NaT or value is pd.NA:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


# --------------------------------------------------------------------------------------------
# Downsampling


def downsample_minmax(series: pd.Series, max_points: int = DEFAULT_MAX_POINTS) -> pd.Series:
    """At most `max_points` points of `series`, chosen to keep its shape for plotting.

    Non-finite values are dropped first. A series that then has at most `max_points` points
    is returned whole. Otherwise the first and last points are kept and the points between
    are cut into `(max_points - 2) // 2` equal runs of consecutive bars, from each of which
    the minimum and the maximum are kept (in time order). Every point returned is an original
    point with its original index, so the global minimum and maximum (the deepest drawdown,
    the highest equity) and the final value are always present.
    """
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    if not finite.all():
        series = series[finite]
        values = values[finite]
    n = len(values)
    if n <= max_points:
        return series
    inner = values[1:-1]
    buckets = (max_points - 2) // 2
    size = math.ceil(len(inner) / buckets)
    # Recount so the padded tail never forms an all-NaN bucket (nanargmin rejects those).
    buckets = math.ceil(len(inner) / size)
    padded = np.full(buckets * size, np.nan)
    padded[: len(inner)] = inner
    grid = padded.reshape(buckets, size)
    offsets = np.arange(buckets) * size + 1
    lows = offsets + np.nanargmin(grid, axis=1)
    highs = offsets + np.nanargmax(grid, axis=1)
    keep = np.unique(np.concatenate(([0, n - 1], lows, highs)))
    return series.iloc[keep]


def drawdown(equity: pd.Series) -> pd.Series:
    """Drawdown of an equity curve as a fraction of the running peak: `1 - equity / cummax`.

    0 at a new high, 0.25 when equity is 25% below its highest value so far.
    """
    values = pd.to_numeric(equity, errors="coerce")
    return 1.0 - values / values.cummax()


def curve_summary(curve: pd.Series) -> dict[str, float]:
    """`final_equity` (x starting capital), `total_return` (fraction) and `max_drawdown`
    (fraction of the running peak) of an equity curve, on every bar; NaN for an empty curve."""
    if len(curve) == 0:
        return {"final_equity": math.nan, "total_return": math.nan, "max_drawdown": math.nan}
    values = curve.to_numpy(np.float64)
    return {
        "final_equity": float(values[-1]),
        "total_return": float(values[-1] / values[0] - 1.0) if values[0] else math.nan,
        "max_drawdown": float(drawdown(curve).max()),
    }


# --------------------------------------------------------------------------------------------
# HTML report


def write_html_report(
    path: str | Path | Location,
    *,
    title: str,
    leaderboard: pd.DataFrame,
    equity_curves: Mapping[str, pd.Series],
    fold_table: pd.DataFrame,
    regime_table: pd.DataFrame,
    gate: Mapping[str, Any],
    pbo: PboResult | None = None,
    path_sharpes: Mapping[str, PathDistribution] | None = None,
    notes: Sequence[str] = (),
    generated_at: datetime | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    log_y: bool = False,
) -> Location:
    """Render the sweep's robustness report as one self-contained HTML file at `path` (a
    local path or a URI, `market.storage`).

    `leaderboard`: one row per trial (see `write_leaderboard`); shown whole, sorted by score.
    `equity_curves`: name -> equity (multiple of starting capital, starts near 1.0) indexed by
    UTC bar open time over the out-of-sample track record; names starting `baseline:` are
    drawn dashed, `buy_and_hold` dotted, everything else as a candidate. `fold_table` and
    `regime_table`: one row per (model, fold) and (model, regime); the model is read from the
    first of the columns model/name/candidate/trial_id present. `gate`: the promotion decision
    (`promoted`, `reasons`, and anything else, e.g. version, dsr, thresholds, shown as is).
    `pbo`: the sweep's CSCV result (None: not computed), shown as its value and a histogram of
    the split logits.
    `path_sharpes`: under CPCV, record name -> its distribution of path net Sharpe ratios, the
    first entry the winner (plotted path by path), every entry summarised in a table; None for
    a walk-forward sweep (one path).
    `notes` are listed at the end. `generated_at` defaults to now (UTC). Curves are plotted
    with at most `max_points` points each (`downsample_minmax`); `log_y` draws equity on a
    log axis when every value is positive. Missing or empty inputs render as a message in
    their section. Parent directories are created; the file is written atomically.
    """
    target = as_location(path)
    stamp = (generated_at or datetime.now(UTC)).astimezone(UTC)
    board = sort_leaderboard(leaderboard)
    curves = _clean_curves(equity_curves)
    plotted = {name: downsample_minmax(curve, max_points) for name, curve in curves.items()}
    drawdowns = {
        name: downsample_minmax(drawdown(curve), max_points) for name, curve in curves.items()
    }

    body = [
        _header(title, stamp),
        _section_gate(gate),
        _section_leaderboard(board),
        _section_trial_metrics(leaderboard),
        _section_pbo(pbo),
        _section_path_sharpes(path_sharpes),
        _section_equity(curves, plotted, log_y),
        _section_drawdowns(drawdowns),
        _section_table(
            "Fold-by-fold results",
            fold_table,
            "Per model and walk-forward fold: train/test ranges and out-of-sample metrics "
            "after fees (Sharpe annualised from 1-minute bars).",
            "No fold results were provided.",
        ),
        _section_regimes(regime_table),
        _section_notes(notes, curves, plotted, max_points),
    ]
    target.write_text(_html_page(title, body))
    return target


def _plotly_script() -> str:
    """plotly.js as one inline script, the only copy in the page."""
    # A literal "</script" inside the library would end the element early; in JavaScript
    # "<\/script" means the same wherever it can legally occur (strings, regexes, comments).
    source = plotly.offline.get_plotlyjs().replace("</script", "<\\/script")
    return (
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f'<script type="text/javascript" id="plotly-js">{source}</script>'
    )


def _header(title: str, stamp: datetime) -> str:
    links = " ".join(
        f'<a href="#{_anchor(heading)}">{_esc(heading)}</a>' for heading in SECTION_HEADINGS
    )
    return (
        f"<header><h1>{_esc(title)}</h1>"
        f'<p class="meta">Generated {_esc(stamp.strftime("%Y-%m-%d %H:%M:%S"))} UTC</p>'
        f"<nav>{links}</nav></header>"
    )


def _section_gate(gate: Mapping[str, Any]) -> str:
    decision = gate.get("promoted")
    # Only a real boolean promotes: a stray string such as "false" must not read as yes.
    promoted = isinstance(decision, bool | np.bool_) and bool(decision)
    reasons = _as_list(gate.get("reasons"))
    if decision is None:
        reasons = ["the gate did not state a decision; treated as not promoted", *reasons]
    elif not isinstance(decision, bool | np.bool_):
        reasons = [f"the gate's decision {decision!r} is not a boolean; not promoted", *reasons]
    label = "PROMOTED" if promoted else "NOT PROMOTED"
    version = gate.get("version")
    headline = label if not promoted or version is None else f"{label} as version {version}"
    if reasons:
        items = "".join(f"<li>{_esc(str(reason))}</li>" for reason in reasons)
        reason_html = f"<p>Reasons:</p><ol class='reasons'>{items}</ol>"
    else:
        reason_html = "<p class='empty'>The gate gave no reasons.</p>"
    shown = {"promoted", "reasons", "version"} if promoted else {"promoted", "reasons"}
    details = {key: value for key, value in gate.items() if key not in shown}
    detail_html = ""
    if details:
        rows = "".join(
            f"<tr><th>{_esc(str(key))}</th><td>{_esc(_format_detail(value))}</td></tr>"
            for key, value in details.items()
        )
        detail_html = f"<table class='kv'>{rows}</table>"
    box_class = "promoted" if promoted else "rejected"
    return _section(
        "Promotion decision",
        f'<div class="gate {box_class}"><div class="decision">{_esc(headline)}</div>'
        f"{reason_html}{detail_html}</div>",
    )


def _section_leaderboard(board: pd.DataFrame) -> str:
    if len(board) == 0:
        return _section("Leaderboard", _empty("No trials were recorded."))
    parts: list[str] = []
    statuses = board["status"].astype(str) if "status" in board.columns else None
    if statuses is not None:
        counts = statuses.value_counts()
        summary = ", ".join(f"{count} {status}" for status, count in counts.items())
        parts.append(f"<p>{len(board)} trials: {_esc(summary)}.</p>")
        if not (statuses == COMPLETED).any():
            parts.append(_empty("No trial completed; the trials below stopped early or failed."))
    parts.append(
        "<p>Sorted by score (mean fold net Sharpe after fees, annualised from 1-minute bars), "
        "NaN last. Execution scenarios: score_taker / score_maker and total_return_taker / "
        "total_return_maker rescore the same positions with every fill at the taker or the "
        "maker fee; the gate uses the configured side.</p>"
    )
    ranked = board.copy()
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    row_classes = None if statuses is None else [f"status-{status}" for status in statuses]
    parts.append(_html_table(ranked, row_classes))
    return _section("Leaderboard", "".join(parts))


def _section_trial_metrics(leaderboard: pd.DataFrame) -> str:
    heading = "Per-trial metrics"
    if "score" not in leaderboard.columns or len(leaderboard) == 0:
        return _section(heading, _empty("No trial scores to chart."))
    frame = leaderboard.reset_index(drop=True)
    score = pd.to_numeric(frame["score"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    has_score = np.isfinite(score)
    if not has_score.any():
        return _section(heading, _empty("No trial has a finite score to chart."))
    dsr = (
        pd.to_numeric(frame["dsr"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        if "dsr" in frame.columns
        else np.full(len(frame), np.nan)
    )
    with_dsr = bool((has_score & np.isfinite(dsr)).any())
    family = _text_column(frame, "family", "unknown")
    status = _text_column(frame, "status", "unknown")
    trial = _text_column(frame, "trial_id", "")
    order = np.arange(1, len(frame) + 1, dtype=np.float64)

    columns = 2 if with_dsr else 1
    titles = ["Score by trial (caller's trial order)"]
    if with_dsr:
        titles.append("Score vs deflated Sharpe ratio")
    figure = make_subplots(rows=1, cols=columns, subplot_titles=titles)
    for index, name in enumerate(dict.fromkeys(family)):
        colour = _PALETTE[index % len(_PALETTE)]
        rows = np.flatnonzero((family == name) & has_score)
        if len(rows) == 0:
            continue
        hover = [f"{trial[row]} ({status[row]})" for row in rows]
        symbols = [_STATUS_SYMBOLS.get(status[row], "square") for row in rows]
        figure.add_trace(
            go.Scatter(
                x=order[rows],
                y=score[rows],
                mode="markers",
                name=name,
                legendgroup=name,
                marker={"color": colour, "symbol": symbols, "size": 8},
                text=hover,
                hovertemplate="%{text}<br>trial %{x:.0f}<br>score %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        if with_dsr:
            rated = rows[np.isfinite(dsr[rows])]
            figure.add_trace(
                go.Scatter(
                    x=dsr[rated],
                    y=score[rated],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=False,
                    marker={
                        "color": colour,
                        "symbol": [_STATUS_SYMBOLS.get(status[r], "square") for r in rated],
                        "size": 8,
                    },
                    text=[f"{trial[r]} ({status[r]})" for r in rated],
                    hovertemplate="%{text}<br>DSR %{x:.3f}<br>score %{y:.3f}<extra></extra>",
                ),
                row=1,
                col=2,
            )
    figure.update_xaxes(title_text="trial", row=1, col=1)
    figure.update_yaxes(title_text="score (annualised net Sharpe)", row=1, col=1)
    if with_dsr:
        figure.update_xaxes(title_text="deflated Sharpe ratio", row=1, col=2)
        figure.update_yaxes(title_text="score (annualised net Sharpe)", row=1, col=2)
    figure.update_layout(height=420, legend_title_text="family")
    dropped = int((~has_score).sum())
    caption = (
        "<p>Marker: circle completed, x early-stopped, open diamond error."
        + (f" {dropped} trials without a finite score are not plotted." if dropped else "")
        + "</p>"
    )
    return _section(heading, caption + _figure_html(figure, "fig-trials"))


def _section_pbo(pbo: PboResult | None) -> str:
    heading = "Backtest overfitting"
    if pbo is None:
        return _section(
            heading, _empty("The Probability of Backtest Overfitting was not computed.")
        )
    if pbo.pbo is None:
        return _section(
            heading,
            _empty(f"PBO undefined: {pbo.reason or 'no reason given'}."),
        )
    caption = (
        f"<p>Probability of Backtest Overfitting: <b>{pbo.pbo:.3f}</b> (CSCV over {pbo.trials} "
        f"completed trials' out-of-sample net per-bar returns, {pbo.bars} bars in "
        f"S = {pbo.partitions} blocks, {pbo.splits} splits). PBO is the share of splits in "
        "which the trial with the best in-sample Sharpe ratio ranks at or below the median "
        "out of sample (logit &lt;= 0); near 0.5 means the ranking carries no information.</p>"
    )
    figure = go.Figure(
        go.Histogram(
            x=pbo.logits,
            marker={"color": _PALETTE[0]},
            hovertemplate="logit %{x}<br>%{y} splits<extra></extra>",
        )
    )
    figure.add_vline(x=0.0, line={"color": "#d62728", "dash": "dash"})
    figure.update_layout(
        height=320,
        xaxis={"title": {"text": "logit of the in-sample winner's out-of-sample relative rank"}},
        yaxis={"title": {"text": "splits"}},
        bargap=0.05,
    )
    return _section(heading, caption + _figure_html(figure, "fig-pbo"))


def _section_path_sharpes(path_sharpes: Mapping[str, PathDistribution] | None) -> str:
    heading = "Path Sharpe distribution"
    if not path_sharpes:
        return _section(
            heading,
            _empty(
                "Walk-forward folds give one out-of-sample path; the CPCV scheme "
                "(folds.scheme: cpcv) gives a distribution of path Sharpe ratios."
            ),
        )
    winner, first = next(iter(path_sharpes.items()))
    caption = (
        f"<p>Combinatorial purged cross-validation: N = {first.groups} groups, "
        f"k = {first.test_groups} test groups, {first.paths} backtest paths, purge "
        f"{first.purge_bars} and embargo {first.embargo_bars} bars. Each path covers the whole "
        "timeline once, every group scored by a model that never trained on it (nor within the "
        "purge and embargo around it). Annualised net Sharpe ratio per path; a record's score "
        f"is the mean over paths. Plotted: {_esc(winner)}.</p>"
    )
    sharpes = first.sharpes.sharpes
    figure = go.Figure(
        go.Bar(
            x=[f"path {p}" for p in range(len(sharpes))],
            y=sharpes,
            marker={"color": [_PALETTE[2] if v > 0 else _PALETTE[1] for v in sharpes]},
            hovertemplate="%{x}: Sharpe %{y:.3f}<extra></extra>",
        )
    )
    figure.add_hline(y=first.sharpes.mean, line={"color": "#444", "dash": "dash"})
    figure.update_layout(
        height=320,
        yaxis={"title": {"text": "annualised net Sharpe"}},
        xaxis={"title": {"text": "backtest path"}},
    )
    table = pd.DataFrame(
        [
            {
                "model": name,
                "paths": d.paths,
                "mean": d.sharpes.mean,
                "std": d.sharpes.std,
                **{f"q{level}": value for level, value in d.sharpes.quantiles.items()},
                "share_positive": d.sharpes.share_positive,
            }
            for name, d in path_sharpes.items()
        ]
    )
    return _section(
        heading, caption + _figure_html(figure, "fig-path-sharpes") + _html_table(table, None)
    )


def curve_traces(
    curves: Mapping[str, pd.Series], *, suffix: str = "", showlegend: bool = True
) -> list[go.Scatter]:
    """One line per curve: candidates first, then `baseline:` curves dashed, then buy-and-hold
    dotted black; a candidate's colour is fixed by its name, so it matches across charts.

    x is epoch milliseconds (UTC) for a time index, so a figure showing these traces needs a
    "date" x axis. Each trace is named after its curve plus `suffix` and grouped in the legend
    by the curve's name (so an equity and a drawdown trace of one curve toggle together).
    """
    return [
        go.Scatter(
            x=_plot_x(curves[name].index),
            y=curves[name].to_numpy(np.float64),
            mode="lines",
            name=f"{name}{suffix}",
            legendgroup=name,
            showlegend=showlegend,
            line=_curve_style(name),
        )
        for name in _curve_order(curves)
    ]


def _section_equity(
    curves: Mapping[str, pd.Series], plotted: Mapping[str, pd.Series], log_y: bool
) -> str:
    heading = "Equity curves"
    if not curves:
        return _section(heading, _empty("No equity curves were provided."))
    figure = go.Figure(curve_traces(plotted))
    every_positive = all(bool((curve > 0).all()) for curve in curves.values())
    axis_type = "log" if log_y and every_positive else "linear"
    figure.update_layout(
        height=480,
        xaxis={"title": {"text": "bar open time (UTC)"}, "type": _x_type(plotted)},
        yaxis={"title": {"text": "equity (x starting capital)"}, "type": axis_type},
        hovermode="x unified",
    )
    summary = pd.DataFrame(
        [
            {
                "curve": name,
                "kind": _curve_kind(name),
                "bars": len(curve),
                "start": curve.index[0],
                "end": curve.index[-1],
                **curve_summary(curve),
            }
            for name in _curve_order(curves)
            for curve in [curves[name]]
        ]
    )
    caption = (
        "<p>Out-of-sample equity after fees, as a multiple of starting capital. Totals and max "
        "drawdown are computed on every bar; the chart is downsampled (see Notes).</p>"
    )
    if log_y and not every_positive:
        caption += "<p class='empty'>Log scale requested but some equity is not positive.</p>"
    return _section(
        heading, caption + _figure_html(figure, "fig-equity") + _html_table(summary, None)
    )


def _section_drawdowns(drawdowns: Mapping[str, pd.Series]) -> str:
    heading = "Drawdowns"
    if not drawdowns:
        return _section(heading, _empty("No equity curves were provided."))
    figure = go.Figure(curve_traces(drawdowns))
    figure.update_layout(
        height=380,
        xaxis={"title": {"text": "bar open time (UTC)"}, "type": _x_type(drawdowns)},
        # Reversed so that losses point down, as they do on the equity chart above.
        yaxis={
            "title": {"text": "drawdown (1 - equity / running peak)"},
            "tickformat": ".0%",
            "autorange": "reversed",
        },
        hovermode="x unified",
    )
    caption = "<p>Drawdown from the running peak, as a fraction of the peak.</p>"
    return _section(heading, caption + _figure_html(figure, "fig-drawdown"))


def _section_regimes(regime_table: pd.DataFrame) -> str:
    heading = "Regime breakdown"
    if len(regime_table) == 0:
        return _section(heading, _empty("No regime results were provided."))
    parts = [
        "<p>Out-of-sample metrics per market regime after fees (Sharpe annualised from "
        "1-minute bars).</p>"
    ]
    model_column = _model_column(regime_table)
    if "regime" in regime_table.columns and "sharpe" in regime_table.columns:
        frame = regime_table.assign(
            _model=regime_table[model_column].astype(str) if model_column else "all",
            _regime=regime_table["regime"].astype(str),
            _sharpe=pd.to_numeric(regime_table["sharpe"], errors="coerce"),
        ).drop_duplicates(subset=["_model", "_regime"], keep="last")
        present = list(dict.fromkeys(frame["_regime"]))
        regimes = [r for r in REGIME_ORDER if r in present] + [
            r for r in present if r not in REGIME_ORDER
        ]
        figure = go.Figure()
        for name in _curve_order(dict.fromkeys(frame["_model"])):
            rows = frame[frame["_model"] == name].set_index("_regime")["_sharpe"]
            figure.add_trace(
                go.Bar(
                    x=regimes,
                    y=rows.reindex(regimes).to_numpy(np.float64, na_value=np.nan),
                    name=name,
                    marker={"color": _curve_style(name)["color"]},
                )
            )
        figure.update_layout(
            height=420,
            barmode="group",
            xaxis={"title": {"text": "regime"}},
            yaxis={"title": {"text": "Sharpe (annualised, net)"}},
        )
        parts.append(_figure_html(figure, "fig-regimes"))
    else:
        parts.append(_empty("No 'regime' and 'sharpe' columns to chart."))
    parts.append(_html_table(regime_table.reset_index(drop=True), None))
    return _section(heading, "".join(parts))


def _section_table(heading: str, frame: pd.DataFrame, caption: str, empty: str) -> str:
    if len(frame) == 0:
        return _section(heading, _empty(empty))
    return _section(
        heading, f"<p>{_esc(caption)}</p>" + _html_table(frame.reset_index(drop=True), None)
    )


def _section_notes(
    notes: Sequence[str],
    curves: Mapping[str, pd.Series],
    plotted: Mapping[str, pd.Series],
    max_points: int,
) -> str:
    items = [str(note) for note in notes]
    items.append(
        "Sharpe ratios are computed by the backtest on out-of-sample bars after fees and "
        "annualised from 1-minute bars unless stated; returns, drawdowns and hit rates are "
        "fractions; times are UTC bar open times."
    )
    reduced = [name for name in curves if len(plotted[name]) < len(curves[name])]
    if reduced:
        detail = "; ".join(
            f"{name}: {len(curves[name])} -> {len(plotted[name])}" for name in reduced
        )
        items.append(
            f"Curves longer than {max_points} points are downsampled for plotting: first and "
            "last point plus the minimum and maximum of each run of consecutive bars, so "
            f"peaks, troughs and the deepest drawdown are kept (points: {detail})."
        )
    listed = "".join(f"<li>{_esc(item)}</li>" for item in items)
    return _section("Notes", f"<ul>{listed}</ul>")


# --------------------------------------------------------------------------------------------
# HTML and plotting helpers


def _section(heading: str, content: str) -> str:
    return f'<section id="{_anchor(heading)}"><h2>{_esc(heading)}</h2>{content}</section>'


def _anchor(heading: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in heading.lower())


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _empty(message: str) -> str:
    return f'<p class="empty">{_esc(message)}</p>'


def _figure_html(figure: go.Figure, div_id: str) -> str:
    # The library is already in the page head; a fixed div id keeps reports diffable.
    rendered: str = figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        include_mathjax=False,
        div_id=div_id,
        config=dict(_PLOT_CONFIG),
    )
    return rendered


def _html_table(frame: pd.DataFrame, row_classes: Sequence[str] | None) -> str:
    header = "".join(f"<th>{_esc(str(column))}</th>" for column in frame.columns)
    body: list[str] = []
    for position, row in enumerate(frame.itertuples(index=False, name=None)):
        cells = "".join(_cell(value) for value in row)
        css = "" if row_classes is None else f' class="{_esc(row_classes[position])}"'
        body.append(f"<tr{css}>{cells}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _cell(value: object) -> str:
    text = _format_value(value)
    if _is_number(value):
        return f'<td class="num">{_esc(text)}</td>'
    return f"<td>{_esc(text)}</td>"


def _format_value(value: object) -> str:
    """Table text for one value: fixed decimals for ordinary magnitudes, exponent otherwise."""
    if _is_missing(value):
        return "—"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        magnitude = abs(number)
        if magnitude == 0 or 1e-3 <= magnitude < 1e6:
            return f"{number:.4f}"
        return f"{number:.3e}"
    if isinstance(value, pd.Timestamp | datetime):
        stamp = pd.Timestamp(value)
        if stamp.tzinfo is not None:
            stamp = stamp.tz_convert("UTC")
        if stamp.second == 0 and stamp.microsecond == 0 and stamp.nanosecond == 0:
            return stamp.strftime("%Y-%m-%d %H:%M")
        return stamp.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str):
        return value
    return _as_text(value)


def _format_detail(value: object) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{key}: {_format_value(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(item) for item in value)
    return _format_value(value)


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [str(item) for item in value]
    return [str(value)]


def _text_column(frame: pd.DataFrame, column: str, default: str) -> npt.NDArray[np.str_]:
    if column not in frame.columns:
        return np.full(len(frame), default)
    values = [default if _is_missing(value) else str(value) for value in frame[column]]
    return np.array(values, dtype=np.str_)


def _model_column(frame: pd.DataFrame) -> str | None:
    return next((column for column in _MODEL_COLUMNS if column in frame.columns), None)


def _clean_curves(equity_curves: Mapping[str, pd.Series]) -> dict[str, pd.Series]:
    """Curves as float series in time order, non-finite values dropped, empty ones left out."""
    cleaned: dict[str, pd.Series] = {}
    for name, curve in equity_curves.items():
        values = pd.to_numeric(pd.Series(curve), errors="coerce").astype(np.float64)
        values = values[np.isfinite(values.to_numpy())]
        if not values.index.is_monotonic_increasing:
            values = values.sort_index(kind="mergesort")
        if len(values) > 0:
            cleaned[str(name)] = values
    return cleaned


def _curve_kind(name: str) -> str:
    if name == BUY_AND_HOLD:
        return "buy and hold"
    if name.startswith(_BASELINE_PREFIX):
        return "baseline"
    return "candidate"


def _curve_order(named: Mapping[str, object]) -> list[str]:
    """Candidates first, then baselines, then buy-and-hold; the caller's order within each."""
    rank = {"candidate": 0, "baseline": 1, "buy and hold": 2}
    return sorted(named, key=lambda name: rank[_curve_kind(name)])


def _curve_style(name: str) -> dict[str, Any]:
    kind = _curve_kind(name)
    if kind == "buy and hold":
        return {"color": "#000000", "dash": "dot", "width": 1.5}
    # A stable colour per name keeps a model's colour the same across every chart.
    colour = _PALETTE[sum(name.encode()) % len(_PALETTE)]
    if kind == "baseline":
        return {"color": colour, "dash": "dash", "width": 1.2}
    return {"color": colour, "dash": "solid", "width": 1.8}


def _x_type(curves: Mapping[str, pd.Series]) -> str:
    dated = all(isinstance(curve.index, pd.DatetimeIndex) for curve in curves.values())
    return "date" if dated else "linear"


def _plot_x(index: pd.Index) -> npt.NDArray[np.float64]:
    """Plot positions: epoch milliseconds (UTC) for timestamps, the index itself otherwise."""
    # Plotly reads numbers on a date axis as epoch ms, and a float array is embedded as
    # compact base64 rather than one ISO string per point, about half the bytes.
    if isinstance(index, pd.DatetimeIndex):
        stamps = index.tz_convert("UTC") if index.tz is not None else index
        nanos = stamps.as_unit("ns").asi8.astype(np.float64)
        return nanos / 1e6
    return pd.to_numeric(pd.Series(index), errors="coerce").to_numpy(np.float64)


# --------------------------------------------------------------------------------------------
# The detection-power study's report

POWER_SECTION_HEADINGS: tuple[str, ...] = (
    "Detection power",
    "Power curve",
    "Per strength",
    "Runs",
    "Notes",
)
"""The `<h2>` headings of the power study's HTML report, in page order."""


def write_power_report(
    path: str | Path | Location,
    *,
    runs: pd.DataFrame,
    strengths: pd.DataFrame,
    summary: Mapping[str, Any],
    notes: Sequence[str] = (),
    generated_at: datetime | None = None,
) -> Location:
    """Render the detection-power study (`models.power`) as one self-contained HTML file.

    `runs`: one row per simulated market (kind, strength, seed, planted_accuracy,
    oracle_sharpe, promoted, winning_score, dsr, pbo, ...); `strengths`: one row per planted
    strength (planted_accuracy, promotion_rate, medians); `summary`: the study's answer
    (min_detectable_accuracy, false_promotions, random_walk_runs, detection_rate, ...), shown
    as a table. The power curve plots each strength's promotion rate (fraction of its seeds)
    against its planted accuracy (fraction of out-of-sample decisions), the random walks' false
    promotion rate at their measured accuracy, and the detection threshold."""
    target = as_location(path)
    stamp = (generated_at or datetime.now(UTC)).astimezone(UTC)
    title = "Quant-AI detection power: what the sweep and gate find"
    links = " ".join(
        f'<a href="#{_anchor(heading)}">{_esc(heading)}</a>' for heading in POWER_SECTION_HEADINGS
    )
    header = (
        f"<header><h1>{_esc(title)}</h1>"
        f'<p class="meta">Generated {_esc(stamp.strftime("%Y-%m-%d %H:%M:%S"))} UTC</p>'
        f"<nav>{links}</nav></header>"
    )
    shown = {k: v for k, v in summary.items() if k != "strengths"}
    answer = "".join(
        f"<tr><th>{_esc(str(key))}</th><td>{_esc(_format_detail(value))}</td></tr>"
        for key, value in shown.items()
    )
    items = "".join(f"<li>{_esc(str(note))}</li>" for note in notes)
    body = [
        header,
        _section("Detection power", f"<table class='kv'>{answer}</table>"),
        _section("Power curve", _power_curve(runs, strengths, summary)),
        _section_table(
            "Per strength",
            strengths,
            "Medians over each strength's seeds; promotion rate is the fraction of its seeds "
            "promoted; planted accuracy a fraction of out-of-sample decisions; Sharpe ratios "
            "annualised.",
            "No planted strength was run.",
        ),
        _section_table(
            "Runs",
            runs,
            "One row per simulated market; winning score: the sweep's best (mean fold or path "
            "net Sharpe, annualised from 1-minute bars).",
            "No runs.",
        ),
        _section("Notes", f"<ul>{items}</ul>" if items else _empty("No notes.")),
    ]
    target.write_text(_html_page(title, body))
    return target


def _html_page(title: str, body: Sequence[str]) -> str:
    """A whole report page: the shared style and Plotly script, `body`'s sections in order."""
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        _plotly_script(),
        "</head>",
    ]
    return "\n".join([*head, "<body>", *body, "</body>", "</html>", ""])


def _power_curve(runs: pd.DataFrame, strengths: pd.DataFrame, summary: Mapping[str, Any]) -> str:
    if len(strengths) == 0 and len(runs) == 0:
        return _empty("No runs to plot.")
    figure = go.Figure()
    if len(strengths):
        figure.add_trace(
            go.Scatter(
                x=strengths["planted_accuracy"],
                y=strengths["promotion_rate"],
                mode="lines+markers+text",
                name="planted signal",
                text=[f"strength {s:g}" for s in strengths["strength"]],
                textposition="top left",
                line={"color": _PALETTE[0]},
                customdata=np.stack(
                    [strengths["strength"], strengths["oracle_sharpe"], strengths["runs"]],
                    axis=-1,
                ),
                hovertemplate="planted accuracy %{x:.4f}<br>promotion rate %{y:.2f}<br>"
                "strength %{customdata[0]}<br>oracle Sharpe %{customdata[1]:.2f}<br>"
                "seeds %{customdata[2]}<extra></extra>",
            )
        )
    walks = runs[runs["kind"] == "random_walk"] if len(runs) else runs
    if len(walks):
        figure.add_trace(
            go.Scatter(
                x=[float(np.nanmedian(walks["planted_accuracy"]))],
                y=[float(walks["promoted"].mean())],
                mode="markers",
                marker={"symbol": "x", "size": 12, "color": _PALETTE[1]},
                name=f"random walks ({len(walks)}): false promotion rate",
            )
        )
    rate = summary.get("detection_rate")
    if isinstance(rate, float | int):
        figure.add_hline(
            y=float(rate),
            line_dash="dot",
            line_color="#777",
            annotation_text=f"detected: promoted in >= {float(rate):.0%} of seeds",
        )
    figure.update_layout(
        xaxis_title="planted accuracy at the horizon (out of sample)",
        yaxis_title="promotion rate",
        yaxis_range=[-0.05, 1.1],
        height=460,
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
    )
    return _figure_html(figure, "fig-power")
