"""Model selection end to end: Silver -> folds -> sweep -> baselines -> gate -> registry -> report.

This is what `jobs.tune` runs. The best completed trial (highest walk-forward score) is always
registered as a new version, with its metrics and the gate's decision, so that a rejected
candidate stays inspectable; only a passing one moves the `production` alias. Every sweep also
gets its Probability of Backtest Overfitting (`models.pbo`, CSCV over the completed trials'
out-of-sample per-bar net returns), in the summary, the registered metadata and the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs.schema import TuneJobConfig
from market.features.spec import HORIZON_BARS, SPEC_VERSION, spec_hash
from models.artifact import read_model_dir
from models.dataset import INPUT_COLUMNS, MarketArrays, load_silver
from models.evaluation import (
    Evaluation,
    OutOfSampleBars,
    baseline_predictions,
    equity_curve,
    evaluate,
)
from models.folds import Fold, make_folds
from models.gate import GateDecision, apply_gate, candidate_dsr
from models.pbo import PboResult, probability_of_backtest_overfitting
from models.registry import PRODUCTION, ModelRegistry, current_git_commit
from models.report import LEADERBOARD_METRICS, write_html_report, write_leaderboard
from models.runs import BUY_AND_HOLD, COMPLETED, RunDir, aligned_returns
from models.sweep import HYPERPARAMETERS, TrialOutcome, run_sweep


@dataclass
class SelectionResult:
    summary: dict[str, Any]
    leaderboard: pd.DataFrame
    gate: GateDecision


def reference_evaluations(
    arrays: MarketArrays, folds: list[Fold], test: OutOfSampleBars, job: TuneJobConfig
) -> dict[str, Evaluation]:
    """Buy-and-hold and every darts baseline, scored on the same folds as the candidates."""
    references = {
        BUY_AND_HOLD: evaluate(BUY_AND_HOLD, arrays, folds, test, job.backtest, None, None)
    }
    for name, (predicted, p_up) in baseline_predictions(arrays, folds, test, job.seed).items():
        key = f"baseline:{name}"
        references[key] = evaluate(key, arrays, folds, test, job.backtest, predicted, p_up)
    return references


def leaderboard_frame(outcomes: list[TrialOutcome], dsr: dict[str, float]) -> pd.DataFrame:
    rows = []
    for outcome in outcomes:
        row: dict[str, Any] = {
            "trial_id": outcome.trial_id,
            "status": outcome.status,
            "iterations": outcome.iterations,
            "dsr": dsr.get(outcome.trial_id, float("nan")),
            "error": outcome.error or "",
        }
        completed = outcome.status == COMPLETED
        for key in LEADERBOARD_METRICS:
            value = outcome.metrics.get(key) if completed or key == "val_loss" else None
            row[key] = float(value) if value is not None else float("nan")
        for key in HYPERPARAMETERS:
            value = outcome.config.get(key)
            row[key] = str(value) if isinstance(value, list) else value
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_pbo(records: list[Evaluation], partitions: int) -> PboResult:
    """PBO by CSCV over the completed trials' out-of-sample per-bar net returns (T bars x N
    trials on their shared test minutes), with `partitions` blocks asked for."""
    return probability_of_backtest_overfitting(aligned_returns(records).returns, partitions)


def run_selection(
    lake: str,
    registry_uri: str,
    job: TuneJobConfig,
    out_dir: Path,
    *,
    shuffle_labels: bool = False,
    progress: Callable[[str], None] = print,
) -> SelectionResult:
    """Sweep, score, gate and register; writes the reference records, leaderboard and report
    under `out_dir` (laid out as `models.runs` says)."""
    import ray

    started = time.perf_counter()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = load_silver(lake, job.symbols)
    folds = make_folds(int(arrays.open_time_ms.min()), int(arrays.open_time_ms.max()), job.folds)
    test = OutOfSampleBars.of(arrays, folds)
    progress(
        f"data: {arrays.bars} bars of {', '.join(arrays.symbols)}; {len(folds)} folds; "
        f"{len(test.rows)} test bars"
    )
    run = RunDir(out_dir)
    references = reference_evaluations(arrays, folds, test, job)
    for name, reference in references.items():
        # Stored with the run so that readers (the dashboard) show the very reference the gate
        # compared against, not a re-scoring with other fees or symbols.
        run.reference(name).save(reference, folds)
        progress(f"reference {name}: score {reference.score:.3f}")
    data_ref = ray.put(arrays)
    outcomes = run_sweep(job, folds, data_ref, out_dir, shuffle_labels=shuffle_labels)
    completed = [o for o in outcomes if o.status == COMPLETED]
    records = {o.trial_id: run.trial(o.trial_id).load().evaluation for o in completed}
    trial_srs = [r.metrics["sharpe_per_bar"] for r in records.values()]
    dsr = {tid: candidate_dsr(r, trial_srs, len(outcomes)) for tid, r in records.items()}
    best = max(records.values(), key=lambda r: r.score, default=None)
    pbo = sweep_pbo(list(records.values()), job.gate.pbo_partitions)
    progress(
        f"PBO {pbo.pbo:.3f} over {pbo.trials} trials, S={pbo.partitions}"
        if pbo.pbo is not None
        else f"PBO undefined: {pbo.reason}"
    )
    decision = apply_gate(best, trial_srs, len(outcomes), references, job.gate, pbo.pbo)

    registry = ModelRegistry(registry_uri)
    decision.production_before = registry.get_alias(job.model_name, PRODUCTION)
    decision.production_after = decision.production_before
    if best is not None:
        best_outcome = next(o for o in completed if o.trial_id == best.name)
        decision.version = _register(
            registry, job, arrays, folds, best, best_outcome, decision, references, run, pbo
        )
        if decision.promoted:
            registry.set_alias(
                job.model_name,
                PRODUCTION,
                decision.version,
                reason=f"gate passed: DSR {decision.dsr:.4f}, score {best.score:.3f}",
            )
            decision.production_after = decision.version
    board = leaderboard_frame(outcomes, dsr)
    leaderboard_paths = write_leaderboard(board, out_dir)
    report_path = _report(run, board, records, best, references, decision, pbo)
    status_counts = {s: sum(o.status == s for o in outcomes) for s in {o.status for o in outcomes}}
    summary = {
        "trials": len(outcomes),
        "trial_status": status_counts,
        "folds": len(folds),
        "symbols": list(arrays.symbols),
        "best_trial": best.name if best else None,
        "best_score": best.score if best else None,
        "best_signal_hit_rate": best.metrics.get("signal_hit_rate") if best else None,
        "best_directional_accuracy": best.metrics.get("directional_accuracy") if best else None,
        "references": {name: ref.score for name, ref in references.items()},
        "pbo": pbo.pbo,
        "pbo_detail": pbo.summary(),
        "gate": decision.as_dict(),
        "leaderboard": str(leaderboard_paths[0]),
        "report": str(report_path),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return SelectionResult(summary=summary, leaderboard=board, gate=decision)


def _register(
    registry: ModelRegistry,
    job: TuneJobConfig,
    arrays: MarketArrays,
    folds: list[Fold],
    best: Evaluation,
    outcome: TrialOutcome,
    decision: GateDecision,
    references: dict[str, Evaluation],
    run: RunDir,
    pbo: PboResult,
) -> str:
    """Register the best trial's model of the most recent fold (the newest training data)."""
    last = folds[-1]
    files = read_model_dir(run.trial(best.name).fold(last.index))
    metadata = {
        "trial_id": best.name,
        "hyperparameters": {k: outcome.config.get(k) for k in HYPERPARAMETERS},
        "feature_spec_hash": spec_hash(),
        "feature_spec_version": SPEC_VERSION,
        "input_columns": list(INPUT_COLUMNS),
        "horizon_bars": HORIZON_BARS,
        "symbols": list(arrays.symbols),
        "training_data_range": {"start_ms": last.train_start_ms, "end_ms": last.train_end_ms},
        "validation_range": {"start_ms": last.val_start_ms, "end_ms": last.val_end_ms},
        "evaluated_range": {"start_ms": folds[0].test_start_ms, "end_ms": last.test_end_ms},
        "seed": job.seed,
        "metrics": best.metrics,
        "references": {name: ref.score for name, ref in references.items()},
        "gate": {
            "promoted": decision.promoted,
            "dsr": decision.dsr,
            "pbo": decision.pbo,
            "reasons": decision.reasons,
        },
        "pbo": pbo.pbo,
        "pbo_detail": pbo.summary(),
        "backtest": job.backtest.model_dump(mode="json"),
        "git_commit": current_git_commit(),
    }
    return registry.register(job.model_name, files, _jsonable(metadata))


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (the registry refuses NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _report(
    run: RunDir,
    board: pd.DataFrame,
    records: dict[str, Evaluation],
    best: Evaluation | None,
    references: dict[str, Evaluation],
    decision: GateDecision,
    pbo: PboResult,
) -> Path:
    top = sorted(records.values(), key=lambda r: r.score, reverse=True)[:3]
    shown = [*top, *references.values()]
    curves = {e.name: equity_curve(e) for e in shown}
    fold_table = pd.DataFrame([row for e in shown for row in e.fold_metrics])
    regime_table = pd.DataFrame([row for e in shown for row in e.regimes])
    return write_html_report(
        run.report,
        title="Quant-AI sweep: walk-forward after costs",
        leaderboard=board,
        equity_curves=curves,
        fold_table=fold_table,
        regime_table=regime_table,
        gate=decision.as_dict(),
        pbo=pbo,
        notes=[
            "Sharpe: annualised from 1-minute net returns, sqrt(525,600) (24/7 markets).",
            "A decision at the close of bar t trades at the open of bar t+1.",
            f"Best trial: {best.name if best else 'none'}.",
        ],
    )
