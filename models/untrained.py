"""A seeded, untrained model registered like a trained one: for serving-path tests, demos and
benchmarks, where the model's skill does not matter but its loading, swapping and latency do."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import torch

from configs.schema import BacktestConfig, LabelHorizon, SimConfig
from market.features.spec import HORIZON_BARS, spec_hash
from market.sim_silver import silver_frame, simulated_bars
from models.artifact import model_files
from models.dataset import INPUT_COLUMNS, Scaler, arrays_from_table, window_ends
from models.networks import ModelSpec, SignalNet
from models.registry import ModelRegistry

MODEL_NAME = "signal"
# No fees and a 0.5 threshold: every opinion is a BUY or a SELL, so outcomes get scored.
EAGER_THRESHOLDS = BacktestConfig(taker_fee_bps=0, slippage_bps=0, p_up_threshold=0.5)


def register_model(
    registry_dir: str | Path,
    seed: int,
    *,
    promote: bool = True,
    window_bars: int = 16,
    horizon_bars: LabelHorizon = HORIZON_BARS,
) -> str:
    """Register an untrained (seeded) GRU reading `window_bars` bars and answering for
    `horizon_bars` bars ahead, with a scaler fitted on simulated bars, in the registry at
    `registry_dir` (a directory or a storage URI; an object store's settings from the standard
    environment).

    An untrained network is enough for the service: it is loaded, run and swapped exactly like
    a trained one, in seconds. Returns the version id.
    """
    config = SimConfig(seed=seed, anchor_date=date(2024, 1, 1))
    arrays = arrays_from_table(silver_frame(simulated_bars(config, ["SIMFIT"], 1)).to_arrow())
    arrays = arrays.labelled(horizon_bars)
    spec = ModelSpec(
        family="gru",
        input_size=len(INPUT_COLUMNS),
        hidden_size=8,
        window_bars=window_bars,
        batch_size=64,
        horizon_bars=horizon_bars,
    )
    ends = window_ends(
        arrays,
        int(arrays.open_time_ms[0]),
        int(arrays.open_time_ms[-1]) + 1,
        spec.window_bars,
        labelled=True,
    )
    scaler = Scaler.fit(arrays, ends, spec.window_bars)
    torch.manual_seed(seed)
    net = SignalNet(spec)
    registry = ModelRegistry(str(registry_dir))
    version = registry.register(
        MODEL_NAME,
        model_files(spec, scaler, net),
        {
            "feature_spec_hash": spec_hash(),
            "horizon_bars": horizon_bars,
            "seed": seed,
            "metrics": {"score": float(np.float64(seed) / 100.0)},
            "training_data_range": {
                "start_ms": int(arrays.open_time_ms[0]),
                "end_ms": int(arrays.open_time_ms[-1]),
            },
            "backtest": EAGER_THRESHOLDS.model_dump(mode="json"),
            "git_commit": "test",
        },
    )
    if promote:
        registry.set_alias(MODEL_NAME, "production", version, reason=f"test seed {seed}")
    return version
