"""Benchmark: training throughput (windows/s) per model family on CPU, Lightning vs plain torch.

Each family trains the same number of windows from simulated Silver (polars engine) once through
the Lightning module the sweep uses and once through a bare torch loop over the same batches: the
ratio is Lightning's overhead. Last line: one JSON object of figures.

    .venv/bin/python -m bench.train [--windows 20000] [--window-bars 32] [--hidden 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pytorch_lightning as pl_lightning
import torch

from configs.schema import SimConfig
from market.sim_silver import silver_frame, simulated_bars
from models.dataset import INPUT_COLUMNS, Scaler, arrays_from_table, window_ends
from models.lightning_module import SignalModule, WindowBatches
from models.networks import ModelSpec


def simulated_table(days: int) -> pa.Table:
    config = SimConfig(seed=1, anchor_date=date(2024, 1, 1), signal_strength=0.2)
    return silver_frame(simulated_bars(config, ["SIMBENCH"], days)).to_arrow()


def run_family(family: str, args: argparse.Namespace, table: pa.Table) -> dict[str, Any]:
    arrays = arrays_from_table(table)
    spec = ModelSpec(
        family=family,  # type: ignore[arg-type]
        input_size=len(INPUT_COLUMNS),
        hidden_size=args.hidden,
        window_bars=args.window_bars,
        batch_size=args.batch_size,
    )
    ends = window_ends(arrays, 0, 2**62, spec.window_bars, labelled=True)[: args.windows]
    scaler = Scaler.fit(arrays, ends, spec.window_bars)
    collate = WindowBatches(
        scaler.transform(arrays.inputs),
        ends,
        (np.nan_to_num(arrays.target_ret) / scaler.target_scale).astype(np.float32),
        np.nan_to_num(arrays.target_up).astype(np.float32),
        spec.window_bars,
    )
    loader: torch.utils.data.DataLoader[int] = torch.utils.data.DataLoader(
        range(len(ends)),  # type: ignore[arg-type]
        batch_size=spec.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate,
    )
    torch.manual_seed(0)
    module = SignalModule(spec.model_dump())
    trainer = pl_lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, loader)
    lightning_s = time.perf_counter() - started

    torch.manual_seed(0)
    bare = SignalModule(spec.model_dump())
    optimiser = bare.configure_optimizers()
    started = time.perf_counter()
    bare.train()
    for batch in loader:
        optimiser.zero_grad()
        loss = bare._loss(batch)
        loss.backward()
        optimiser.step()
    torch_s = time.perf_counter() - started
    return {
        "windows": len(ends),
        "lightning_windows_per_s": round(len(ends) / lightning_s),
        "torch_windows_per_s": round(len(ends) / torch_s),
        "ratio": round(torch_s / lightning_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--window-bars", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = simulated_table(days=max(3, args.windows // 1200 + 2))
    figures: dict[str, Any] = {
        "threads": args.threads,
        "window_bars": args.window_bars,
        "hidden": args.hidden,
    }
    for family in ("lstm", "gru", "tcn"):
        figures[family] = run_family(family, args, table)
        print(f"{family}: {figures[family]}", file=sys.stderr)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
