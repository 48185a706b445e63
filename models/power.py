"""The detection-power study: what the sweep and its gate find, and what they wrongly promote.

Each run simulates a market (`market.sources.sim`) with a planted signal of one strength and one
seed, or a pure random walk (strength 0), writes its Silver, and runs the real selection
(`models.selection.run_selection`: Ray Tune sweep, walk-forward or CPCV scoring after costs,
references, PBO and the promotion gate). The runs fan out over the Ray cluster as Ray tasks.

The simulator's knob (`SimConfig.signal_strength`) means little to a user, so each run also
measures its planted component in user units, on the sweep's out-of-sample bars (the test
blocks of its folds; under CPCV every group) at a horizon of H bars:

- planted accuracy: how often the sign of the latent signal x_t, known at the close of bar t,
  matches the sign of the H-bar forward log return ln(close[t+H] / close[t]);
- oracle Sharpe: the gross (no fees) annualised Sharpe of an oracle that holds sign(x_t) for H
  bars from decisions every H bars, from its per-hold log returns annualised with
  sqrt(bars_per_year / H).

A strength counts as detected when at least `detection_rate` of its seeds are promoted;
`min_detectable_accuracy` is the smallest planted accuracy (median over its seeds) of a
detected strength, None when none is. A random walk promoted is a false promotion.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from configs.schema import PowerStudyConfig, SimConfig
from market.sources.sim import SimBars, simulate_symbols
from market.storage import Location, as_location
from models.folds import CpcvFolds, Schedule, sweep_schedule
from models.metrics import annualised_sharpe

PLANTED: Literal["planted"] = "planted"
RANDOM_WALK: Literal["random_walk"] = "random_walk"
RunKind = Literal["planted", "random_walk"]

RUNS_CSV = "power_runs.csv"
RUNS_PARQUET = "power_runs.parquet"
STRENGTHS_CSV = "power_strengths.csv"
REPORT_HTML = "power_report.html"
RUNS_DIR = "runs"


# --------------------------------------------------------------------------------------------
# The planted component in user units


@dataclass(frozen=True)
class PlantedMeasure:
    """The planted component on out-of-sample bars at a horizon of `horizon_bars` bars.

    `accuracy`: fraction of the `bars` decision bars where sign(x_t) matched the sign of the
    forward log return (bars with a zero return or signal left out). `oracle_sharpe`: gross
    annualised Sharpe of the oracle's `holds` non-overlapping H-bar holds. NaN when there was
    nothing to measure."""

    accuracy: float
    oracle_sharpe: float
    bars: int
    holds: int


def forward_log_returns(close: np.ndarray, present: np.ndarray, horizon_bars: int) -> np.ndarray:
    """ln(close[t + H] / close[t]) for each minute t of one symbol's minute grid; NaN where a
    bar from t to t + H is missing (the label would cross an outage) or t + H lies past the
    end."""
    n = len(close)
    forward = np.full(n, np.nan)
    if n <= horizon_bars:
        return forward
    # missing_before[i]: missing bars among the first i minutes.
    missing_before = np.concatenate([[0], np.cumsum(~np.asarray(present, dtype=bool))])
    t = np.arange(n - horizon_bars)
    whole = missing_before[t + horizon_bars + 1] - missing_before[t] == 0
    ends = t[whole]
    forward[ends] = np.log(close[ends + horizon_bars] / close[ends])
    return forward


def directional_hits(signal: np.ndarray, forward: np.ndarray) -> tuple[int, int]:
    """(hits, decisions): bars where sign(signal) equals the sign of a finite, non-zero
    forward return, among the bars with both signs defined."""
    scored = np.isfinite(forward) & (forward != 0) & (signal != 0)
    hits = int(np.sum(np.sign(signal[scored]) == np.sign(forward[scored])))
    return hits, int(np.sum(scored))


def oracle_hold_returns(signal: np.ndarray, forward: np.ndarray, horizon_bars: int) -> np.ndarray:
    """Gross log returns of holding sign(signal[t]) for `horizon_bars` bars from decisions at
    t = 0, H, 2H, ... of one contiguous block; holds whose forward return is undefined are
    skipped (flat)."""
    decisions = np.arange(0, len(signal), horizon_bars)
    held = np.sign(signal[decisions]) * forward[decisions]
    return held[np.isfinite(held)]


def hold_sharpe(hold_returns: np.ndarray, horizon_bars: int, bars_per_year: float) -> float:
    """Annualised Sharpe of per-hold returns, each hold `horizon_bars` bars long:
    mean / std (ddof=1) x sqrt(bars_per_year / H). NaN with fewer than 2 holds."""
    if len(hold_returns) < 2:
        return float("nan")
    return annualised_sharpe(hold_returns, bars_per_year / horizon_bars)


def out_of_sample_ranges(schedule: Schedule) -> list[tuple[int, int]]:
    """The half-open [start, end) open-time ranges (epoch ms) the sweep scores: each
    walk-forward fold's test block, or every CPCV group (each group is tested once per path)."""
    if isinstance(schedule, CpcvFolds):
        return [schedule.group_range_ms(g) for g in range(schedule.plan.n_groups)]
    return [(fold.test_start_ms, fold.test_end_ms) for fold in schedule]


