"""Ray Train with two workers: the trial's `TorchTrainer` runs DDP across workers.

The sweep trains each trial on `scaling.num_workers` workers of a cluster; locally it uses one.
This test runs the same `train_loop_per_worker` on two local CPU workers (Lightning's DDP over
gloo through `RayDDPStrategy`) at a tiny size, and checks that both ranks joined, that the
validation loss reported is finite and that rank 0's checkpoint holds a model the shared load
function can use.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from configs.schema import FoldConfig, SimConfig
from market.sim_silver import silver_frame, simulated_bars
from models.artifact import load_model_files, read_model_dir
from models.dataset import INPUT_COLUMNS, arrays_from_table, window_ends
from models.folds import make_folds
from models.networks import ModelSpec
from models.runs import TrialDir
from models.training import train_loop_per_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_two_worker_ddp_trains_one_model(ray_two_cpus: None, tmp_path: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = SimConfig(seed=5, anchor_date=date(2024, 1, 1), signal_strength=0.3, gap_rate=0.0)
    bars = silver_frame(simulated_bars(config, ["SIMAAA"], 3))
    arrays = arrays_from_table(bars.to_arrow())
    folds = make_folds(
        int(arrays.open_time_ms[0]),
        int(arrays.open_time_ms[-1]),
        FoldConfig(train_bars=2000, val_bars=500, test_bars=500, max_folds=1),
    )
    spec = ModelSpec(
        family="gru", input_size=len(INPUT_COLUMNS), hidden_size=8, window_bars=16, batch_size=128
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "data": [ray.put(arrays)],
            "spec": spec.model_dump(mode="json"),
            "folds": [f.training_ranges().as_dict() for f in folds],
            "seed": 3,
            "max_epochs": 1,
            "max_train_windows": 1000,
            "shuffle_labels": False,
            "threads": 1,
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ddp", storage_path=str(tmp_path)),
    )
    result = trainer.fit()

    assert result.error is None
    assert result.metrics["world_size"] == 2
    assert result.metrics["trained_folds"] == 1
    assert np.isfinite(result.metrics["val_loss"])
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as checkpoint_dir:
        model = load_model_files(read_model_dir(TrialDir(Path(checkpoint_dir)).fold(0)))
    test_ends = window_ends(
        arrays, folds[0].test_start_ms, folds[0].test_end_ms, spec.window_bars, labelled=False
    )
    predicted, p_up = model.predict_ends(arrays.inputs, test_ends)
    assert len(predicted) == len(test_ends) > 0
    assert np.isfinite(predicted).all()
    assert ((p_up > 0) & (p_up < 1)).all()
