"""Folds, windows, scaler, networks and the shared load function (no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from configs.schema import FoldConfig
from market.features.spec import FEATURE_COLUMNS, HORIZON_BARS, LONGEST_WINDOW_BARS
from market.klines import ONE_MINUTE_MS
from models.artifact import load_model_files, model_files
from models.dataset import (
    INPUT_COLUMNS,
    PRICE_LEVEL_FEATURES,
    Scaler,
    arrays_from_table,
    gather_windows,
    window_ends,
)
from models.folds import default_purge_bars, make_folds
from models.networks import CausalConv1d, ModelSpec, SignalNet

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def synthetic_table(minutes: np.ndarray, symbol: str = "AAA", warmup: int = 5) -> pa.Table:
    """Silver-like rows at the given minute offsets; the first `warmup` bars of each segment
    have null features, like Silver's warm-up."""
    n = len(minutes)
    rng = np.random.default_rng(len(minutes))
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    segment_start = np.ones(n, dtype=bool)
    segment_start[1:] = np.diff(minutes) != 1
    position = np.arange(n) - np.maximum.accumulate(np.where(segment_start, np.arange(n), 0))
    columns: dict[str, object] = {
        "symbol": [symbol] * n,
        "open_time": pa.array(T0 + minutes * ONE_MINUTE_MS, pa.timestamp("ms", tz="UTC")),
        "open": close,
        "close": close,
    }
    for j, name in enumerate(FEATURE_COLUMNS):
        values = rng.normal(j, 1.0 + j, n)
        columns[name] = pa.array(np.where(position < warmup, np.nan, values), from_pandas=True)
    target = np.full(n, np.nan)
    index = {m: i for i, m in enumerate(minutes)}
    for i, m in enumerate(minutes):
        later = index.get(m + HORIZON_BARS)
        if later is not None and position[later] - position[i] == HORIZON_BARS:
            target[i] = np.log(close[later] / close[i])
    columns["target_ret_10"] = pa.array(target, from_pandas=True)
    columns["target_up_10"] = pa.array(np.where(np.isnan(target), np.nan, target > 0) * 1.0)
    return pa.table(columns)


def test_folds_are_ordered_purged_and_embargoed() -> None:
    config = FoldConfig(train_bars=1000, val_bars=200, test_bars=300, embargo_bars=20)
    folds = make_folds(T0, T0 + 5000 * ONE_MINUTE_MS, config)
    purge = default_purge_bars() * ONE_MINUTE_MS
    assert default_purge_bars() == HORIZON_BARS + LONGEST_WINDOW_BARS
    assert len(folds) >= 2
    for fold in folds:
        assert fold.train_end_ms - fold.train_start_ms == 1000 * ONE_MINUTE_MS
        assert fold.val_start_ms - fold.train_end_ms == purge
        assert fold.test_start_ms - fold.val_end_ms == purge
    for before, after in itertools.pairwise(folds):
        assert after.test_start_ms - before.test_end_ms == 20 * ONE_MINUTE_MS
    assert folds[-1].test_end_ms == T0 + 5001 * ONE_MINUTE_MS  # newest bar is scored


def test_expanding_folds_start_at_the_beginning_and_max_folds_keeps_the_newest() -> None:
    config = FoldConfig(
        scheme="expanding", train_bars=1000, val_bars=200, test_bars=300, max_folds=2
    )
    everything = make_folds(
        T0, T0 + 8000 * ONE_MINUTE_MS, config.model_copy(update={"max_folds": None})
    )
    folds = make_folds(T0, T0 + 8000 * ONE_MINUTE_MS, config)
    assert [f.test_start_ms for f in folds] == [f.test_start_ms for f in everything[-2:]]
    assert all(f.train_start_ms == T0 for f in folds)


def test_too_short_timeline_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="too short for one fold"):
        make_folds(T0, T0 + 100 * ONE_MINUTE_MS, FoldConfig(train_bars=1000))
    with pytest.raises(ValueError, match="shorter than"):
        make_folds(T0, T0 + 9000 * ONE_MINUTE_MS, FoldConfig(train_bars=1000, purge_bars=3))


def test_windows_never_cross_a_gap_warmup_or_range_end() -> None:
    minutes = np.concatenate([np.arange(0, 300), np.arange(310, 700)])  # gap of 10 minutes
    arrays = arrays_from_table(synthetic_table(minutes))
    window = 16
    ends = window_ends(arrays, T0, T0 + 500 * ONE_MINUTE_MS, window, labelled=True)
    assert len(ends) > 0
    windows = ends[:, None] + np.arange(-window + 1, 1)
    assert (np.diff(arrays.open_time_ms[windows], axis=1) == ONE_MINUTE_MS).all()
    assert np.isfinite(arrays.inputs[windows]).all()
    # labelled: the target bar t+10 lies inside the range, and targets exist
    assert (
        arrays.open_time_ms[ends] + HORIZON_BARS * ONE_MINUTE_MS < T0 + 500 * ONE_MINUTE_MS
    ).all()
    assert np.isfinite(arrays.target_ret[ends]).all()
    # the first window after the gap starts after that segment's warm-up
    after_gap = ends[arrays.open_time_ms[ends] >= T0 + 310 * ONE_MINUTE_MS]
    assert arrays.open_time_ms[after_gap[0]] == T0 + (310 + 5 + window - 1) * ONE_MINUTE_MS


