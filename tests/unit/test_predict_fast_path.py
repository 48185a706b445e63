"""`/predict`'s features from bar columns: `segment_features` equals the batch engine's frame
path bit for bit, and a `/predict` answer from the columns equals the one the frame path gives
the same bars, including bars with a missing minute (which take the frame path). A prediction
on a worker thread runs the model on that one thread."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from market.bar_columns import BarColumns
from market.features import spec
from market.features.polars_engine import compute_features, segment_features
from market.klines import ONE_MINUTE_MS
from market.sim_silver import simulated_bars
from serve.api.auth import TokenService
from serve.api.routes import make_api
from serve.engine import signals
from serve.engine.engine import SignalEngine
from serve.engine.signals import compute_signal
from serve.local import LocalBackend
from tests.conftest import sim_config
from tests.serve_support import known_clients, register_model
from tests.unit.test_serve_engine import FakeClock, config_for

SYMBOL = "SIMAAA"


def symbol_bars(seed: int, gap_rate: float = 0.0, days: int = 1) -> pl.DataFrame:
    """One symbol's simulated bars, sorted."""
    return simulated_bars(sim_config(seed=seed, gap_rate=gap_rate), [SYMBOL], days)


def frame_features(bars: pl.DataFrame) -> dict[str, np.ndarray]:
    """The batch engine's features of `bars` from its frame path, nulls as NaN."""
    features = compute_features(bars)
    return {
        name: features[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        for name in spec.FEATURE_COLUMNS
    }


# Computed by polars' rolling kernels, which carry running sums along the whole frame: in a
# frame of many segments their last bit depends on the rows before a segment.
RUNNING_SUM_FEATURES = ("volume_z_60",)


def assert_bitwise(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], running_rtol: float = 0.0
) -> None:
    for name in spec.FEATURE_COLUMNS:
        if running_rtol and name in RUNNING_SUM_FEATURES:
            np.testing.assert_allclose(
                actual[name], expected[name], rtol=running_rtol, err_msg=name
            )
        else:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name, strict=True)


@pytest.mark.parametrize(("seed", "rows"), [(1, 400), (2, 241), (3, 1500), (4, 120)])
def test_segment_features_equal_the_frame_path_bit_for_bit(seed: int, rows: int) -> None:
    bars = symbol_bars(seed).tail(rows)
    features = segment_features(BarColumns.from_frame(bars))
    assert_bitwise(features, frame_features(bars))
    assert np.isnan(features["rsi_14"][: min(rows, spec.WARMUP_BARS)]).all()
    if rows > spec.WARMUP_BARS:
        assert np.isfinite(np.column_stack(list(features.values()))[spec.WARMUP_BARS :]).all()