def measure_planted(
    block: SimBars,
    ranges_ms: Sequence[tuple[int, int]],
    horizon_bars: int,
    bars_per_year: float,
) -> PlantedMeasure:
    """The planted component of every symbol of `block` on the bars opening in `ranges_ms`
    (half-open, epoch ms), pooled over symbols and ranges (see `PlantedMeasure`)."""
    hits = decisions = 0
    holds: list[np.ndarray] = []
    for k in range(block.close.shape[0]):
        times = block.open_time_ms[k]
        forward = forward_log_returns(block.close[k], block.present[k], horizon_bars)
        for start_ms, end_ms in ranges_ms:
            lo, hi = np.searchsorted(times, [start_ms, end_ms])
            signal = block.planted_signal[k, lo:hi]
            block_hits, block_decisions = directional_hits(signal, forward[lo:hi])
            hits += block_hits
            decisions += block_decisions
            holds.append(oracle_hold_returns(signal, forward[lo:hi], horizon_bars))
    held = np.concatenate(holds) if holds else np.empty(0)
    return PlantedMeasure(
        accuracy=hits / decisions if decisions else float("nan"),
        oracle_sharpe=hold_sharpe(held, horizon_bars, bars_per_year),
        bars=decisions,
        holds=len(held),
    )


def planted_measure_of(config: PowerStudyConfig, sim: SimConfig) -> PlantedMeasure:
    """The planted component of the market `sim` simulates, on the out-of-sample bars of the
    schedule the sweep of `config.tune` cuts from it."""
    block = simulate_symbols(sim, list(config.symbols), config.days)
    times = block.open_time_ms[block.present]
    job = config.tune
    schedule = sweep_schedule(job, int(times.min()), int(times.max()))
    return measure_planted(
        block,
        out_of_sample_ranges(schedule),
        config.accuracy_horizon_bars,
        job.backtest.bars_per_year,
    )


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class PlannedRun:
    """One market of the study: `strength` 0 for a random walk."""

    kind: RunKind
    strength: float
    seed: int

    @property
    def name(self) -> str:
        if self.kind == RANDOM_WALK:
            return f"random_walk-seed{self.seed}"
        return f"planted-{self.strength:g}-seed{self.seed}"


def plan_runs(config: PowerStudyConfig) -> list[PlannedRun]:
    """Every planted strength x seed, then every random-walk seed."""
    planted = [PlannedRun(PLANTED, s, seed) for s in config.strengths for seed in config.seeds]
    walks = [PlannedRun(RANDOM_WALK, 0.0, seed) for seed in config.random_walk_seeds]
    return planted + walks


@dataclass(frozen=True)
class PowerRun:
    """What one run's sweep and gate gave. Scores are the sweep's (mean fold or path net
    Sharpe, annualised); `dsr` NaN and `winning_score` None when no trial completed."""

    kind: RunKind
    strength: float
    seed: int
    planted_accuracy: float
    oracle_sharpe: float
    promoted: bool
    winning_score: float | None
    dsr: float
    pbo: float | None
    best_directional_accuracy: float | None
    trials: int
    seconds: float
    reasons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return PlannedRun(self.kind, self.strength, self.seed).name


