"""Combinatorial purged cross-validation (López de Prado, Advances in Financial Machine
Learning, 2018, ch. 12): splits, purge and embargo, backtest paths and their Sharpe ratios.

All positions and lengths are in bars (one bar = one minute) on one timeline of `n_bars` bars.

* The timeline is cut, in time order, into N contiguous groups of as equal length as possible
  (the first `n_bars mod N` groups one bar longer).
* Each of the C(N, k) combinations of k test groups is a split: its model is tested on those
  k groups and trained on the remaining bars, less the purged and embargoed ones.
* Purge: a bar's label (and, in this project, its input window) reaches `purge_bars` bars away
  from it, so a training bar within `purge_bars` bars before a test group's first bar, or
  within `purge_bars` bars after its last bar, shares information with a test bar and is
  dropped. With labels on bars i..i + h (AFML's closed interval [t0, t1]) and purge_bars = h,
  these are exactly the training bars whose label interval overlaps a test bar's.
* Embargo: a further `embargo_bars` training bars right after each test group's post-test
  purge are dropped, against serial correlation that the purge does not cover.
* Paths: each group is tested by phi = C(N - 1, k - 1) = k / N * C(N, k) splits. Path p
  (0 <= p < phi) takes, for every group g, the out-of-sample returns of the p-th split (in the
  order of `itertools.combinations(range(N), k)`) that tests g, so every path covers the whole
  timeline once and every group's out-of-sample bars appear on exactly phi paths.
  N = 6, k = 2 gives the book's 15 splits and 5 paths.

A path's annualised Sharpe ratio is `models.metrics.annualised_sharpe` of its per-bar net
returns (bars_per_year = 525,600 for 1-minute bars); CPCV reports their distribution (quantiles,
mean, spread, share positive) rather than the single figure of one walk-forward path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from models.metrics import annualised_sharpe

DEFAULT_QUANTILES: Final = (0.05, 0.25, 0.5, 0.75, 0.95)
"""The quantile levels of path Sharpe ratios a summary reports."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def split_count(n_groups: int, k_test_groups: int) -> int:
    """C(N, k): the number of CPCV splits."""
    return math.comb(n_groups, k_test_groups)


def path_count(n_groups: int, k_test_groups: int) -> int:
    """phi = k / N * C(N, k) = C(N - 1, k - 1): the number of backtest paths."""
    return math.comb(n_groups - 1, k_test_groups - 1)


@dataclass(frozen=True)
class CpcvSplit:
    """One split: the test groups and the bar indices (ascending) of each role.

    `train` excludes the test bars and the bars in `purged` and `embargoed`; a bar is in at
    most one of the four arrays, and all four together cover the timeline.
    """

    index: int
    test_groups: tuple[int, ...]
    train: IntArray = field(repr=False)
    test: IntArray = field(repr=False)
    purged: IntArray = field(repr=False)
    embargoed: IntArray = field(repr=False)


@dataclass(frozen=True)
class CpcvPlan:
    """Every split of one CPCV set-up and the assignment of splits to paths.

    `groups[g]` is group g's half-open bar range [start, end). `paths[p, g]` is the index of
    the split whose out-of-sample returns path p uses on group g (shape phi x N).
    """

    n_bars: int
    n_groups: int
    k_test_groups: int
    purge_bars: int
    embargo_bars: int
    groups: tuple[tuple[int, int], ...]
    splits: tuple[CpcvSplit, ...]
    paths: IntArray = field(repr=False)

    @property
    def n_paths(self) -> int:
        return len(self.paths)


