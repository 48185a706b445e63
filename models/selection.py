"""Model selection end to end: Silver -> folds -> sweep -> baselines -> gate -> registry -> report.

This is what `jobs.tune` runs. The best completed trial (highest walk-forward score) is always
registered as a new version, with its metrics and the gate's decision, so that a rejected
candidate stays inspectable; only a passing one moves the `production` alias. Every sweep also
gets its Probability of Backtest Overfitting (`models.pbo`, CSCV over the completed trials'
out-of-sample per-bar net returns), in the summary, the registered metadata and the report.

Under `folds.scheme: cpcv` the candidates and the references (buy-and-hold, the darts
baselines) are scored on the same CPCV paths (`models.evaluation.combine_paths`): a record's
score is its mean path net Sharpe, the summary's `path_sharpes` holds every completed trial's
distribution over paths, and the registered model is the split trained on the newest bars. The
DSR then counts every trial started, as under walk-forward, with T = the timeline's bars and the
paths' mean per-bar Sharpe, skew and kurtosis; PBO runs on the trials' path-average returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs.schema import ObjectStoreConfig, TuneJobConfig
from market.features.spec import SPEC_VERSION, spec_hash
from market.storage import Location, object_store_settings
from models.artifact import read_model_dir
from models.dataset import INPUT_COLUMNS, MarketArrays, cross_asset_columns, load_silver
from models.evaluation import (
    Evaluation,
    OutOfSampleBars,
    PathDistribution,
    baseline_predictions,
    cpcv_baselines,
    equity_curve,
    evaluate,
    evaluate_cpcv,
)
from models.folds import CpcvFolds, Fold, Schedule, sweep_schedule, training_units
from models.gate import GateDecision, apply_gate, candidate_dsr
from models.networks import ModelSpec
from models.pbo import PboResult, probability_of_backtest_overfitting
from models.registry import PRODUCTION, ModelRegistry, current_git_commit
from models.report import LEADERBOARD_METRICS, write_html_report, write_leaderboard
from models.runs import BUY_AND_HOLD, COMPLETED, RunDir, aligned_returns
from models.sweep import HYPERPARAMETERS, TrialOutcome, backtest_for, run_sweep, spec_of

BASELINE_PREFIX = "baseline:"
"""A darts baseline's reference name is this prefix and the baseline's name."""


@dataclass
class SelectionResult:
    summary: dict[str, Any]
    leaderboard: pd.DataFrame
    gate: GateDecision


@dataclass(frozen=True)
class ScoredRecord:
    """A record scored on the sweep's schedule, with its path Sharpe distribution under CPCV
    (None under walk-forward)."""

    evaluation: Evaluation
    paths: PathDistribution | None = None


def reference_evaluations(
    arrays: MarketArrays, schedule: Schedule, job: TuneJobConfig
) -> dict[str, ScoredRecord]:
    """Buy-and-hold and every darts baseline, scored on the same folds (or CPCV paths) as the
    candidates."""
    if isinstance(schedule, CpcvFolds):
        cpcv = {BUY_AND_HOLD: evaluate_cpcv(BUY_AND_HOLD, arrays, schedule, job.backtest, None)}
        cpcv.update(cpcv_baselines(arrays, schedule, job.backtest, job.seed, BASELINE_PREFIX))
        return {name: ScoredRecord(c.record, c.distribution) for name, c in cpcv.items()}
    folds = list(schedule)
    test = OutOfSampleBars.of(arrays, folds)
    references = {
        BUY_AND_HOLD: evaluate(BUY_AND_HOLD, arrays, folds, test, job.backtest, None, None)
    }
    for name, (predicted, p_up) in baseline_predictions(arrays, folds, test, job.seed).items():
        key = BASELINE_PREFIX + name
        references[key] = evaluate(key, arrays, folds, test, job.backtest, predicted, p_up)
    return {name: ScoredRecord(e) for name, e in references.items()}


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
    out_dir: str | Path | Location,
    *,
    shuffle_labels: bool = False,
    resume: bool = False,
    object_store: ObjectStoreConfig | None = None,
    progress: Callable[[str], None] = print,
) -> SelectionResult:
    """Sweep, score, gate and register; writes the reference records, leaderboard and report
    under `out_dir` (laid out as `models.runs` says), a local path or a URI, as is the
    registry; `object_store` reaches `s3://` locations (unset fields: the AWS environment).
    `resume` continues the sweep stored in `out_dir` (`models.sweep.run_sweep`)."""
    import ray

    started = time.perf_counter()
    settings = object_store_settings(object_store)
    run = RunDir(out_dir, settings)
    run.root.mkdir()
    arrays = load_silver(lake, job.symbols, settings)
    schedule = sweep_schedule(job, int(arrays.open_time_ms.min()), int(arrays.open_time_ms.max()))
    folds: list[Fold] = [] if isinstance(schedule, CpcvFolds) else list(schedule)
    progress(f"data: {arrays.bars} bars of {', '.join(arrays.symbols)}; {_describe(schedule)}")
    scored_references = reference_evaluations(arrays, schedule, job)
    for name, scored in scored_references.items():
        # Stored with the run so that readers (the dashboard) show the very reference the gate
        # compared against, not a re-scoring with other fees or symbols.
        run.reference(name).save(scored.evaluation, folds, scored.paths)
        progress(f"reference {name}: score {scored.evaluation.score:.3f}")
    references = {name: scored.evaluation for name, scored in scored_references.items()}
    data_ref = ray.put(arrays)
    outcomes = run_sweep(job, schedule, data_ref, run, shuffle_labels=shuffle_labels, resume=resume)
    completed = [o for o in outcomes if o.status == COMPLETED]
    stored = {o.trial_id: run.trial(o.trial_id).load() for o in completed}
    records = {tid: record.evaluation for tid, record in stored.items()}
    path_sharpes = {tid: r.paths for tid, r in stored.items() if r.paths is not None}
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
    if best is not None:
        best_config = next(o for o in completed if o.trial_id == best.name).config
        best_spec = spec_of(best_config, arrays.symbols)
        _refuse_unservable(decision, best_spec)

    registry = ModelRegistry(registry_uri, object_store=settings)
    decision.production_before = registry.get_alias(job.model_name, PRODUCTION)
    decision.production_after = decision.production_before
    if best is not None:
        best_outcome = next(o for o in completed if o.trial_id == best.name)
        decision.version = _register(
            registry,
            job,
            arrays,
            schedule,
            best,
            best_outcome,
            decision,
            references,
            run,
            pbo,
            path_sharpes.get(best.name),
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
    leaderboard_paths = write_leaderboard(board, run.root)
    reference_paths = {n: r.paths for n, r in scored_references.items() if r.paths is not None}
    report_path = _report(
        run, board, records, best, references, decision, pbo, path_sharpes, reference_paths
    )
    status_counts = {s: sum(o.status == s for o in outcomes) for s in {o.status for o in outcomes}}
    summary = {
        "trials": len(outcomes),
        "trial_status": status_counts,
        "scheme": job.folds.scheme,
        "folds": len(training_units(schedule)),
        "symbols": list(arrays.symbols),
        "best_trial": best.name if best else None,
        "best_score": best.score if best else None,
        "best_signal_hit_rate": best.metrics.get("signal_hit_rate") if best else None,
        "best_directional_accuracy": best.metrics.get("directional_accuracy") if best else None,
        "references": {name: ref.score for name, ref in references.items()},
        "pbo": pbo.pbo,
        "pbo_detail": pbo.summary(),
        "gate": decision.as_dict(),
        "path_sharpes": {tid: d.as_dict() for tid, d in sorted(path_sharpes.items())}
        if isinstance(schedule, CpcvFolds)
        else None,
        "leaderboard": str(leaderboard_paths[0]),
        "report": str(report_path),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return SelectionResult(summary=summary, leaderboard=board, gate=decision)


UNSERVABLE_LABELS: tuple[str, ...] = ("meta",)
"""Labels whose models Serve cannot decide on yet: a `meta` model's probability is about the
primary rule's side, which the signal engine does not compute."""