def test_symbols_get_separate_segments_and_sorted_rows() -> None:
    minutes = np.arange(0, 100)
    table = pa.concat_tables(
        [synthetic_table(minutes, "BBB"), synthetic_table(minutes[::-1].copy(), "AAA")]
    )
    arrays = arrays_from_table(table)
    assert arrays.symbols == ("AAA", "BBB")
    slices = arrays.symbol_slices()
    assert (np.diff(arrays.open_time_ms[slices["AAA"]]) == ONE_MINUTE_MS).all()
    assert arrays.segment[slices["AAA"]].max() < arrays.segment[slices["BBB"]].min()
    # windows of the second symbol never reach back into the first
    ends = window_ends(arrays, T0, T0 + 100 * ONE_MINUTE_MS, 10, labelled=False)
    assert (arrays.symbol_index[ends - 9] == arrays.symbol_index[ends]).all()


def test_inputs_drop_price_levels_and_scale_macd_by_close() -> None:
    arrays = arrays_from_table(synthetic_table(np.arange(50)))
    assert not set(PRICE_LEVEL_FEATURES) & set(INPUT_COLUMNS)
    table = synthetic_table(np.arange(50))
    macd = np.asarray(table.column("macd").to_numpy(zero_copy_only=False), dtype=float)
    close = np.asarray(table.column("close").to_numpy(), dtype=float)
    j = INPUT_COLUMNS.index("macd")
    np.testing.assert_allclose(arrays.inputs[10:, j], (macd / close)[10:], rtol=1e-6)


def test_scaler_is_fitted_on_training_windows_only_and_round_trips() -> None:
    arrays = arrays_from_table(synthetic_table(np.arange(400)))
    ends = window_ends(arrays, T0, T0 + 200 * ONE_MINUTE_MS, 8, labelled=True)
    scaler = Scaler.fit(arrays, ends, 8)
    rows = np.arange(ends.min() - 7, ends.max() + 1)
    np.testing.assert_allclose(
        scaler.mean, arrays.inputs[rows].astype(float).mean(axis=0), rtol=1e-6
    )
    # a huge value after the training range cannot move the scaler
    shifted = arrays.inputs.copy()
    shifted[300:] += 1e6
    from dataclasses import replace

    again = Scaler.fit(replace(arrays, inputs=shifted), ends, 8)
    np.testing.assert_array_equal(again.mean, scaler.mean)
    restored = Scaler.from_json(scaler.to_json())
    np.testing.assert_array_equal(restored.std, scaler.std)
    assert restored.target_scale == scaler.target_scale


def test_gather_windows_shapes_and_order() -> None:
    data = np.arange(20, dtype=np.float32).reshape(10, 2)
    windows = gather_windows(data, np.array([4, 9]), 3)
    assert windows.shape == (2, 3, 2)
    np.testing.assert_array_equal(windows[0, :, 0], [4, 6, 8])


@pytest.mark.parametrize("family", ["lstm", "gru", "tcn"])
def test_networks_output_two_columns_and_ignore_the_future(family: str) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(family=family, input_size=4, hidden_size=8, window_bars=12)
    net = SignalNet(spec).eval()
    windows = torch.randn(3, 12, 4)
    out = net(windows)
    assert out.shape == (3, 2)
    # The encoding at the last bar of a prefix equals the prefix's: nothing reads ahead.
    with torch.no_grad():
        prefix = net(windows[:, :8, :])
        changed = windows.clone()
        changed[:, 8:, :] = 99.0
        if family == "tcn":
            full = net.encoder.blocks(changed.transpose(1, 2))[:, :, 7]
            assert torch.allclose(
                full, net.encoder.blocks(windows[:, :8, :].transpose(1, 2))[:, :, -1]
            )
        else:
            rnn_out, _ = net.encoder.rnn(changed)
            assert torch.allclose(net.head(rnn_out[:, 7, :]), prefix, atol=1e-6)


def test_causal_conv_pads_on_the_left_only() -> None:
    conv = CausalConv1d(1, 1, kernel_size=3, dilation=2)
    x = torch.zeros(1, 1, 10)
    x[0, 0, 5] = 1.0
    y = conv(x) - conv(torch.zeros(1, 1, 10))
    assert torch.all(y[0, 0, :5] == 0)


def test_model_files_round_trip_through_the_shared_load_function() -> None:
    arrays = arrays_from_table(synthetic_table(np.arange(300)))
    spec = ModelSpec(family="gru", input_size=len(INPUT_COLUMNS), hidden_size=4, window_bars=6)
    ends = window_ends(arrays, T0, T0 + 300 * ONE_MINUTE_MS, 6, labelled=True)
    scaler = Scaler.fit(arrays, ends, 6)
    torch.manual_seed(1)
    net = SignalNet(spec)
    loaded = load_model_files(model_files(spec, scaler, net))
    predicted, p_up = loaded.predict_ends(arrays.inputs, ends)
    windows = gather_windows(arrays.inputs, ends, 6)
    again, again_p = loaded.predict_windows(windows)
    np.testing.assert_allclose(predicted, again, rtol=1e-6)
    np.testing.assert_allclose(p_up, again_p, rtol=1e-6)
    assert ((p_up > 0) & (p_up < 1)).all()
    nan_window = windows[:1].copy()
    nan_window[0, 0, 0] = np.nan
    assert np.isnan(loaded.predict_windows(nan_window)[0]).all()
    with pytest.raises(ValueError, match="missing"):
        load_model_files({"model.pt": b""})
