"""Walk-forward scoring: out-of-sample predictions -> decisions -> backtest -> metrics.

The track record is every bar of every fold's test block, for every symbol. Each symbol trades
its own sleeve of equal capital; the portfolio's per-bar return is the mean of the sleeves'
returns at that minute. Fold scores are annualised net Sharpe ratios of the portfolio over each
test block (1-minute bars, 525,600 per year); a model's score is their mean. Blocks never span a
data gap, a fold boundary or a symbol: positions are flat at every break.

Under CPCV (`models.folds.CpcvFolds`) each backtest path is scored as above, its test blocks
being the N groups, each predicted by the split model the path assigns to it; as positions are
flat at every group boundary, a path's record is exactly its splits' group backtests laid end
to end (`models.cpcv.assemble_paths`). `combine_paths` turns the paths into one record:

* score: the mean over paths of the path's annualised net Sharpe ratio (`PathDistribution`
  keeps every path's, with quantiles, spread and the share above zero);
* metrics: the mean over paths of each path metric, so `sharpe_per_bar`, `skew`, `kurtosis`
  and `bars` (the DSR's inputs) are path means: T = the timeline's bars, each counted once;
* returns: per bar, the mean of the paths' net returns (each group's return averaged over the
  phi split models that tested it), the track record that PBO and the equity curve use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from configs.schema import BacktestConfig
from models.backtest import (
    BacktestResult,
    buy_and_hold,
    decide_signals,
    meta_signals,
    regime_breakdown,
    run_backtest,
)
from models.cpcv import PathSharpes, path_sharpe_distribution
from models.dataset import MarketArrays, window_ends
from models.folds import CpcvFolds, Fold
from models.metrics import annualised_sharpe, moments, performance_summary, sharpe_per_bar


@dataclass(frozen=True)
class OutOfSampleBars:
    """The rows (into MarketArrays) of every fold's test block, with their fold and block."""

    rows: np.ndarray  # int64, ascending (so grouped by symbol, then time)
    fold: np.ndarray  # int32 fold index per row
    block: np.ndarray  # int64 block id: new at a symbol, fold or segment change

    @classmethod
    def of(cls, arrays: MarketArrays, folds: Sequence[Fold]) -> OutOfSampleBars:
        fold_of = np.full(arrays.bars, -1, dtype=np.int32)
        for each in folds:
            inside = (arrays.open_time_ms >= each.test_start_ms) & (
                arrays.open_time_ms < each.test_end_ms
            )
            fold_of[inside] = each.index
        rows = np.flatnonzero(fold_of >= 0).astype(np.int64)
        fold = fold_of[rows]
        change = np.ones(len(rows), dtype=bool)
        change[1:] = (
            (np.diff(rows) != 1)
            | (np.diff(fold) != 0)
            | (np.diff(arrays.segment[rows]) != 0)
            | (np.diff(arrays.symbol_index[rows]) != 0)
        )
        return cls(rows=rows, fold=fold, block=np.cumsum(change) - 1)


@dataclass
class Evaluation:
    """A model's (or baseline's) out-of-sample record and its metrics."""

    name: str
    open_time_ms: np.ndarray  # portfolio timeline (each test minute once)
    returns: np.ndarray  # portfolio net per-bar simple returns
    metrics: dict[str, float]
    fold_metrics: list[dict[str, Any]]
    regimes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.metrics["score"]


def equity_curve(evaluation: Evaluation) -> pd.Series:
    """Equity of a record as a multiple of the starting capital, cumprod(1 + per-bar net
    returns), indexed by UTC bar open time and named after the record."""
    index = pd.to_datetime(evaluation.open_time_ms, unit="ms", utc=True)
    return pd.Series(
        np.cumprod(1.0 + np.asarray(evaluation.returns, dtype=np.float64)),
        index=index,
        name=evaluation.name,
    )


def _portfolio_timeline(
    arrays: MarketArrays, test: OutOfSampleBars
) -> tuple[np.ndarray, np.ndarray]:
    """The union test timeline and, per test row, its position on it."""
    timeline, where = np.unique(arrays.open_time_ms[test.rows], return_inverse=True)
    return timeline, where


