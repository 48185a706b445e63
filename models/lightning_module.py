"""The Lightning module every family trains through, and the window batches it reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional

from models.dataset import gather_windows
from models.networks import ModelSpec, SignalNet


class WindowBatches:
    """Collate function: a list of decision-bar positions -> (windows, scaled return, up).

    The dataset is just the positions 0..len(ends)-1, so DataLoader shuffling and Lightning's
    distributed sampler work unchanged; the windows are gathered here, one batch at a time.
    """

    def __init__(
        self,
        normalised: np.ndarray,
        ends: np.ndarray,
        target_ret_scaled: np.ndarray,
        target_up: np.ndarray,
        window_bars: int,
    ) -> None:
        self.normalised = normalised
        self.ends = ends
        self.target_ret_scaled = target_ret_scaled
        self.target_up = target_up
        self.window_bars = window_bars

    def __call__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ends = self.ends[np.asarray(positions, dtype=np.int64)]
        windows = gather_windows(self.normalised, ends, self.window_bars)
        return (
            torch.from_numpy(windows),
            torch.from_numpy(self.target_ret_scaled[ends]),
            torch.from_numpy(self.target_up[ends]),
        )


class SignalModule(pl.LightningModule):
    """Joint loss: MSE on the scaled horizon return plus BCE on the label (a soft
    0.5 for a triple barrier's time-barrier bars)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = ModelSpec.model_validate(spec)
        self.net = SignalNet(self.spec)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(windows)
        return out

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        windows, target_ret, target_up = batch
        out = self.net(windows)
        regression = functional.mse_loss(out[:, 0], target_ret)
        classification = functional.binary_cross_entropy_with_logits(out[:, 1], target_up)
        return regression + classification

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.spec.learning_rate)