def _refuse_unservable(decision: GateDecision, spec: ModelSpec) -> None:
    """Keep a candidate that Serve could not run correctly out of production (it is still
    registered, with the reason): a `meta` label, whose decisions the signal engine does not
    compute, or cross-asset inputs, which it does not build (it computes each symbol's
    features apart)."""
    reasons = []
    if spec.label in UNSERVABLE_LABELS:
        reasons.append(
            f"label {spec.label!r} is research-only: Serve does not compute its decisions"
        )
    if spec.cross_asset_symbols:
        reasons.append("cross-asset inputs are research-only: Serve does not build them")
    if reasons:
        decision.reasons = [*([] if decision.promoted else decision.reasons), *reasons]
        decision.promoted = False


def _describe(schedule: Schedule) -> str:
    if isinstance(schedule, CpcvFolds):
        plan = schedule.plan
        return (
            f"CPCV N={plan.n_groups}, k={plan.k_test_groups}: {len(plan.splits)} splits, "
            f"{plan.n_paths} paths; purge {plan.purge_bars}, embargo {plan.embargo_bars} bars"
        )
    return f"{len(schedule)} walk-forward folds"


@dataclass(frozen=True)
class _Registered:
    """The model a sweep registers and the ranges it was trained, validated and scored on
    (epoch ms, half-open)."""

    index: int
    training: dict[str, Any]
    validation: dict[str, int]
    evaluated: dict[str, int]