def _portfolio_mean(
    timeline: np.ndarray, where: np.ndarray, per_row: np.ndarray, symbols: int
) -> np.ndarray:
    """Equal-weight mean over symbols of a per-row quantity at each timeline minute."""
    total = np.zeros(len(timeline))
    np.add.at(total, where, per_row)
    return total / max(1, symbols)


def _results_per_symbol(
    arrays: MarketArrays,
    test: OutOfSampleBars,
    signals: np.ndarray | None,
    config: BacktestConfig,
    p_up: np.ndarray | None = None,
) -> list[tuple[np.ndarray, BacktestResult]]:
    """Backtest each symbol's test rows; `signals` None means buy-and-hold; `p_up` sizes the
    positions under probability sizing."""
    out = []
    symbol_of_row = arrays.symbol_index[test.rows]
    for code in range(len(arrays.symbols)):
        mask = symbol_of_row == code
        if not mask.any():
            continue
        rows = test.rows[mask]
        blocks = test.block[mask]
        if signals is None:
            result = buy_and_hold(arrays.open[rows], blocks, config)
        else:
            sizing_p = None if p_up is None else p_up[mask]
            result = run_backtest(arrays.open[rows], signals[mask], blocks, config, sizing_p)
        out.append((mask, result))
    return out


def evaluate(
    name: str,
    arrays: MarketArrays,
    folds: Sequence[Fold],
    test: OutOfSampleBars,
    config: BacktestConfig,
    predicted_return: np.ndarray | None,
    p_up: np.ndarray | None,
) -> Evaluation:
    """Score predictions aligned with `test.rows` (NaN = no opinion); None = buy-and-hold.

    Under the `meta` label `p_up` is the meta model's probability that the primary side clears
    the cost, and the decisions are `meta_signals` of the arrays' `primary_side`."""
    signals = None
    side = None if arrays.primary_side is None else arrays.primary_side[test.rows]
    if predicted_return is not None and p_up is not None:
        if side is not None:
            signals = meta_signals(p_up, side, config)
        else:
            signals = decide_signals(p_up, predicted_return, config)
    per_symbol = _results_per_symbol(arrays, test, signals, config, p_up)
    row_returns = np.zeros(len(test.rows))
    row_positions = np.zeros(len(test.rows))
    trade_pnls = []
    for mask, result in per_symbol:
        row_returns[mask] = result.returns
        row_positions[mask] = result.positions
        trade_pnls.append(result.trade_pnls)
    timeline, where = _portfolio_timeline(arrays, test)
    returns = _portfolio_mean(timeline, where, row_returns, len(arrays.symbols))
    positions = _portfolio_mean(timeline, where, row_positions, len(arrays.symbols))
    pnls = np.concatenate(trade_pnls) if trade_pnls else np.zeros(0)
    metrics = dict(performance_summary(returns, positions, config.bars_per_year, pnls))

    fold_metrics: list[dict[str, Any]] = []
    for fold in folds:
        inside = (timeline >= fold.test_start_ms) & (timeline < fold.test_end_ms)
        summary = performance_summary(returns[inside], positions[inside], config.bars_per_year)
        fold_metrics.append(
            {
                "model": name,
                "fold": fold.index,
                "train_start_ms": fold.train_start_ms,
                "train_end_ms": fold.train_end_ms,
                "test_start_ms": fold.test_start_ms,
                "test_end_ms": fold.test_end_ms,
                **{k: summary[k] for k in ("sharpe", "total_return", "max_drawdown", "exposure")},
            }
        )
    fold_sharpes = np.array([f["sharpe"] for f in fold_metrics])
    skew, kurtosis = moments(returns)
    metrics.update(
        {
            "score": float(fold_sharpes.mean()),
            "worst_fold_sharpe": float(fold_sharpes.min()),
            "sharpe_per_bar": sharpe_per_bar(returns),
            "skew": skew,
            "kurtosis": kurtosis,
            "bars": float(len(returns)),
        }
    )
    metrics.update(
        _fee_scenarios(arrays, folds, test, signals, p_up, config, timeline, where, metrics)
    )
    target_ret = arrays.target_ret[test.rows]
    if signals is not None:
        direction_up = arrays.target_up if arrays.direction_up is None else arrays.direction_up
        metrics.update(
            _directional(signals, p_up, target_ret, direction_up[test.rows])
            if side is None
            else _meta_directional(signals, p_up, side, direction_up[test.rows], arrays, test)
        )
    regimes = regime_breakdown(
        row_returns, arrays.close[test.rows], test.block, config.bars_per_year
    )
    return Evaluation(
        name=name,
        open_time_ms=timeline,
        returns=returns,
        metrics=metrics,
        fold_metrics=fold_metrics,
        regimes=[{"model": name, **r} for r in regimes],
    )


