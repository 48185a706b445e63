"""One way to save and one way to load a trained model: training, evaluation and Serve share it.

A model is three files: `model.pt` (the network's state_dict), `spec.json` (ModelSpec) and
`scaler.json` (the normalisation fitted on its training window only). The registry stores the
same files, so `load_model_files` is the single load path everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from market.storage import Location, as_location
from models.dataset import Scaler, gather_windows
from models.networks import ModelSpec, SignalNet
from models.registry import ModelRegistry

MODEL_FILES = ("model.pt", "spec.json", "scaler.json")


@dataclass
class LoadedModel:
    """A network ready for inference, with the scaler and spec it was trained with."""

    spec: ModelSpec
    scaler: Scaler
    net: SignalNet

    def predict_windows(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (unnormalised) windows [n, L, inputs] -> (predicted 10-bar log return, P(up)).

        Windows with any non-finite input get NaN for both (no opinion).
        """
        ok = np.isfinite(windows).all(axis=(1, 2))
        predicted = np.full(len(windows), np.nan)
        p_up = np.full(len(windows), np.nan)
        if ok.any():
            scaled = self.scaler.transform(windows[ok])
            ret, prob = self._forward(scaled)
            predicted[ok] = ret
            p_up[ok] = prob
        return predicted, p_up

    def predict_ends(
        self, inputs: np.ndarray, ends: np.ndarray, batch_size: int = 8192
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predictions for the windows ending at rows `ends` of a raw input matrix."""
        normalised = self.scaler.transform(inputs)
        predicted = np.empty(len(ends))
        p_up = np.empty(len(ends))
        for start in range(0, len(ends), batch_size):
            chunk = ends[start : start + batch_size]
            windows = gather_windows(normalised, chunk, self.spec.window_bars)
            ret, prob = self._forward(windows)
            predicted[start : start + len(chunk)] = ret
            p_up[start : start + len(chunk)] = prob
        return predicted, p_up

    def _forward(self, normalised_windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        # inference_mode skips autograd's version counters and view tracking (no_grad keeps
        # them): the same arithmetic, less bookkeeping per call.
        with torch.inference_mode():
            out = self.net(torch.from_numpy(np.ascontiguousarray(normalised_windows)))
        ret = out[:, 0].double().numpy() * self.scaler.target_scale
        prob = torch.sigmoid(out[:, 1].double()).numpy()
        return ret, prob


def model_files(spec: ModelSpec, scaler: Scaler, net: torch.nn.Module) -> dict[str, bytes]:
    """Serialise a trained network into the three model files."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return {
        "model.pt": buffer.getvalue(),
        "spec.json": spec.model_dump_json().encode(),
        "scaler.json": scaler.to_json().encode(),
    }


def load_model_files(files: Mapping[str, bytes]) -> LoadedModel:
    """Rebuild a model from its files (from a registry version or a training checkpoint)."""
    missing = [name for name in MODEL_FILES if name not in files]
    if missing:
        raise ValueError(f"model files missing: {', '.join(missing)}")
    spec = ModelSpec.model_validate_json(files["spec.json"])
    net = SignalNet(spec)
    state = torch.load(io.BytesIO(files["model.pt"]), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    return LoadedModel(spec=spec, scaler=Scaler.from_json(files["scaler.json"].decode()), net=net)


def write_model_dir(directory: Path | Location, files: Mapping[str, bytes]) -> None:
    """Write the model files into `directory` (a local path or a `market.storage` location)."""
    target = as_location(directory)
    for name, data in files.items():
        (target / name).write_bytes(data)


def read_model_dir(directory: Path | Location) -> dict[str, bytes]:
    """The model files in `directory` (a local path or a `market.storage` location)."""
    source = as_location(directory)
    return {name: (source / name).read_bytes() for name in MODEL_FILES}


def load_registered(registry: ModelRegistry, name: str, version: str) -> LoadedModel:
    """The model of one registry version, through the same `load_model_files` (Serve's path)."""
    return load_model_files({f: registry.read_file(name, version, f) for f in MODEL_FILES})