def _registered(schedule: Schedule) -> _Registered:
    """Walk-forward: the most recent fold's model. CPCV: the split tested on the first k
    groups, which trains on the newest bars (its training runs listed under `ranges`)."""
    if isinstance(schedule, CpcvFolds):
        split = schedule.newest_split()
        return _Registered(
            index=split.index,
            training={
                "start_ms": split.train_ranges[0][0],
                "end_ms": split.train_ranges[-1][1],
                "ranges": [list(r) for r in split.train_ranges],
            },
            validation={"start_ms": split.val_start_ms, "end_ms": split.val_end_ms},
            evaluated={
                "start_ms": schedule.group_range_ms(0)[0],
                "end_ms": schedule.group_range_ms(schedule.plan.n_groups - 1)[1],
            },
        )
    first, last = schedule[0], schedule[-1]
    return _Registered(
        index=last.index,
        training={"start_ms": last.train_start_ms, "end_ms": last.train_end_ms},
        validation={"start_ms": last.val_start_ms, "end_ms": last.val_end_ms},
        evaluated={"start_ms": first.test_start_ms, "end_ms": last.test_end_ms},
    )


def _register(
    registry: ModelRegistry,
    job: TuneJobConfig,
    arrays: MarketArrays,
    schedule: Schedule,
    best: Evaluation,
    outcome: TrialOutcome,
    decision: GateDecision,
    references: dict[str, Evaluation],
    run: RunDir,
    pbo: PboResult,
    paths: PathDistribution | None,
) -> str:
    """Register the best trial's model trained on the newest data (`_registered`)."""
    chosen = _registered(schedule)
    files = read_model_dir(run.trial(best.name).fold(chosen.index))
    spec = spec_of(outcome.config, arrays.symbols)
    metadata = {
        "trial_id": best.name,
        "hyperparameters": {k: outcome.config.get(k) for k in HYPERPARAMETERS},
        "feature_spec_hash": spec_hash(),
        "feature_spec_version": SPEC_VERSION,
        "input_columns": [*INPUT_COLUMNS, *cross_asset_columns(spec.cross_asset_symbols)],
        "cross_asset_symbols": list(spec.cross_asset_symbols),
        "horizon_bars": spec.horizon_bars,
        "label": spec.label,
        "triple_barrier": job.triple_barrier.model_dump(mode="json")
        if spec.label in ("triple_barrier", "meta")
        else None,
        "meta_label": job.meta_label.model_dump(mode="json") if spec.label == "meta" else None,
        "symbols": list(arrays.symbols),
        "training_data_range": chosen.training,
        "validation_range": chosen.validation,
        "evaluated_range": chosen.evaluated,
        "fold_scheme": job.folds.model_dump(mode="json"),
        "cpcv_paths": None if paths is None else paths.as_dict(),
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
        "backtest": backtest_for(job.backtest, spec.horizon_bars).model_dump(mode="json"),
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
    path_sharpes: dict[str, PathDistribution],
    reference_paths: dict[str, PathDistribution],
) -> Location:
    top = sorted(records.values(), key=lambda r: r.score, reverse=True)[:3]
    shown_paths = (
        {}
        if best is None or best.name not in path_sharpes
        else {best.name: path_sharpes[best.name], **reference_paths}
    )
    shown = [*top, *references.values()]
    curves = {e.name: equity_curve(e) for e in shown}
    fold_table = pd.DataFrame([row for e in shown for row in e.fold_metrics])
    regime_table = pd.DataFrame([row for e in shown for row in e.regimes])
    return write_html_report(
        run.report,
        title=f"Quant-AI sweep: {'CPCV' if shown_paths else 'walk-forward'} after costs",
        leaderboard=board,
        equity_curves=curves,
        fold_table=fold_table,
        regime_table=regime_table,
        gate=decision.as_dict(),
        pbo=pbo,
        path_sharpes=shown_paths or None,
        notes=[
            "Sharpe: annualised from 1-minute net returns, sqrt(525,600) (24/7 markets).",
            "A decision at the close of bar t trades at the open of bar t+1.",
            f"Best trial: {best.name if best else 'none'}.",
        ],
    )
