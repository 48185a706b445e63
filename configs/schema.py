"""Typed configuration: pydantic models loaded from YAML, unknown keys rejected."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(StrictModel):
    """Where Ray runs. `address` None starts a local Ray (RAY_ADDRESS still wins)."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "quant-ai"
    include_dashboard: bool = False
    object_store_memory_mb: int | None = Field(default=None, ge=64)


class SparkConfig(StrictModel):
    """The RayDP Spark session of the feature ETL."""

    app_name: str = "quant-ai-features"
    executors: int = Field(default=1, ge=1)
    executor_cores: int = Field(default=2, ge=1)
    executor_memory: str = "3g"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(default=4, ge=1)
    extra: dict[str, str] = Field(default_factory=dict)


class SimConfig(StrictModel):
    """The seeded market simulator. Volatilities are per 1-minute bar (not annualised)."""

    seed: int = 42
    anchor_date: date = date(2024, 1, 1)
    minute_vol: float = Field(default=8e-4, gt=0)
    garch_alpha: float = Field(default=0.05, ge=0, lt=1)
    garch_beta: float = Field(default=0.93, ge=0, lt=1)
    student_t_dof: float = Field(default=4.0, gt=2)
    signal_strength: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="share of each bar's return explained by the "
        "planted signal (0 = martingale returns)",
    )
    signal_persistence: float = Field(default=0.9, ge=0, lt=1)
    gap_rate: float = Field(
        default=0.0, ge=0, le=0.01, description="per-bar probability that an outage starts"
    )
    max_gap_minutes: int = Field(default=30, ge=1)

    @field_validator("garch_beta")
    @classmethod
    def _stationary(cls, beta: float, info: object) -> float:
        alpha = getattr(info, "data", {}).get("garch_alpha", 0.0)
        if alpha + beta >= 1:
            raise ValueError("garch_alpha + garch_beta must be < 1 (stationary variance)")
        return beta


class BinanceConfig(StrictModel):
    """The Binance REST klines client."""

    base_url: str = "https://api.binance.com"
    timeout_s: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=8, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    weight_limit_per_minute: int = Field(default=6000, ge=1)
    weight_safety: float = Field(default=0.8, gt=0, le=1)
    klines_weight: int = Field(default=2, ge=1)
    page_limit: int = Field(default=1000, ge=1, le=1000)


class IngestConfig(StrictModel):
    """What `jobs.ingest` fetches. Dates are UTC; `end` is inclusive to the minute."""

    source: Literal["binance", "dump", "sim"] = "sim"
    symbols: list[str] = Field(default_factory=lambda: ["BTCUSDT"], min_length=1)
    start: str | None = None
    end: str | None = None
    path: str | None = None
    sim_days: int = Field(default=14, ge=1, description="days simulated when no end is given")
    sim: SimConfig = SimConfig()
    binance: BinanceConfig = BinanceConfig()


class PipelineConfig(StrictModel):
    """`jobs.pipeline`: the stages that `make run` chains."""

    lake: str = "lake"
    ray: RayConfig = RayConfig()
    spark: SparkConfig = SparkConfig()
    ingest: IngestConfig = IngestConfig()


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_config(path: str | Path, model: type[ModelT]) -> ModelT:
    """Read YAML at `path` and validate it as `model` (unknown keys raise)."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return model.model_validate(data)
