"""The sweep leaderboard files and the self-contained HTML report (models/report.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.offline
import pytest

from market import storage
from market.storage import Location
from models import report
from models.cpcv import path_sharpe_distribution
from models.evaluation import PathDistribution
from models.pbo import probability_of_backtest_overfitting
from models.report import (
    SECTION_HEADINGS,
    downsample_minmax,
    drawdown,
    write_html_report,
    write_leaderboard,
)

EVIL = '<script>alert("x")</script> & more'
PLOTLY_HEADER = plotly.offline.get_plotlyjs()[:60]


def local_paths(locations: tuple[Location, Location]) -> tuple[Path, Path]:
    return locations[0].local_path(), locations[1].local_path()


def leaderboard_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["t0", "t1", "t2", "t3", "t4"],
            "family": ["lstm", "gru", "tcn", "lstm", "gru"],
            "status": ["completed", "early_stopped", "completed", "error", "completed"],
            "score": [0.5, np.nan, 1.7, np.nan, -0.3],
            "worst_fold_sharpe": [-0.2, np.nan, 0.4, np.nan, -1.1],
            "dsr": [0.41, np.nan, 0.97, np.nan, 0.05],
            "hit_rate": [0.51, 0.49, 0.54, np.nan, 0.48],
            "trades": [120, 14, 88, 0, 301],
            "turnover": [35.5, 4.0, 21.25, 0.0, 90.0],
            "max_drawdown": [0.08, 0.02, 0.05, np.nan, 0.2],
            "lr": [1e-3, 3e-4, 5e-5, 1e-3, 2e-4],
            "hidden": [64, 128, 32, 64, 256],
        }
    )


def equity(n: int, seed: int = 0, drift: float = 2e-6) -> pd.Series:
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-01-01", periods=n, freq="min", tz="UTC")
    return pd.Series(np.exp(np.cumsum(rng.normal(drift, 5e-4, n))), index=index)


def fold_frame() -> pd.DataFrame:
    rows = []
    for model in ("t2", "baseline:drift"):
        for fold in range(3):
            start = pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=fold)
            rows.append(
                {
                    "model": model,
                    "fold": fold,
                    "train_start": start,
                    "train_end": start + pd.Timedelta(hours=12),
                    "test_start": start + pd.Timedelta(hours=13),
                    "test_end": start + pd.Timedelta(hours=20),
                    "sharpe": 0.3 * fold - 0.1,
                    "total_return": 0.001 * fold,
                    "trades": 10 + fold,
                    "hit_rate": 0.5,
                }
            )
    return pd.DataFrame(rows)


def regime_frame() -> pd.DataFrame:
    rows = [
        {"model": model, "regime": regime, "bars": 1000, "sharpe": s, "total_return": s / 100}
        for model, offset in (("t2", 0.5), ("baseline:drift", 0.0), ("buy_and_hold", -0.2))
        for regime, s in zip(
            ("high_vol", "low_vol", "up_trend", "down_trend"),
            (1.0 + offset, 0.2 + offset, 2.0 + offset, -1.0 + offset),
            strict=True,
        )
    ]
    return pd.DataFrame(rows)


def gate(promoted: bool = False) -> dict[str, Any]:
    return {
        "promoted": promoted,
        "version": 3 if promoted else None,
        "reasons": ["worst fold Sharpe -1.10 below floor -0.50", EVIL],
        "dsr": 0.97,
        "thresholds": {"min_dsr": 0.95, "min_worst_fold_sharpe": -0.5},
    }


def render(tmp_path: Path, **overrides: Any) -> tuple[Path, str]:
    arguments: dict[str, Any] = {
        "title": "Sweep <BTCUSDT> report",
        "leaderboard": leaderboard_frame(),
        "equity_curves": {
            "t2": equity(2_000, 1),
            "baseline:drift": equity(2_000, 2),
            "buy_and_hold": equity(2_000, 3),
        },
        "fold_table": fold_frame(),
        "regime_table": regime_frame(),
        "gate": gate(),
        "notes": ["note with <tag>"],
        "generated_at": datetime(2024, 6, 1, 12, 0, tzinfo=UTC),
    }
    arguments.update(overrides)
    path = write_html_report(tmp_path / "out" / "report.html", **arguments).local_path()
    return path, path.read_text(encoding="utf-8")


def outside_plotly_js(page: str) -> str:
    """The page with the embedded library removed, i.e. everything this module wrote."""
    pattern = r"<script type=\"text/javascript\" id=\"plotly-js\">.*?</script>"
    return re.sub(pattern, "", page, count=1, flags=re.S)


# ----------------------------------------------------------------------------- leaderboard


def test_leaderboard_parquet_and_csv_round_trip_sorted_nan_last(tmp_path: Path) -> None:
    parquet_path, csv_path = local_paths(
        write_leaderboard(leaderboard_frame(), tmp_path / "new" / "dir")
    )
    assert parquet_path.name == "leaderboard.parquet" and csv_path.name == "leaderboard.csv"
    from_parquet = pd.read_parquet(parquet_path)
    from_csv = pd.read_csv(csv_path, float_precision="round_trip")
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False)
    assert list(from_parquet.columns) == list(leaderboard_frame().columns)
    assert list(from_parquet["trial_id"]) == ["t2", "t0", "t4", "t1", "t3"]
    assert from_parquet["score"].iloc[-2:].isna().all()
    expected = leaderboard_frame().set_index("trial_id").loc[from_parquet["trial_id"]]
    pd.testing.assert_frame_equal(
        from_parquet.set_index("trial_id"), expected, check_dtype=False, check_names=False
    )
    assert sorted(p.name for p in parquet_path.parent.iterdir()) == [
        "leaderboard.csv",
        "leaderboard.parquet",
    ]


def test_leaderboard_with_nested_hyperparameters_matches_in_both_files(tmp_path: Path) -> None:
    frame = leaderboard_frame().assign(
        layers=[[64, 32], [128], [32, 32, 16], [64], [256, 8]],
        extra=[{"a": 1}, None, "x", 2, np.int64(3)],
    )
    parquet_path, csv_path = local_paths(write_leaderboard(frame, tmp_path))
    from_parquet = pd.read_parquet(parquet_path)
    from_csv = pd.read_csv(csv_path, float_precision="round_trip")
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False)
    assert from_parquet.loc[0, "layers"] == "[32, 32, 16]"


def test_leaderboard_ties_keep_caller_order_and_rewrite_replaces(tmp_path: Path) -> None:
    frame = pd.DataFrame({"trial_id": ["a", "b", "c"], "score": [1.0, 2.0, 1.0]})
    write_leaderboard(frame, tmp_path)
    parquet_path, _ = local_paths(write_leaderboard(frame.assign(score=[3.0, 2.0, 1.0]), tmp_path))
    assert list(pd.read_parquet(parquet_path)["trial_id"]) == ["a", "b", "c"]
    assert list(report.sort_leaderboard(frame)["trial_id"]) == ["b", "a", "c"]


# ----------------------------------------------------------------------------- downsampling


def test_downsample_keeps_endpoints_extremes_and_bounds_points() -> None:
    curve = equity(500_000, 4)
    small = downsample_minmax(curve, 5_000)
    assert len(small) <= 5_000
    assert small.index[0] == curve.index[0] and small.index[-1] == curve.index[-1]
    assert small.max() == curve.max() and small.min() == curve.min()
    assert small.index.is_monotonic_increasing and small.index.isin(curve.index).all()
    deepest = downsample_minmax(drawdown(curve), 5_000)
    assert deepest.max() == drawdown(curve).max()


def test_downsample_leaves_short_series_and_drops_non_finite() -> None:
    curve = pd.Series([1.0, np.nan, 1.1, np.inf, 0.9])
    assert downsample_minmax(curve, 100).tolist() == [1.0, 1.1, 0.9]
    with pytest.raises(ValueError, match="at least 4"):
        downsample_minmax(curve, 3)


def test_drawdown_is_fraction_below_running_peak() -> None:
    result = drawdown(pd.Series([1.0, 1.2, 0.9, 1.3]))
    assert result.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.0])


# ----------------------------------------------------------------------------- HTML report


def test_report_has_every_section_and_escapes_text(tmp_path: Path) -> None:
    _, page = render(tmp_path)
    own = outside_plotly_js(page)
    for heading in SECTION_HEADINGS:
        assert f"<h2>{heading}</h2>" in own
    assert "<title>Sweep &lt;BTCUSDT&gt; report</title>" in own
    assert "<h1>Sweep &lt;BTCUSDT&gt; report</h1>" in own
    assert "2024-06-01 12:00:00 UTC" in own
    assert "NOT PROMOTED" in own
    assert "worst fold Sharpe -1.10 below floor -0.50" in own
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in own
    assert "<script>alert" not in page
    assert "note with &lt;tag&gt;" in own
    assert "min_dsr: 0.9500" in own
    # Every trial is listed, early-stopped and failed ones included.
    for trial in ("t0", "t1", "t2", "t3", "t4"):
        assert f"<td>{trial}</td>" in own
    assert 'class="status-early_stopped"' in own
    assert own.count("Plotly.newPlot(") == 4
    for div in ("fig-trials", "fig-equity", "fig-drawdown", "fig-regimes"):
        assert f'id="{div}"' in own


def test_report_embeds_plotly_once_and_nothing_external(tmp_path: Path) -> None:
    _, page = render(tmp_path)
    assert page.count(PLOTLY_HEADER) == 1
    own = outside_plotly_js(page)
    assert PLOTLY_HEADER not in own
    # Base64 chart data may spell "cdn" by chance, so look for addresses, not the letters.
    assert not re.search(r"(https?:)?//[\w.-]*cdn", own, re.I)
    assert not re.search(r"https?://", own, re.I)
    assert not re.search(r"<script[^>]*\bsrc=", page, re.I)
    assert not re.search(r"<link[^>]*\bhref=", page, re.I)


def test_promoted_gate_shows_version(tmp_path: Path) -> None:
    _, page = render(tmp_path, gate=gate(promoted=True))
    own = outside_plotly_js(page)
    assert "PROMOTED as version 3" in own and "NOT PROMOTED" not in own


def test_gate_without_boolean_decision_is_not_promoted(tmp_path: Path) -> None:
    _, page = render(tmp_path, gate={"promoted": "yes", "reasons": []})
    own = outside_plotly_js(page)
    assert "NOT PROMOTED" in own and "is not a boolean" in own


def test_long_equity_curve_stays_small(tmp_path: Path) -> None:
    curves = {
        "t2": equity(500_000, 5),
        "baseline:drift": equity(500_000, 6),
        "buy_and_hold": equity(500_000, 7),
    }
    path, page = render(tmp_path, equity_curves=curves)
    total = path.stat().st_size
    own = len(outside_plotly_js(page).encode())
    # plotly.js alone is ~4.8 MB; three 500k-bar curves (equity + drawdown) add well under 1 MB.
    assert own < 1_500_000, own
    assert total < 7_000_000, total
    assert "500000 -&gt; " in page


def test_empty_inputs_render_with_messages(tmp_path: Path) -> None:
    path, page = render(
        tmp_path,
        leaderboard=pd.DataFrame(),
        equity_curves={},
        fold_table=pd.DataFrame(),
        regime_table=pd.DataFrame(),
        gate={},
        notes=(),
    )
    own = outside_plotly_js(page)
    for heading in SECTION_HEADINGS:
        assert f"<h2>{heading}</h2>" in own
    assert "No trials were recorded." in own
    assert "No equity curves were provided." in own
    assert "No fold results were provided." in own
    assert "No regime results were provided." in own
    assert "NOT PROMOTED" in own and "did not state a decision" in own
    assert "Plotly.newPlot(" not in own
    assert page.count(PLOTLY_HEADER) == 1
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_no_completed_trials_renders_message(tmp_path: Path) -> None:
    board = leaderboard_frame().assign(status="early_stopped", score=np.nan)
    _, page = render(tmp_path, leaderboard=board)
    own = outside_plotly_js(page)
    assert "No trial completed" in own
    assert "No trial has a finite score to chart." in own
    assert "<td>t4</td>" in own


def test_report_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, first = render(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]

    def refuse(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        render(tmp_path, title="second")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    assert path.read_text(encoding="utf-8") == first


def test_pbo_section_shows_the_value_and_the_logit_histogram(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    result = probability_of_backtest_overfitting(rng.standard_normal((400, 5)), 8)
    _, page = render(tmp_path, pbo=result)
    own = outside_plotly_js(page)
    assert f"Probability of Backtest Overfitting: <b>{result.pbo:.3f}</b>" in own
    assert "S = 8 blocks, 70 splits" in own
    assert 'id="fig-pbo"' in own and own.count("Plotly.newPlot(") == 5


def test_pbo_section_says_when_pbo_is_undefined_or_missing(tmp_path: Path) -> None:
    undefined = probability_of_backtest_overfitting(np.zeros((100, 1)))
    _, page = render(tmp_path, pbo=undefined)
    own = outside_plotly_js(page)
    assert "PBO undefined: 1 trial(s): PBO needs at least 2 to choose among." in own
    assert 'id="fig-pbo"' not in own
    _, page = render(tmp_path)
    assert "was not computed" in outside_plotly_js(page)


def test_path_sharpe_section_plots_the_winners_paths_and_tabulates_each_record(
    tmp_path: Path,
) -> None:
    def distribution(sharpes: list[float]) -> PathDistribution:
        paths = np.array(sharpes)[:, None] / np.sqrt(525_600.0) + np.tile([1.0, -1.0], 50)
        return PathDistribution(4, 2, 103, 20, path_sharpe_distribution(paths * 1e-3, 525_600.0))

    winner = distribution([0.8, -0.2, 1.1])
    _, page = render(
        tmp_path, path_sharpes={"t2": winner, "buy_and_hold": distribution([0.3, 0.3, 0.3])}
    )
    own = outside_plotly_js(page)
    assert "N = 4 groups, k = 2 test groups, 3 backtest paths, purge 103" in own
    assert 'id="fig-path-sharpes"' in own and "Plotted: t2." in own
    assert f"{winner.sharpes.share_positive:.4g}" in own and "buy_and_hold" in own
    _, page = render(tmp_path)
    own = outside_plotly_js(page)
    assert 'id="fig-path-sharpes"' not in own and "Walk-forward folds give one" in own
