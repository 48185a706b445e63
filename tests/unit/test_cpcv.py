"""Combinatorial purged cross-validation: split counts, purge and embargo, path assembly and
the distribution of path Sharpe ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.cpcv import (
    assemble_paths,
    cpcv_plan,
    path_count,
    path_sharpe_distribution,
    split_count,
)


def test_afml_example_six_groups_two_test_groups() -> None:
    # AFML 12.4: N = 6, k = 2 -> C(6, 2) = 15 splits and phi = 2/6 * 15 = 5 paths.
    assert split_count(6, 2) == 15 and path_count(6, 2) == 5
    plan = cpcv_plan(60, 6, 2, purge_bars=0)
    assert len(plan.splits) == 15 and plan.n_paths == 5
    assert plan.groups == tuple((10 * g, 10 * g + 10) for g in range(6))
    # The book's Figure 12.1, 0-based: path 0 takes groups 0 and 1 from split (0,1), group 2
    # from (0,2), 3 from (0,3), ...; path 1 takes group 0 from (0,2), groups 1 and 2 from
    # (1,2), group 3 from (1,3), ...
    assert plan.paths.tolist() == [
        [0, 0, 1, 2, 3, 4],
        [1, 5, 5, 6, 7, 8],
        [2, 6, 9, 9, 10, 11],
        [3, 7, 10, 12, 12, 13],
        [4, 8, 11, 13, 14, 14],
    ]
    assert plan.splits[5].test_groups == (1, 2)


@pytest.mark.parametrize(("n_groups", "k"), [(6, 2), (5, 3), (7, 1), (8, 4)])
def test_every_bar_is_tested_by_phi_splits_and_each_path_covers_it_once(
    n_groups: int, k: int
) -> None:
    plan = cpcv_plan(101, n_groups, k, purge_bars=2, embargo_bars=3)
    phi = path_count(n_groups, k)
    assert phi == pytest.approx(k / n_groups * math.comb(n_groups, k))
    tested = np.zeros(plan.n_bars, dtype=np.int64)
    for split in plan.splits:
        tested[split.test] += 1
        # the four roles partition the timeline
        roles = np.concatenate([split.train, split.test, split.purged, split.embargoed])
        assert np.array_equal(np.sort(roles), np.arange(plan.n_bars))
    assert (tested == phi).all()
    for g in range(n_groups):
        column = plan.paths[:, g]
        assert len(set(column.tolist())) == phi  # phi distinct splits on phi paths
        assert all(g in plan.splits[s].test_groups for s in column)
    # 101 bars in N groups: the first 101 mod N groups are one bar longer
    sizes = [end - start for start, end in plan.groups]
    assert sum(sizes) == 101 and max(sizes) - min(sizes) <= 1


def test_purge_and_embargo_remove_exactly_the_expected_bars() -> None:
    # 12 bars, 4 groups of 3: [0,3) [3,6) [6,9) [9,12); purge 1 bar each side, embargo 2.
    plan = cpcv_plan(12, 4, 1, purge_bars=1, embargo_bars=2)
    middle = plan.splits[1]  # tests group 1 = bars 3, 4, 5
    assert middle.test.tolist() == [3, 4, 5]
    assert middle.purged.tolist() == [2, 6]  # last bar before, first bar after
    assert middle.embargoed.tolist() == [7, 8]  # the 2 bars after the post-test purge
    assert middle.train.tolist() == [0, 1, 9, 10, 11]
    last = plan.splits[3]  # tests group 3 = bars 9, 10, 11: nothing after it to remove
    assert last.purged.tolist() == [8] and last.embargoed.tolist() == []
    assert last.train.tolist() == list(range(8))
    first = plan.splits[0]  # tests group 0: nothing before it
    assert first.purged.tolist() == [3] and first.embargoed.tolist() == [4, 5]
    assert first.train.tolist() == list(range(6, 12))
    # Two adjacent test groups: the zones between them fall on test bars and remove nothing.
    both = cpcv_plan(12, 4, 2, purge_bars=1, embargo_bars=2).splits[3]  # groups (1, 2)
    assert both.test_groups == (1, 2) and both.test.tolist() == list(range(3, 9))
    assert both.purged.tolist() == [2, 9] and both.embargoed.tolist() == [10, 11]
    assert both.train.tolist() == [0, 1]


def test_paths_take_each_groups_returns_from_their_split() -> None:
    plan = cpcv_plan(30, 6, 2, purge_bars=0)
    # split s "returns" s on its test bars and NaN elsewhere: each path must read only test bars
    split_returns = np.full((len(plan.splits), plan.n_bars), np.nan)
    for split in plan.splits:
        split_returns[split.index, split.test] = float(split.index)
    paths = assemble_paths(plan, split_returns)
    assert paths.shape == (5, 30) and np.isfinite(paths).all()
    for p in range(plan.n_paths):
        for g, (start, end) in enumerate(plan.groups):
            assert (paths[p, start:end] == plan.paths[p, g]).all()
    with pytest.raises(ValueError, match="shape"):
        assemble_paths(plan, split_returns[:3])


def test_path_sharpe_distribution_of_known_paths() -> None:
    # Path i alternates m_i + d and m_i - d over L = 100 bars: mean m_i, std (ddof=1)
    # d * sqrt(L / (L - 1)), so its per-bar Sharpe is m_i / (d * sqrt(100 / 99)).
    d, bars_per_year = 1e-3, 525_600.0
    means = np.array([-2e-4, 0.0, 1e-4, 2e-4, 4e-4])
    signs = np.tile([1.0, -1.0], 50)
    paths = means[:, None] + d * signs[None, :]
    result = path_sharpe_distribution(paths, bars_per_year)
    expected = means / (d * math.sqrt(100 / 99)) * math.sqrt(bars_per_year)
    np.testing.assert_allclose(result.sharpes, expected)
    assert result.quantiles["0.50"] == pytest.approx(expected[2])
    assert result.quantiles["0.25"] == pytest.approx(expected[1])
    assert result.mean == pytest.approx(expected.mean())
    assert result.share_positive == pytest.approx(3 / 5)
    assert result.summary()["paths"] == 5


def test_invalid_set_ups_are_refused() -> None:
    with pytest.raises(ValueError, match="k_test_groups"):
        cpcv_plan(100, 4, 4, purge_bars=0)
    with pytest.raises(ValueError, match="groups"):
        cpcv_plan(3, 4, 1, purge_bars=0)
    with pytest.raises(ValueError, match="negative"):
        cpcv_plan(100, 4, 1, purge_bars=-1)
    with pytest.raises(ValueError, match="paths x bars"):
        path_sharpe_distribution(np.zeros(5), 525_600.0)
