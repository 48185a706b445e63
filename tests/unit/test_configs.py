"""Typed configs: YAML in, unknown keys out, the shipped configs valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.spark import jdk17_java_options, spark_configs
from configs.schema import PipelineConfig, SimConfig, SparkConfig, load_config
from market.features import spec
from tests.conftest import REPO


def test_shipped_pipeline_config_loads() -> None:
    config = load_config(REPO / "configs/pipeline/local.yaml", PipelineConfig)
    assert config.ingest.source == "sim" and len(config.ingest.symbols) >= 2


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lake: x\nspark:\n  executers: 2\n")
    with pytest.raises(ValidationError, match="executers"):
        load_config(path, PipelineConfig)


def test_non_stationary_garch_is_rejected() -> None:
    with pytest.raises(ValidationError, match="stationary"):
        SimConfig(garch_alpha=0.2, garch_beta=0.85)


def test_jdk17_flags_reach_driver_executors_and_app_master() -> None:
    settings = spark_configs(SparkConfig())
    for key in (
        "spark.executor.extraJavaOptions",
        "spark.driver.extraJavaOptions",
        "spark.ray.raydp_app_master.extraJavaOptions",
    ):
        assert settings[key] == jdk17_java_options()
    assert "--add-opens=java.base/sun.util.calendar=ALL-UNNAMED" in jdk17_java_options()


def test_spec_hash_is_stable_and_covers_the_definitions() -> None:
    assert spec.spec_hash() == spec.spec_hash()
    assert len(spec.FEATURE_COLUMNS) == len(set(spec.FEATURE_COLUMNS)) == 30
    assert len(spec.spec_hash()) == 16