def execute_run(
    planned: PlannedRun,
    config: PowerStudyConfig,
    run_root: Path,
    progress: Callable[[str], None],
) -> PowerRun:
    """Simulate `planned`'s market into a lake under `run_root`, sweep, score and gate it (its
    registry and run directory there too) and measure its planted component. Needs a
    connected Ray."""
    from market.sim_silver import write_sim_silver
    from models.selection import run_selection

    started = time.perf_counter()
    sim = config.sim.model_copy(update={"seed": planned.seed, "signal_strength": planned.strength})
    job = config.tune.model_copy(update={"seed": planned.seed})
    lake = run_root / "lake"
    write_sim_silver(lake, sim, list(config.symbols), config.days)
    measure = planted_measure_of(config, sim)
    result = run_selection(
        str(lake),
        str(run_root / "registry"),
        job,
        run_root / "sweep",
        progress=lambda line: progress(f"{planned.name}: {line}"),
    )
    summary, gate = result.summary, result.gate
    return PowerRun(
        kind=planned.kind,
        strength=planned.strength,
        seed=planned.seed,
        planted_accuracy=measure.accuracy,
        oracle_sharpe=measure.oracle_sharpe,
        promoted=gate.promoted,
        winning_score=_optional_float(summary.get("best_score")),
        dsr=float(gate.dsr),
        pbo=_optional_float(summary.get("pbo")),
        best_directional_accuracy=_optional_float(summary.get("best_directional_accuracy")),
        trials=int(summary["trials"]),
        seconds=round(time.perf_counter() - started, 1),
        reasons=tuple(gate.reasons),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------------------------
# Summaries


@dataclass(frozen=True)
class StrengthSummary:
    """One planted strength over its seeds: medians over the seeds (None when no seed gave
    the number)."""

    strength: float
    runs: int
    promoted: int
    planted_accuracy: float
    oracle_sharpe: float
    median_winning_score: float | None
    median_dsr: float | None
    median_pbo: float | None

    @property
    def promotion_rate(self) -> float:
        return self.promoted / self.runs


@dataclass(frozen=True)
class PowerSummary:
    """The study's answer (see the module's docstring)."""

    strengths: tuple[StrengthSummary, ...]
    detection_rate: float
    min_detectable_accuracy: float | None
    min_detectable_strength: float | None
    false_promotions: int
    random_walk_runs: int
    random_walk_median_pbo: float | None
    random_walk_max_dsr: float | None

    @property
    def false_promotion_rate(self) -> float | None:
        return self.false_promotions / self.random_walk_runs if self.random_walk_runs else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary's fields and rates (non-finite numbers as None)."""
        data = asdict(self)
        data["false_promotion_rate"] = self.false_promotion_rate
        data["strengths"] = [
            {**asdict(s), "promotion_rate": s.promotion_rate} for s in self.strengths
        ]
        return _finite(data)


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else None


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarise_power(runs: Sequence[PowerRun], detection_rate: float) -> PowerSummary:
    """Per-strength promotion rates and medians, the smallest detected planted accuracy and
    the random walks' false promotions."""
    planted = [r for r in runs if r.kind == PLANTED]
    walks = [r for r in runs if r.kind == RANDOM_WALK]
    strengths = []
    for strength in sorted({r.strength for r in planted}):
        group = [r for r in planted if r.strength == strength]
        strengths.append(
            StrengthSummary(
                strength=strength,
                runs=len(group),
                promoted=sum(r.promoted for r in group),
                planted_accuracy=_median([r.planted_accuracy for r in group]) or float("nan"),
                oracle_sharpe=_median([r.oracle_sharpe for r in group]) or float("nan"),
                median_winning_score=_median([r.winning_score for r in group]),
                median_dsr=_median([r.dsr for r in group]),
                median_pbo=_median([r.pbo for r in group]),
            )
        )
    detected = [
        s
        for s in strengths
        if s.promotion_rate >= detection_rate and math.isfinite(s.planted_accuracy)
    ]
    weakest = min(detected, key=lambda s: s.planted_accuracy, default=None)
    return PowerSummary(
        strengths=tuple(strengths),
        detection_rate=detection_rate,
        min_detectable_accuracy=None if weakest is None else weakest.planted_accuracy,
        min_detectable_strength=None if weakest is None else weakest.strength,
        false_promotions=sum(r.promoted for r in walks),
        random_walk_runs=len(walks),
        random_walk_median_pbo=_median([r.pbo for r in walks]),
        random_walk_max_dsr=max((r.dsr for r in walks if math.isfinite(r.dsr)), default=None),
    )


# --------------------------------------------------------------------------------------------
# The study on a Ray cluster


@dataclass
class StudyResult:
    runs: list[PowerRun]
    summary: PowerSummary
    runs_table: pd.DataFrame
    strengths_table: pd.DataFrame
    outputs: dict[str, str] = field(default_factory=dict)


def runs_frame(runs: Sequence[PowerRun]) -> pd.DataFrame:
    """One row per run, planted strengths ascending, then the random walks."""
    rows = [{"run": r.name, **asdict(r), "reasons": "; ".join(r.reasons)} for r in runs]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["kind", "strength", "seed"]).reset_index(drop=True)


