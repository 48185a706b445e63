"""Probability of Backtest Overfitting (CSCV): hand-computed cases, limits and edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import rankdata

from models.metrics import sharpe_per_bar
from models.pbo import (
    DEFAULT_PARTITIONS,
    effective_partitions,
    probability_of_backtest_overfitting,
)

LN3 = math.log(3.0)


def hand_matrix() -> np.ndarray:
    """3 trials x 4 blocks of 2 bars (returns in units of 1e-3); each block is (m + 1, m - 1).

    Block means m:  A = (+2, +2, -2, -2)   B = (-2, -2, +2, +2)   C = (+1, +1, +1, +1)
    """
    means = {"A": (2, 2, -2, -2), "B": (-2, -2, 2, 2), "C": (1, 1, 1, 1)}
    columns = [[v for m in block_means for v in (m + 1, m - 1)] for block_means in means.values()]
    return np.array(columns, dtype=np.float64).T * 1e-3


def test_four_partition_case_computed_by_hand() -> None:
    # Sharpe ratios on a union of two blocks (4 bars, std ddof=1):
    #   A on {0,1}: 3,1,3,1 -> mean 2, std sqrt(4/3) -> 1.732; on {2,3} -> -1.732
    #   A or B on a mixed pair such as {0,2}: 3,1,-1,-3 -> mean 0 -> 0
    #   C anywhere: 2,0,2,0 -> mean 1, std sqrt(4/3) -> 0.866
    # Splits in combinations order, in-sample winner, its out-of-sample rank of 3, logit:
    #   IS {0,1}: A wins; OOS {2,3}: A -1.73 < C 0.87 < B 1.73 -> rank 1, w 1/4, ln(1/3)
    #   IS {0,2}: C wins (0.87 > 0, 0); OOS {1,3}: A 0, B 0, C 0.87 -> rank 3, w 3/4, ln 3
    #   IS {0,3}, {1,2}, {1,3}: as {0,2} -> ln 3
    #   IS {2,3}: B wins; OOS {0,1}: B is last -> ln(1/3)
    # PBO = 2 logits <= 0 out of 6 = 1/3.
    result = probability_of_backtest_overfitting(hand_matrix(), partitions=4)
    assert result.partitions == 4 and result.splits == 6
    assert result.trials == 3 and result.bars == 8
    np.testing.assert_allclose(result.logits, [-LN3, LN3, LN3, LN3, LN3, -LN3])
    assert result.pbo == pytest.approx(1 / 3)


def brute_force_logits(matrix: np.ndarray, partitions: int) -> np.ndarray:
    """The paper's procedure written out split by split, with models.metrics' Sharpe."""
    total, trials = matrix.shape
    length = total // partitions
    used = matrix[total - length * partitions :]
    blocks = [used[i * length : (i + 1) * length] for i in range(partitions)]
    logits = []
    for combo in itertools.combinations(range(partitions), partitions // 2):
        train = np.concatenate([blocks[i] for i in combo])
        test = np.concatenate([blocks[i] for i in range(partitions) if i not in combo])
        is_sr = np.array([sharpe_per_bar(train[:, n]) for n in range(trials)])
        oos_sr = np.array([sharpe_per_bar(test[:, n]) for n in range(trials)])
        omega = rankdata(oos_sr)[is_sr == is_sr.max()].mean() / (trials + 1)
        logits.append(math.log(omega / (1 - omega)))
    return np.array(logits)


@pytest.mark.parametrize("partitions", [2, 6, 10])
def test_vectorised_sums_match_the_split_by_split_procedure(partitions: int) -> None:
    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((203, 6)) * 1e-3
    matrix[:, 2] = 0.0  # a flat trial: Sharpe 0 on every set
    matrix[:60, 4] = 5e-4  # constant on the oldest blocks only
    result = probability_of_backtest_overfitting(matrix, partitions)
    np.testing.assert_allclose(result.logits, brute_force_logits(matrix, partitions), atol=1e-12)
    # 203 bars in S blocks: the T mod S oldest bars are left out
    assert result.bars == 203 - 203 % partitions


def test_a_trial_that_dominates_every_split_gives_pbo_zero() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1_600, 8)) * 1e-3
    matrix[:, 3] += 2e-3  # Sharpe ~2 per bar against ~0: best in and out of every split
    result = probability_of_backtest_overfitting(matrix, 16)
    assert result.splits == math.comb(16, 8)
    assert result.pbo == 0.0
    # the winner is always the best out of sample: rank N of N, logit ln(8/1)
    np.testing.assert_allclose(result.logits, math.log(8.0))


def test_pure_noise_trials_give_pbo_near_one_half_over_seeds() -> None:
    # With exchangeable trials the in-sample winner's out-of-sample rank is uniform; with an
    # even N no rank sits on the median, so E[PBO] = 0.5 exactly.
    values = [
        probability_of_backtest_overfitting(
            np.random.default_rng(seed).standard_normal((800, 10)), 8
        ).pbo
        for seed in range(30)
    ]
    assert all(v is not None for v in values)
    mean = float(np.mean([v for v in values if v is not None]))
    assert 0.4 < mean < 0.6


def test_trial_order_does_not_change_the_result_even_with_ties() -> None:
    base = hand_matrix()
    # A duplicated: A and A' tie in and out of sample.
    matrix = np.column_stack([base[:, 0], base[:, 0], base[:, 1], base[:, 2]])
    result = probability_of_backtest_overfitting(matrix, 4)
    for order in itertools.permutations(range(4)):
        permuted = probability_of_backtest_overfitting(matrix[:, list(order)], 4)
        np.testing.assert_array_equal(permuted.logits, result.logits)
    # IS {0,1}: A and A' tie as winners; OOS {2,3} they share ranks 1 and 2 (mid-rank 1.5 of
    # 4), so w = 1.5 / 5 and the logit is ln(1.5 / 3.5).
    assert result.logits[0] == pytest.approx(math.log(1.5 / 3.5))


def test_in_sample_tie_takes_the_mean_rank_of_the_tied_winners() -> None:
    # Block means P = (+2, +2, -2, -2), Q = (+2, +2, +2, +2), C as in hand_matrix.
    # IS {0,1}: P and Q tie (1.732); OOS {2,3}: P -1.73 (rank 1), C 0.87 (2), Q 1.73 (3).
    # Either winner equally likely: w = mean(1, 3) / 4 = 1/2, logit 0 whatever the order.
    base = hand_matrix()
    q = np.concatenate([base[:4, 0], base[:4, 0]])
    for matrix in (
        np.column_stack([base[:, 0], q, base[:, 2]]),
        np.column_stack([q, base[:, 0], base[:, 2]]),
    ):
        assert probability_of_backtest_overfitting(matrix, 4).logits[0] == 0.0


def test_identical_trials_sit_on_the_median_and_count_as_overfit() -> None:
    column = np.random.default_rng(1).standard_normal(40)
    result = probability_of_backtest_overfitting(np.column_stack([column] * 3), 4)
    np.testing.assert_allclose(result.logits, 0.0, atol=1e-12)
    assert result.pbo == 1.0


def test_fewer_than_two_trials_is_undefined() -> None:
    one = probability_of_backtest_overfitting(np.ones((100, 1)), 16)
    none = probability_of_backtest_overfitting(np.zeros((0, 0)), 16)
    for result in (one, none):
        assert result.pbo is None and result.reason is not None
        assert result.splits == 0 and len(result.logits) == 0
        assert result.summary()["pbo"] is None
    assert "1 trial" in str(one.reason)


def test_too_few_bars_lower_the_partitions_then_make_pbo_undefined() -> None:
    assert effective_partitions(10_000) == DEFAULT_PARTITIONS
    assert effective_partitions(10, 16) == 4  # 10 // 6 = 1 bar a block; 10 // 4 = 2
    assert effective_partitions(3, 16) == 0
    result = probability_of_backtest_overfitting(np.random.default_rng(2).standard_normal((10, 3)))
    assert result.partitions == 4 and result.splits == 6 and result.bars == 8
    short = probability_of_backtest_overfitting(np.ones((3, 3)))
    assert short.pbo is None and "bars" in str(short.reason)


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        effective_partitions(100, 5)
    with pytest.raises(ValueError, match="T x N"):
        probability_of_backtest_overfitting(np.ones(10))
    with pytest.raises(ValueError, match="finite"):
        probability_of_backtest_overfitting(np.array([[1.0, np.nan]] * 8))


def test_summary_describes_the_logits() -> None:
    summary = probability_of_backtest_overfitting(hand_matrix(), 4).summary()
    assert summary["pbo"] == pytest.approx(1 / 3)
    assert summary["splits"] == 6 and summary["partitions"] == 4
    assert summary["logit_mean"] == pytest.approx(LN3 / 3)
    assert summary["logit_quantiles"]["0.50"] == pytest.approx(LN3)