def test_segment_features_equal_each_segment_of_a_many_segment_frame() -> None:
    """Against the engine's per-segment lists (several segments and symbols in one frame), and
    over flat stretches, where the recursive features keep their value unchanged; bit for bit
    but for the running-sum features, whose frame values read rows before the segment."""
    bars = simulated_bars(sim_config(seed=9, gap_rate=0.002), ["SIMA", "SIMB"], 2)
    flat = pl.int_range(pl.len()).is_between(900, 960)
    bars = bars.with_columns(
        pl.when(flat & (pl.col("symbol") == "SIMA"))
        .then(pl.lit(100.0))
        .otherwise(pl.col(name))
        .alias(name)
        for name in ("open", "high", "low", "close")
    )
    features = compute_features(bars)
    compared = 0
    for (_, _), group in features.group_by(["symbol", "segment"]):
        group = group.sort("open_time")
        if group.height <= spec.WARMUP_BARS:
            continue
        expected = {
            name: group[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
            for name in spec.FEATURE_COLUMNS
        }
        assert_bitwise(segment_features(BarColumns.from_frame(group)), expected, 1e-12)
        compared += 1
    assert compared >= 4


def test_segment_features_refuse_bars_with_a_missing_minute() -> None:
    bars = symbol_bars(5).tail(300)
    gapped = pl.concat([bars.head(100), bars.tail(199)])
    assert not BarColumns.from_frame(gapped).one_segment()
    with pytest.raises(ValueError, match="consecutive"):
        segment_features(BarColumns.from_frame(gapped))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SignalEngine:
    tmp = tmp_path_factory.mktemp("predict-fast")
    register_model(tmp / "registry", seed=1)
    engine = SignalEngine(config_for(tmp), clock=FakeClock())
    assert engine.refresh_model()
    return engine


def frame_signal(engine: SignalEngine, bars: pl.DataFrame) -> signals.Signal:
    serving = engine.serving
    assert serving is not None
    return compute_signal(
        SYMBOL, bars, serving.model, serving.thresholds, serving.version, engine.model.spec_hash
    )


def test_predict_answers_from_columns_as_from_the_frame(
    engine: SignalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every answer bit-identical, the model's opinion (p_up, predicted return) included."""
    cases = [symbol_bars(seed).tail(rows) for seed, rows in ((11, 400), (12, 256), (13, 2000))]
    expected = [frame_signal(engine, bars) for bars in cases]
    assert all(signal.p_up is not None for signal in expected)

    def no_frame(_: pl.DataFrame) -> pl.DataFrame:
        raise AssertionError("one segment's columns must not go through the frame engine")

    monkeypatch.setattr(signals, "latest_features", no_frame)
    for bars, signal in zip(cases, expected, strict=True):
        assert engine.predict(SYMBOL, BarColumns.from_frame(bars)) == signal


def test_bars_with_a_missing_minute_take_the_frame_path(
    engine: SignalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars = symbol_bars(14).tail(500)
    recent_gap = pl.concat([bars.head(490), bars.tail(8)])  # inside the model's window
    early_gap = pl.concat([bars.head(50), bars.tail(449)])
    expected = [frame_signal(engine, b) for b in (recent_gap, early_gap)]
    assert expected[0].reason == "a gap in the last 16 bars"
    assert expected[1].p_up is not None  # 449 bars after the gap: warm, the model answers

    def no_segment(_: BarColumns) -> dict[str, np.ndarray]:
        raise AssertionError("bars with a gap are not one segment")

    monkeypatch.setattr(signals, "segment_features", no_segment)
    for gapped, signal in zip((recent_gap, early_gap), expected, strict=True):
        assert engine.predict(SYMBOL, BarColumns.from_frame(gapped)) == signal


def test_post_predict_answers_what_the_frame_path_gives(tmp_path: Path) -> None:
    """Over HTTP: the JSON answer equals the frame path's signal on the same bars, and a body
    with a missing minute is still refused with the models' 422."""
    register_model(tmp_path / "registry", seed=1)
    config = config_for(tmp_path)
    engine = SignalEngine(config, clock=FakeClock())
    backend = LocalBackend(engine)
    backend.step()
    tokens = TokenService.from_config(config.auth.jwt)
    client = TestClient(make_api(backend, config, tokens, known_clients("tester")))
    token, _ = tokens.mint("tester", ["signals:predict", "signals:read"])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bars = symbol_bars(15).tail(400)
    rows = [{k: v for k, v in r.items() if k != "symbol"} for r in bars.iter_rows(named=True)]
    response = client.post(
        "/predict", content=json.dumps({"symbol": SYMBOL, "bars": rows}), headers=headers
    )
    assert response.status_code == 200, response.text
    expected = frame_signal(engine, bars)
    assert response.json() == {name: getattr(expected, name) for name in response.json()}
    rows[200]["open_time"] += ONE_MINUTE_MS
    refused = client.post(
        "/predict", content=json.dumps({"symbol": SYMBOL, "bars": rows}), headers=headers
    )
    assert refused.status_code == 422
    assert "bars must be consecutive 1-minute bars" in refused.json()["detail"]
    engine.close()


def test_a_prediction_on_a_worker_thread_starts_no_thread_team(engine: SignalEngine) -> None:
    """Predictions run on worker threads; with predict.threads = 1 a forward there must not
    start an OpenMP team (one thread per core, spinning idle between forwards)."""
    assert engine.config.predict.threads == 1
    bars = BarColumns.from_frame(symbol_bars(16).tail(400))

    def threads_started() -> int:
        before = len(os.listdir("/proc/self/task"))
        engine.predict(SYMBOL, bars)
        return len(os.listdir("/proc/self/task")) - before

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(threads_started).result() == 0