FEE_SIDES: tuple[str, ...] = ("taker", "maker")
"""The execution scenarios every record is scored under: all fills at the taker fee, all at the
maker fee (`BacktestConfig.taker_fee_bps` / `maker_fee_bps`, slippage alike)."""


def _fee_scenarios(
    arrays: MarketArrays,
    folds: Sequence[Fold],
    test: OutOfSampleBars,
    signals: np.ndarray | None,
    p_up: np.ndarray | None,
    config: BacktestConfig,
    timeline: np.ndarray,
    where: np.ndarray,
    configured: dict[str, float],
) -> dict[str, float]:
    """`score_<side>`, `sharpe_<side>` and `total_return_<side>` for each fee side.

    The decisions and positions stay those of the configured side (its fees set the edge a
    signal must clear); only the fee charged on the fills changes. The configured side's
    figures are the record's own `score`, `sharpe` and `total_return`; the other side's come
    from backtesting the same signals again with its fee.
    """
    out: dict[str, float] = {}
    for side in FEE_SIDES:
        if side == config.fee_side:
            score, sharpe = configured["score"], configured["sharpe"]
            total_return = configured["total_return"]
        else:
            other = config.model_copy(update={"fee_side": side})
            row_returns = np.zeros(len(test.rows))
            for mask, result in _results_per_symbol(arrays, test, signals, other, p_up):
                row_returns[mask] = result.returns
            returns = _portfolio_mean(timeline, where, row_returns, len(arrays.symbols))
            fold_sharpes = [
                annualised_sharpe(
                    returns[(timeline >= fold.test_start_ms) & (timeline < fold.test_end_ms)],
                    config.bars_per_year,
                )
                for fold in folds
            ]
            score = float(np.mean(fold_sharpes))
            sharpe = annualised_sharpe(returns, config.bars_per_year)
            total_return = float(np.prod(1.0 + returns)) - 1.0
        out[f"score_{side}"] = score
        out[f"sharpe_{side}"] = sharpe
        out[f"total_return_{side}"] = total_return
    return out


def _directional(
    signals: np.ndarray, p_up: np.ndarray | None, target_ret: np.ndarray, target_up: np.ndarray
) -> dict[str, float]:
    """Signal hit rate (BUY/SELL bars whose horizon return had the signal's sign) and the
    directional accuracy of P(up) > 0.5 against the horizon's up/down (`target_up`, 1/0)
    on every bar with a prediction and a known target."""
    known = np.isfinite(target_ret)
    traded = known & (signals != 0)
    hits = np.sign(target_ret[traded]) == signals[traded]
    out = {
        "signal_hit_rate": float(hits.mean()) if traded.any() else float("nan"),
        "signal_bars": float(traded.sum()),
    }
    if p_up is not None:
        scored = known & np.isfinite(p_up)
        correct = (p_up[scored] > 0.5) == (target_up[scored] > 0.5)
        out["directional_accuracy"] = float(correct.mean()) if scored.any() else float("nan")
    return out


