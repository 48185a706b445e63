"""Probability of Backtest Overfitting by combinatorially symmetric cross-validation (CSCV).

Bailey, Borwein, López de Prado and Zhu (2015), "The Probability of Backtest Overfitting",
Journal of Computational Finance 20(4). Their definitions, in this module's names:

* ``M`` is a T x N matrix: column n is trial n's out-of-sample per-bar net simple returns
  (one bar = one minute) on a timeline every trial shares.
* The T rows are cut, in time order, into S disjoint contiguous submatrices ``M_s`` of equal
  length T // S bars (S even). The T mod S oldest bars are left out so that every block has the
  same length, which the symmetry of the method needs.
* For each of the C(S, S/2) combinations ``c`` of S/2 blocks, the training set ``J`` is the
  rows of those blocks (in time order) and the testing set ``J_bar`` the rows of the other S/2.
  The performance statistic of each trial on each set is its per-bar Sharpe ratio (mean / std,
  ddof=1, not annualised; 0.0 when the returns on the set are all equal, as
  `models.metrics.sharpe_per_bar` defines it).
* ``n*`` is the trial with the highest in-sample Sharpe ratio. Its out-of-sample relative rank
  is ``omega_bar = rank / (N + 1)``, where rank in 1..N is its position in ascending order of
  the out-of-sample Sharpe ratios (N best), and the logit is
  ``lambda_c = ln(omega_bar / (1 - omega_bar))``.
* PBO = the fraction of combinations with ``lambda_c <= 0``: how often the in-sample winner
  ends at or below the out-of-sample median of the trials.

Ties, resolved so that the result does not depend on the order of the trials:

* out of sample, tied Sharpe ratios share the mean of the ranks they span (mid-ranks), so a
  winner tied with everyone sits exactly at the median (lambda = 0, counted as overfit);
* in sample, when several trials share the highest Sharpe ratio, the winner is taken to be any
  one of them with equal chance: omega_bar is the mean of their relative ranks.

Units: PBO is a probability in [0, 1]; logits are dimensionless; Sharpe ratios are per bar.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

DEFAULT_PARTITIONS: Final = 16
"""S when the config does not say: C(16, 8) = 12,870 splits."""

MIN_PARTITION_BARS: Final = 2
"""The fewest bars a block may hold: a standard deviation (ddof=1) needs two."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PboResult:
    """The CSCV estimate for one sweep.

    `pbo` is None when it is undefined (fewer than 2 trials, or too few bars for 2 blocks of
    `MIN_PARTITION_BARS`), and `reason` then says why. `partitions` is the S used (it may be
    below the S asked for when bars are few; 0 when undefined), `splits` is C(S, S/2),
    `bars` the rows used (T rounded down to a multiple of S), `trials` the columns N, and
    `logits` holds one lambda per split in the order of `itertools.combinations(range(S),
    S/2)`.
    """

    pbo: float | None
    trials: int
    bars: int
    partitions: int
    splits: int
    logits: FloatArray = field(repr=False)
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without the logits themselves: their mean and quantiles
        (5%, 50%, 95%) stand in for the distribution (None when PBO is undefined)."""
        logits = self.logits
        levels = (0.05, 0.5, 0.95)
        quantiles = np.quantile(logits, levels) if logits.size else np.zeros(0)
        return {
            "pbo": self.pbo,
            "trials": self.trials,
            "bars": self.bars,
            "partitions": self.partitions,
            "splits": self.splits,
            "logit_mean": float(logits.mean()) if logits.size else None,
            "logit_quantiles": (
                {f"{q:.2f}": float(v) for q, v in zip(levels, quantiles, strict=True)}
                if logits.size
                else None
            ),
            "reason": self.reason,
        }


def effective_partitions(bars: int, requested: int = DEFAULT_PARTITIONS) -> int:
    """The largest even S <= `requested` whose blocks hold at least `MIN_PARTITION_BARS` bars
    each; 0 when even S = 2 does not fit. Raises ValueError for an odd or non-positive S."""
    if requested < 2 or requested % 2:
        raise ValueError(f"the number of CSCV partitions must be even and >= 2, got {requested}")
    partitions = requested
    while partitions >= 2 and bars // partitions < MIN_PARTITION_BARS:
        partitions -= 2
    return max(partitions, 0)


def probability_of_backtest_overfitting(
    returns: npt.ArrayLike, partitions: int = DEFAULT_PARTITIONS
) -> PboResult:
    """PBO of the trials whose per-bar returns are the columns of `returns` (T bars x N trials).

    `partitions` is the S asked for (even); fewer are used when T // S < `MIN_PARTITION_BARS`.
    Raises ValueError for a matrix that is not two-dimensional or holds non-finite values.
    """
    matrix = np.asarray(returns, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"returns must be a T x N matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("returns must be finite (align the trials on their shared bars first)")
    total, trials = matrix.shape
    requested = partitions
    partitions = effective_partitions(total, requested)
    if trials < 2:
        return _undefined(trials, f"{trials} trial(s): PBO needs at least 2 to choose among")
    if partitions == 0:
        return _undefined(
            trials,
            f"{total} bars cannot form 2 blocks of {MIN_PARTITION_BARS} bars",
        )
    length = total // partitions
    used = matrix[total - length * partitions :]
    blocks = used.reshape(partitions, length, trials)
    # Per block and trial: sum of returns, and sum of squares about the trial's first used
    # return (variance is shift-invariant; the shift keeps sums of squares well-conditioned
    # and exactly zero for a constant trial); block minima and maxima detect a set on which a
    # trial's returns are all equal (Sharpe 0 by definition, not rounding noise).
    shifted = blocks - used[0]
    sums = blocks.sum(axis=1)
    shifted_sums = shifted.sum(axis=1)
    shifted_squares = (shifted * shifted).sum(axis=1)
    lows = blocks.min(axis=1)
    highs = blocks.max(axis=1)

    half = partitions // 2
    combos = list(itertools.combinations(range(partitions), half))
    chosen = np.zeros((len(combos), partitions), dtype=bool)
    for row, combo in enumerate(combos):
        chosen[row, list(combo)] = True
    in_sample = _set_sharpes(
        chosen, length * half, sums, shifted_sums, shifted_squares, lows, highs
    )
    out_of_sample = _set_sharpes(
        ~chosen, length * half, sums, shifted_sums, shifted_squares, lows, highs
    )
    winners = in_sample == in_sample.max(axis=1, keepdims=True)
    ranks = rankdata(out_of_sample, method="average", axis=1)
    omega = (ranks * winners).sum(axis=1) / winners.sum(axis=1) / (trials + 1)
    logits = np.log(omega / (1.0 - omega))
    return PboResult(
        pbo=float(np.mean(logits <= 0.0)),
        trials=trials,
        bars=length * partitions,
        partitions=partitions,
        splits=len(combos),
        logits=logits,
    )


def _set_sharpes(
    chosen: npt.NDArray[np.bool_],
    count: int,
    sums: FloatArray,
    shifted_sums: FloatArray,
    shifted_squares: FloatArray,
    lows: FloatArray,
    highs: FloatArray,
) -> FloatArray:
    """Per-bar Sharpe (ddof=1) of every trial on the union of the chosen blocks of each split:
    an array of splits x trials. `count` is the bars in each union."""
    weights = chosen.astype(np.float64)
    mean = weights @ sums / count
    shifted_total = weights @ shifted_sums
    variance = (weights @ shifted_squares - shifted_total**2 / count) / (count - 1)
    low = np.where(chosen[:, :, None], lows[None], np.inf).min(axis=1)
    high = np.where(chosen[:, :, None], highs[None], -np.inf).max(axis=1)
    constant = (low == high) | ~(variance > 0.0)
    std = np.sqrt(np.where(constant, 1.0, variance))
    return np.where(constant, 0.0, mean / std)


def _undefined(trials: int, reason: str) -> PboResult:
    return PboResult(
        pbo=None,
        trials=trials,
        bars=0,
        partitions=0,
        splits=0,
        logits=np.zeros(0),
        reason=reason,
    )