def cpcv_plan(
    n_bars: int,
    n_groups: int,
    k_test_groups: int,
    *,
    purge_bars: int,
    embargo_bars: int = 0,
) -> CpcvPlan:
    """The C(N, k) splits of `n_bars` bars into `n_groups` groups with `k_test_groups` test
    groups each, purged and embargoed as the module says, and their phi paths.

    Raises ValueError unless 1 <= k < N <= n_bars and purge and embargo are not negative.
    """
    if not 1 <= k_test_groups < n_groups:
        raise ValueError(f"need 1 <= k_test_groups < n_groups, got k={k_test_groups}, N={n_groups}")
    if n_bars < n_groups:
        raise ValueError(f"{n_bars} bars cannot form {n_groups} groups")
    if purge_bars < 0 or embargo_bars < 0:
        raise ValueError("purge_bars and embargo_bars must not be negative")
    edges = np.cumsum([0, *(len(part) for part in np.array_split(np.arange(n_bars), n_groups))])
    groups = tuple((int(edges[g]), int(edges[g + 1])) for g in range(n_groups))
    splits = []
    for index, combo in enumerate(itertools.combinations(range(n_groups), k_test_groups)):
        test = np.zeros(n_bars, dtype=bool)
        purge = np.zeros(n_bars, dtype=bool)
        embargo = np.zeros(n_bars, dtype=bool)
        for g in combo:
            start, end = groups[g]
            test[start:end] = True
            purge[max(0, start - purge_bars) : start] = True
            purge[end : end + purge_bars] = True
            embargo[end + purge_bars : end + purge_bars + embargo_bars] = True
        # Only training bars are removed: a zone that reaches an adjacent test group leaves
        # that group's bars as test bars, and a purged bar is not also counted as embargoed.
        purge &= ~test
        embargo &= ~(test | purge)
        splits.append(
            CpcvSplit(
                index=index,
                test_groups=combo,
                train=np.flatnonzero(~(test | purge | embargo)).astype(np.int64),
                test=np.flatnonzero(test).astype(np.int64),
                purged=np.flatnonzero(purge).astype(np.int64),
                embargoed=np.flatnonzero(embargo).astype(np.int64),
            )
        )
    paths = np.empty((path_count(n_groups, k_test_groups), n_groups), dtype=np.int64)
    for g in range(n_groups):
        testing = [split.index for split in splits if g in split.test_groups]
        paths[:, g] = testing
    return CpcvPlan(
        n_bars=n_bars,
        n_groups=n_groups,
        k_test_groups=k_test_groups,
        purge_bars=purge_bars,
        embargo_bars=embargo_bars,
        groups=groups,
        splits=tuple(splits),
        paths=paths,
    )


def assemble_paths(plan: CpcvPlan, split_returns: npt.ArrayLike) -> FloatArray:
    """The per-bar returns of every path, shape phi x n_bars.

    `split_returns[s, t]` is split s's out-of-sample per-bar net return at bar t; only the
    bars of split s's test groups are read (the rest may hold anything, NaN included).
    """
    returns = np.asarray(split_returns, dtype=np.float64)
    expected = (len(plan.splits), plan.n_bars)
    if returns.shape != expected:
        raise ValueError(f"split_returns must have shape {expected}, got {returns.shape}")
    out = np.empty((plan.n_paths, plan.n_bars))
    for p in range(plan.n_paths):
        for g, (start, end) in enumerate(plan.groups):
            out[p, start:end] = returns[plan.paths[p, g], start:end]
    return out


@dataclass(frozen=True)
class PathSharpes:
    """The annualised net Sharpe ratio of every CPCV path and a summary of their spread."""

    sharpes: FloatArray
    quantiles: dict[str, float]
    mean: float
    std: float
    share_positive: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the per-path values and the summary figures."""
        return {
            "paths": len(self.sharpes),
            "sharpes": [float(s) for s in self.sharpes],
            "quantiles": dict(self.quantiles),
            "mean": self.mean,
            "std": self.std,
            "share_positive": self.share_positive,
        }

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> PathSharpes:
        """The PathSharpes whose `summary()` is `data`."""
        return cls(
            sharpes=np.asarray(data["sharpes"], dtype=np.float64),
            quantiles={str(k): float(v) for k, v in data["quantiles"].items()},
            mean=float(data["mean"]),
            std=float(data["std"]),
            share_positive=float(data["share_positive"]),
        )


def path_sharpe_distribution(
    path_returns: npt.ArrayLike,
    bars_per_year: float,
    levels: Sequence[float] = DEFAULT_QUANTILES,
) -> PathSharpes:
    """Annualised Sharpe of each path (rows of `path_returns`, per-bar net simple returns),
    their quantiles at `levels` (keys formatted `f"{level:.2f}"`), mean, standard deviation
    (ddof=0; 0.0 for one path) and the share of paths above zero."""
    returns = np.asarray(path_returns, dtype=np.float64)
    if returns.ndim != 2 or len(returns) == 0:
        raise ValueError(
            f"path_returns must be a non-empty paths x bars matrix, got {returns.shape}"
        )
    sharpes = np.array([annualised_sharpe(row, bars_per_year) for row in returns])
    return PathSharpes(
        sharpes=sharpes,
        quantiles={
            f"{level:.2f}": float(value)
            for level, value in zip(levels, np.quantile(sharpes, list(levels)), strict=True)
        },
        mean=float(sharpes.mean()),
        std=float(sharpes.std()),
        share_positive=float(np.mean(sharpes > 0.0)),
    )