def strengths_frame(summary: PowerSummary) -> pd.DataFrame:
    return pd.DataFrame(
        [{**asdict(s), "promotion_rate": s.promotion_rate} for s in summary.strengths]
    )


def run_study(
    config: PowerStudyConfig,
    out: str | Path,
    progress: Callable[[str], None] = print,
) -> StudyResult:
    """Run every planned market as a Ray task (at most `config.max_concurrent_runs` at once),
    summarise, and write the tables and the HTML report under `out` (the run table is
    rewritten as each run finishes).

    `out` is a local directory: each run's lake, registry and sweep lie under `out/runs/<run>`;
    on a cluster of several nodes it must be a directory every node sees (a shared
    filesystem), since a run's Silver is read by Ray Data tasks on any node."""
    import ray

    root = as_location(out)
    # StorageError for an object store: the simulated lakes are written with local paths.
    local_root = root.local_path()
    local_root.mkdir(parents=True, exist_ok=True)
    planned = plan_runs(config)
    remote_run = ray.remote(num_cpus=0, max_retries=0)(_remote_run)
    pending: dict[Any, PlannedRun] = {}
    runs: list[PowerRun] = []
    queue = list(planned)
    progress(f"{len(planned)} runs, {config.max_concurrent_runs} at once")
    while queue or pending:
        while queue and len(pending) < config.max_concurrent_runs:
            run = queue.pop(0)
            run_root = local_root / RUNS_DIR / run.name
            pending[remote_run.remote(run, config, str(run_root))] = run
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            result: PowerRun = ray.get(ref)
            runs.append(result)
            # The runs so far, so that a study stopped part way leaves what it measured.
            (root / RUNS_CSV).write_text(runs_frame(runs).to_csv(index=False))
            progress(
                f"{result.name}: planted accuracy {result.planted_accuracy:.4f}, "
                f"{'PROMOTED' if result.promoted else 'refused'}, DSR {result.dsr:.3f}, "
                f"score {result.winning_score}, {result.seconds:.0f} s "
                f"({len(runs)}/{len(planned)})"
            )
    summary = summarise_power(runs, config.detection_rate)
    table, strengths = runs_frame(runs), strengths_frame(summary)
    outputs = write_outputs(root, config, table, strengths, summary)
    return StudyResult(runs, summary, table, strengths, outputs)


def _remote_run(planned: PlannedRun, config: PowerStudyConfig, run_root: str) -> PowerRun:
    def progress(line: str) -> None:
        print(f"[power] {line}", file=sys.stderr, flush=True)

    return execute_run(planned, config, Path(run_root), progress)


def write_outputs(
    root: Location,
    config: PowerStudyConfig,
    table: pd.DataFrame,
    strengths: pd.DataFrame,
    summary: PowerSummary,
) -> dict[str, str]:
    """The run table (CSV, Parquet), the per-strength table (CSV) and the HTML report."""
    from models.report import write_power_report

    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    (root / RUNS_PARQUET).write_bytes(parquet.getvalue())
    (root / RUNS_CSV).write_text(table.to_csv(index=False))
    (root / STRENGTHS_CSV).write_text(strengths.to_csv(index=False))
    report = write_power_report(
        root / REPORT_HTML,
        runs=table,
        strengths=strengths,
        summary=summary.as_dict(),
        notes=[
            f"Planted accuracy and oracle Sharpe at {config.accuracy_horizon_bars} bars on the "
            "sweep's out-of-sample bars; the oracle holds sign(x_t) for the horizon, gross "
            "of fees.",
            f"A strength is detected when at least {config.detection_rate:.0%} of its seeds "
            "are promoted.",
            f"Markets: {config.days} simulated days of {', '.join(config.symbols)}; sweep of "
            f"{config.tune.num_samples} trials, {config.tune.folds.scheme} folds.",
        ],
    )
    return {
        "runs_csv": (root / RUNS_CSV).uri,
        "runs_parquet": (root / RUNS_PARQUET).uri,
        "strengths_csv": (root / STRENGTHS_CSV).uri,
        "report": report.uri,
    }
