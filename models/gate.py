"""The promotion gate: a candidate becomes `production` only when it survives the sweep's size.

Conditions, all required: its Deflated Sharpe Ratio over every trial started (early-stopped ones
included) is at least `min_dsr`; its score (walk-forward: mean fold net Sharpe; CPCV: mean
path net Sharpe; annualised) beats buy-and-hold and every baseline on the same folds or paths;
it traded at least `min_trades` times; and, when `max_pbo` is set, the sweep's Probability of
Backtest Overfitting is at most `max_pbo` (an undefined PBO, from fewer than two completed
trials, does not block: there was no choice among records to overfit, and the DSR still counts
every trial started).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from configs.schema import GateConfig
from models.evaluation import Evaluation
from models.metrics import deflated_sharpe_ratio


@dataclass
class GateDecision:
    """What the gate decided and why; `version` is set once the candidate is registered."""

    promoted: bool
    candidate: str | None
    dsr: float
    n_trials: int
    reasons: list[str] = field(default_factory=list)
    pbo: float | None = None
    version: str | None = None
    production_before: str | None = None
    production_after: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_dsr(
    candidate: Evaluation, trial_sharpes_per_bar: Sequence[float], n_trials: int
) -> float:
    """DSR of the candidate against the expected best of `n_trials` (per-bar Sharpe, raw
    kurtosis), the variance of Sharpe ratios taken over the trials that produced a record.
    T is the record's `bars`; a CPCV record's per-bar Sharpe, skew and kurtosis are means over
    its paths (`models.evaluation.combine_paths`), T the timeline's bars."""
    return deflated_sharpe_ratio(
        candidate.metrics["sharpe_per_bar"],
        list(trial_sharpes_per_bar),
        int(candidate.metrics["bars"]),
        candidate.metrics["skew"],
        candidate.metrics["kurtosis"],
        n_trials=n_trials,
    )


def apply_gate(
    candidate: Evaluation | None,
    trial_sharpes_per_bar: Sequence[float],
    n_trials: int,
    references: Mapping[str, Evaluation],
    config: GateConfig,
    pbo: float | None = None,
) -> GateDecision:
    """Decide promotion. `references` holds buy-and-hold and every baseline; `pbo` is the
    sweep's Probability of Backtest Overfitting (None: undefined or not computed)."""
    if candidate is None:
        return GateDecision(False, None, float("nan"), n_trials, ["no trial completed"], pbo=pbo)
    dsr = candidate_dsr(candidate, trial_sharpes_per_bar, n_trials)
    reasons = []
    if not np.isfinite(dsr) or dsr < config.min_dsr:
        reasons.append(
            f"DSR {dsr:.4f} < {config.min_dsr} over {n_trials} trials: the best Sharpe is "
            "within what chance gives the best of that many tries"
        )
    for name, reference in sorted(references.items()):
        if not candidate.score > reference.score:
            reasons.append(
                f"score {candidate.score:.3f} does not beat {name} ({reference.score:.3f}) "
                "on the same folds"
            )
    trades = candidate.metrics.get("trades", 0.0)
    if trades < config.min_trades:
        reasons.append(f"{trades:.0f} trades < min_trades {config.min_trades}")
    if config.max_pbo is not None and pbo is not None and pbo > config.max_pbo:
        reasons.append(
            f"PBO {pbo:.3f} > max_pbo {config.max_pbo}: the in-sample best trial lands at or "
            "below the out-of-sample median too often"
        )
    passed = "passed: DSR, baselines, buy-and-hold and trade count"
    if config.max_pbo is not None:
        passed += ", PBO" if pbo is not None else " (PBO undefined, not gated)"
    return GateDecision(
        promoted=not reasons,
        candidate=candidate.name,
        dsr=float(dsr),
        n_trials=n_trials,
        reasons=reasons or [passed],
        pbo=pbo,
    )
