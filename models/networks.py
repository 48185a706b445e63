"""LSTM, GRU and TCN encoders sharing one two-output head.

Every network reads a window [batch, L bars, inputs] (oldest bar first) and returns
[batch, 2]: column 0 is the log return over the model's `horizon_bars` bars in units of the
training target scale (`Scaler.target_scale`), column 1 the logit of its label: P(close_{t+h} >
close_t) for `direction`, of the upper barrier first for `triple_barrier` (models.dataset).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from configs.schema import LabelHorizon, LabelKind, StrictModel

Family = Literal["lstm", "gru", "tcn"]


class ModelSpec(StrictModel):
    """Architecture and training hyper-parameters of one candidate (one Tune trial)."""

    family: Family
    input_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(default=1, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    window_bars: int = Field(ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=256, ge=1)
    tcn_kernel_size: int = Field(default=3, ge=2)
    tcn_dilations: tuple[int, ...] = (1, 2, 4)
    horizon_bars: LabelHorizon = Field(
        default=10, description="bars ahead its targets look (the served horizon)"
    )
    label: LabelKind = "direction"
    cross_asset_symbols: tuple[str, ...] = Field(
        default=(),
        description="the universe whose same-minute returns it reads as extra inputs "
        "(models.dataset.cross_asset_columns); empty: its own symbol's inputs only",
    )


class SignalHead(nn.Module):
    """Shared head: hidden state -> (scaled return, up logit)."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, 2))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(hidden)
        return out


class RecurrentEncoder(nn.Module):
    """LSTM or GRU; the encoding is the top layer's output at the last bar."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        rnn_type = nn.LSTM if spec.family == "lstm" else nn.GRU
        self.rnn = rnn_type(
            input_size=spec.input_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            dropout=spec.dropout if spec.num_layers > 1 else 0.0,
            batch_first=True,
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(windows)
        last: torch.Tensor = output[:, -1, :]
        return last


class CausalConv1d(nn.Conv1d):
    """A 1-d convolution padded on the left only, so output t never sees input t+1."""

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, dilation: int):
        super().__init__(channels_in, channels_out, kernel_size, dilation=dilation)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (self.left_pad, 0)))


class ResidualBlock(nn.Module):
    """Two dilated causal convolutions with ReLU and dropout, plus a residual connection."""

    def __init__(self, channels_in: int, channels: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            CausalConv1d(channels_in, channels, kernel, dilation),
            nn.ReLU(),
            nn.Dropout(dropout),
            CausalConv1d(channels, channels, kernel, dilation),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.skip = nn.Conv1d(channels_in, channels, 1) if channels_in != channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip is None else self.skip(x)
        out: torch.Tensor = torch.relu(self.body(x) + residual)
        return out


class TCNEncoder(nn.Module):
    """Temporal convolutional network: one residual block per dilation, `num_layers` stacks."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels_in = spec.input_size
        for _ in range(spec.num_layers):
            for dilation in spec.tcn_dilations:
                blocks.append(
                    ResidualBlock(
                        channels_in, spec.hidden_size, spec.tcn_kernel_size, dilation, spec.dropout
                    )
                )
                channels_in = spec.hidden_size
        self.blocks = nn.Sequential(*blocks)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        features = self.blocks(windows.transpose(1, 2))
        last: torch.Tensor = features[:, :, -1]
        return last


class SignalNet(nn.Module):
    """Encoder + shared head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder: nn.Module = (
            TCNEncoder(spec) if spec.family == "tcn" else RecurrentEncoder(spec)
        )
        self.head = SignalHead(spec.hidden_size, spec.dropout)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(windows))
        return out