def _meta_directional(
    signals: np.ndarray,
    p_meta: np.ndarray | None,
    side: np.ndarray,
    direction_up: np.ndarray,
    arrays: MarketArrays,
    test: OutOfSampleBars,
) -> dict[str, float]:
    """`signal_hit_rate` as for a direction model; `directional_accuracy`: how often the
    primary side is the horizon's direction on the bars the meta model accepts (p > 0.5);
    `meta_accuracy`: how often (p > 0.5) equals the meta label."""
    out = _directional(signals, None, arrays.target_ret[test.rows], direction_up)
    if p_meta is None:
        return out
    meta = arrays.target_up[test.rows]
    known = np.isfinite(p_meta) & np.isfinite(meta) & np.isfinite(direction_up) & (side != 0)
    accepted = known & (p_meta > 0.5)
    up = direction_up[accepted] > 0.5
    out["directional_accuracy"] = (
        float(np.mean(up == (side[accepted] > 0))) if accepted.any() else float("nan")
    )
    agrees = (p_meta[known] > 0.5) == (meta[known] > 0.5)
    out["meta_accuracy"] = float(agrees.mean()) if known.any() else float("nan")
    return out


def model_predictions(
    arrays: MarketArrays,
    folds: Sequence[Fold],
    test: OutOfSampleBars,
    fold_models: Sequence[Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Each fold's model (a LoadedModel) predicts its own test block, aligned to `test.rows`."""
    predicted = np.full(len(test.rows), np.nan)
    p_up = np.full(len(test.rows), np.nan)
    position = np.full(arrays.bars, -1, dtype=np.int64)
    position[test.rows] = np.arange(len(test.rows))
    for fold, model in zip(folds, fold_models, strict=True):
        ends = window_ends(
            arrays, fold.test_start_ms, fold.test_end_ms, model.spec.window_bars, labelled=False
        )
        if len(ends) == 0:
            continue
        ret, prob = model.predict_ends(arrays.inputs, ends)
        predicted[position[ends]] = ret
        p_up[position[ends]] = prob
    return predicted, p_up


def baseline_predictions(
    arrays: MarketArrays, folds: Sequence[Fold], test: OutOfSampleBars, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """darts baselines fitted per fold and symbol on the training range, aligned to test.rows."""
    from models.baselines import darts_baselines

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    symbol_of_row = arrays.symbol_index[test.rows]
    for fold in folds:
        for code in range(len(arrays.symbols)):
            mask = (test.fold == fold.index) & (symbol_of_row == code)
            if not mask.any():
                continue
            in_train = (
                (arrays.symbol_index == code)
                & (arrays.open_time_ms >= fold.train_start_ms)
                & (arrays.open_time_ms < fold.train_end_ms)
            )
            forecasts = darts_baselines(
                arrays.close[in_train],
                arrays.close[test.rows[mask]],
                test.block[mask],
                seed=seed,
            )
            for forecast in forecasts:
                predicted, p_up = out.setdefault(
                    forecast.name,
                    (np.full(len(test.rows), np.nan), np.full(len(test.rows), np.nan)),
                )
                predicted[mask] = forecast.predicted_return
                p_up[mask] = forecast.p_up
    return out


@dataclass(frozen=True)
class PathDistribution:
    """A CPCV record's out-of-sample annualised net Sharpe ratio over its backtest paths, and
    the set-up that made them (groups N, test groups k, purge and embargo in bars)."""

    groups: int
    test_groups: int
    purge_bars: int
    embargo_bars: int
    sharpes: PathSharpes

    @property
    def paths(self) -> int:
        return len(self.sharpes.sharpes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the set-up and `PathSharpes.summary()` (path count, every path's Sharpe,
        quantiles, mean, std, share_positive)."""
        return {
            "groups": self.groups,
            "test_groups": self.test_groups,
            "purge_bars": self.purge_bars,
            "embargo_bars": self.embargo_bars,
            **self.sharpes.summary(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PathDistribution:
        return cls(
            groups=int(data["groups"]),
            test_groups=int(data["test_groups"]),
            purge_bars=int(data["purge_bars"]),
            embargo_bars=int(data["embargo_bars"]),
            sharpes=PathSharpes.from_summary(data),
        )


@dataclass(frozen=True)
class CpcvEvaluation:
    """A CPCV record (see the module) and its distribution of path Sharpe ratios."""

    record: Evaluation
    distribution: PathDistribution


def cpcv_path_bars(arrays: MarketArrays, cpcv: CpcvFolds, path: int) -> OutOfSampleBars:
    """The out-of-sample rows of a CPCV path: every bar of every group, a block breaking at each
    group boundary (the same rows for every path)."""
    return OutOfSampleBars.of(arrays, cpcv.path_folds(path))


def combine_paths(
    name: str, cpcv: CpcvFolds, paths: Sequence[Evaluation], bars_per_year: float
) -> CpcvEvaluation:
    """One CPCV record named `name` from the `evaluate` record of every path, in path order."""
    if len(paths) != cpcv.plan.n_paths:
        raise ValueError(f"{len(paths)} path records for {cpcv.plan.n_paths} paths")
    timeline = paths[0].open_time_ms
    if any(not np.array_equal(p.open_time_ms, timeline) for p in paths[1:]):
        raise ValueError("CPCV paths must be scored on the same minutes")
    path_returns = np.vstack([p.returns for p in paths])
    sharpes = path_sharpe_distribution(path_returns, bars_per_year)
    metrics = {key: float(np.mean([p.metrics[key] for p in paths])) for key in paths[0].metrics}
    metrics["score"] = sharpes.mean
    for side in FEE_SIDES:
        # A path's scenario score, like its score, is its whole-path Sharpe.
        if f"sharpe_{side}" in metrics:
            metrics[f"score_{side}"] = metrics[f"sharpe_{side}"]
    plan = cpcv.plan
    return CpcvEvaluation(
        record=Evaluation(
            name=name,
            open_time_ms=timeline,
            returns=path_returns.mean(axis=0),
            metrics=metrics,
            fold_metrics=[
                {**row, "path": index} for index, p in enumerate(paths) for row in p.fold_metrics
            ],
            regimes=[{**row, "path": index} for index, p in enumerate(paths) for row in p.regimes],
        ),
        distribution=PathDistribution(
            groups=plan.n_groups,
            test_groups=plan.k_test_groups,
            purge_bars=plan.purge_bars,
            embargo_bars=plan.embargo_bars,
            sharpes=sharpes,
        ),
    )


def evaluate_cpcv(
    name: str,
    arrays: MarketArrays,
    cpcv: CpcvFolds,
    config: BacktestConfig,
    split_models: Sequence[Any] | None,
) -> CpcvEvaluation:
    """Score a candidate's split models (LoadedModels in `cpcv.splits` order) on every CPCV path;
    None scores buy-and-hold on the same paths."""
    paths = []
    for path in range(cpcv.plan.n_paths):
        folds = cpcv.path_folds(path)
        test = cpcv_path_bars(arrays, cpcv, path)
        predicted = p_up = None
        if split_models is not None:
            models = cpcv.path_models(path, split_models)
            predicted, p_up = model_predictions(arrays, folds, test, models)
        paths.append(evaluate(name, arrays, folds, test, config, predicted, p_up))
    return combine_paths(name, cpcv, paths, config.bars_per_year)


def cpcv_baselines(
    arrays: MarketArrays, cpcv: CpcvFolds, config: BacktestConfig, seed: int, prefix: str
) -> dict[str, CpcvEvaluation]:
    """Every darts baseline on the CPCV paths, fitted per split on the split's longest
    contiguous training run (the train range of its `path_folds` blocks); each record is named,
    and keyed, `prefix` + the baseline's name."""
    paths: dict[str, list[Evaluation]] = {}
    for path in range(cpcv.plan.n_paths):
        folds = cpcv.path_folds(path)
        test = cpcv_path_bars(arrays, cpcv, path)
        for model, (predicted, p_up) in baseline_predictions(arrays, folds, test, seed).items():
            name = prefix + model
            paths.setdefault(name, []).append(
                evaluate(name, arrays, folds, test, config, predicted, p_up)
            )
    return {
        name: combine_paths(name, cpcv, records, config.bars_per_year)
        for name, records in paths.items()
    }
