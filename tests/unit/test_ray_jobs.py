"""cluster.ray_jobs without a cluster: settings, entry points checked against the real job CLIs,
runtime env, submission ids, the summary line. Submitting to a real Ray Jobs server is in
tests/integration/test_ray_jobs.py."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from cluster import ray_jobs
from cluster.ray_jobs import (
    DEFAULT_EXCLUDES,
    DEFAULT_TIMEOUTS_S,
    STAGES,
    PipelineParams,
    build_runtime_env,
    job_summary,
    safe_token,
    stage_argv,
    stage_entrypoints,
    submission_id_for,
)
from configs.schema import SOURCES, SYMBOL_PATTERN, IngestConfig, PipelineConfig
from tests.conftest import REPO

BASE = {"lake": "s3://bucket/lake", "registry": "s3://bucket/registry"}


class _CapturedError(Exception):
    """Raised in place of parsing, to take the parser a job's main() has built."""


def real_parser(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser that `jobs.<module>.main()` builds, taken just before it parses."""
    captured: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        captured.append(self)
        raise _CapturedError

    job = importlib.import_module(f"jobs.{module}")
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_CapturedError):
            job.main([])
    return captured[0]


def parse_with_real_cli(entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Parse an entrypoint's arguments with the job's own parser (exit 2 on any unknown flag)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    parser = real_parser(argv[2].removeprefix("jobs."), monkeypatch)
    return parser.parse_args(argv[3:])


def test_default_entrypoints_are_the_documented_command_lines() -> None:
    entrypoints = stage_entrypoints(BASE)
    assert list(entrypoints) == list(STAGES)
    assert entrypoints == {
        "ingest": "python -m jobs.ingest --source sim --symbols BTCUSDT "
        "--lake s3://bucket/lake --config configs/pipeline/local.yaml",
        "features": "python -m jobs.features --lake s3://bucket/lake "
        "--config configs/pipeline/local.yaml",
        "tune": "python -m jobs.tune --lake s3://bucket/lake --registry s3://bucket/registry "
        "--config configs/tune/smoke.yaml",
        "deploy": "python -m jobs.deploy --config configs/serve/local.yaml "
        "--registry s3://bucket/registry --lake s3://bucket/lake",
    }


def test_every_flag_is_accepted_by_the_job_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    params = PipelineParams.from_layers(
        {
            "lake": "/shared/quant ai/lake",  # a space: the entrypoint must quote it
            "registry": "/shared/registry",
            "source": "dump",
            "symbols": "btcusdt, ethusdt",
            "path": "/data/BTCUSDT-1m-*.csv.gz",
            "start": "2024-01-01",
            "end": "2024-01-31T23:59",
            "base_url": "http://binance.internal:8080",
            "sim_days": "3",
            "pipeline_config": "configs/pipeline/local.yaml",
            "executors": 4,
            "tune_config": "configs/tune/full.yaml",
            "tune_out": "/shared/runs/tune-1",
            "seed": "7",
            "serve_config": "configs/serve/local.yaml",
            "port": 8001,
        }
    )
    entrypoints = stage_entrypoints(params)

    ingest = parse_with_real_cli(entrypoints["ingest"], monkeypatch)
    assert (ingest.source, ingest.symbols, ingest.path) == (
        "dump",
        "BTCUSDT,ETHUSDT",
        "/data/BTCUSDT-1m-*.csv.gz",
    )
    assert (ingest.start, ingest.end, ingest.lake) == (
        "2024-01-01",
        "2024-01-31T23:59",
        "/shared/quant ai/lake",
    )
    assert (ingest.config, ingest.base_url, ingest.sim_days, ingest.address) == (
        "configs/pipeline/local.yaml",
        "http://binance.internal:8080",
        3,
        None,
    )

    features = parse_with_real_cli(entrypoints["features"], monkeypatch)
    assert (features.lake, features.config, features.executors) == (
        "/shared/quant ai/lake",
        "configs/pipeline/local.yaml",
        4,
    )

    tune = parse_with_real_cli(entrypoints["tune"], monkeypatch)
    assert (tune.lake, tune.registry, tune.config, tune.out, tune.seed) == (
        "/shared/quant ai/lake",
        "/shared/registry",
        "configs/tune/full.yaml",
        "/shared/runs/tune-1",
        7,
    )
    assert tune.shuffle_labels is False

    deploy = parse_with_real_cli(entrypoints["deploy"], monkeypatch)
    assert (deploy.config, deploy.registry, deploy.lake, deploy.port, deploy.detach) == (
        "configs/serve/local.yaml",
        "/shared/registry",
        "/shared/quant ai/lake",
        8001,
        False,
    )


def test_default_entrypoints_are_accepted_by_the_job_clis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for stage, entrypoint in stage_entrypoints(BASE).items():
        args = parse_with_real_cli(entrypoint, monkeypatch)
        assert args.lake == BASE["lake"], stage


def test_config_files_named_by_default_exist() -> None:
    params = PipelineParams.from_layers(BASE)
    for path in (params.pipeline_config, params.tune_config, params.serve_config):
        assert path is not None and (REPO / path).is_file(), path


def test_entrypoints_quote_for_the_shell() -> None:
    params = PipelineParams.from_layers(BASE, {"lake": "/data/it's a lake; rm -rf /"})
    argv = stage_argv(params)
    for stage, entrypoint in stage_entrypoints(params).items():
        assert shlex.split(entrypoint) == argv[stage]
    assert "/data/it's a lake; rm -rf /" in argv["features"]


def test_later_layers_win_and_none_does_not_override() -> None:
    params = PipelineParams.from_layers(
        {"working_dir": "/repo", "address": "http://a:8265"},
        {"address": "http://ray-head:8265", "symbols": ["btcusdt"], **BASE},
        {"address": None, "symbols": None, "deploy": "true", "timeouts_s": {"tune": 60}},
    )
    assert params.address == "http://ray-head:8265"
    assert params.working_dir == "/repo"
    assert params.symbols == ("BTCUSDT",)
    assert params.deploy is True
    assert params.timeouts_s == {**DEFAULT_TIMEOUTS_S, "tune": 60.0}


def test_strings_from_a_variable_store_are_coerced() -> None:
    params = PipelineParams.from_layers(
        BASE,
        {
            "deploy": "false",
            "poll_s": "2.5",
            "timeouts_s": '{"ingest": "120"}',
            "env_vars": '{"QUANT_AI_JWT_SECRET_FILE": "/run/secret"}',
        },
    )
    assert params.deploy is False and params.poll_s == 2.5
    assert params.timeouts_s["ingest"] == 120.0
    assert params.env_vars == {"QUANT_AI_JWT_SECRET_FILE": "/run/secret"}


@pytest.mark.parametrize(
    ("layer", "error"),
    [
        ({"lakes": "x"}, "unknown pipeline settings \\['lakes'\\]"),
        ({"source": "kraken"}, "invalid source"),
        ({"source": "dump"}, "needs path"),
        ({"symbols": "BTC-USDT"}, "invalid symbols"),
        ({"symbols": " , "}, "invalid symbols"),
        ({"symbols": "A" * 21}, "invalid symbols"),
        ({"sim_days": 0}, "invalid sim_days"),
        ({"executors": 0}, "invalid executors"),
        ({"port": 70000}, "invalid port"),
        ({"deploy": "maybe"}, "invalid deploy"),
        ({"sim_days": "three"}, "invalid sim_days"),
        ({"timeouts_s": {"train": 10}}, "unknown stages \\['train'\\]"),
        ({"timeouts_s": {"tune": 0}}, "must be positive"),
        ({"poll_s": 0}, "poll_s must be positive"),
        ({"env_vars": ["A=1"]}, "invalid env_vars"),
    ],
)
def test_bad_settings_are_rejected_with_the_reason(layer: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        PipelineParams.from_layers(BASE, layer)


def test_lake_and_registry_are_required() -> None:
    with pytest.raises(ValueError, match="registry is required"):
        PipelineParams.from_layers({"lake": "/shared/lake"})
    with pytest.raises(ValueError, match="lake is required"):
        stage_entrypoints({"registry": "/shared/registry"})


def test_runtime_env_for_a_local_checkout_and_for_a_package_uri() -> None:
    local = build_runtime_env("/srv/quant-ai", {"A": "1"})
    assert local == {
        "working_dir": "/srv/quant-ai",
        "excludes": list(DEFAULT_EXCLUDES),
        "env_vars": {"A": "1"},
    }
    for secret_or_bulky in ("/.secrets", "/.venv", "/.git", "/lake", "/registry"):
        assert secret_or_bulky in local["excludes"]
    assert build_runtime_env("s3://bucket/quant-ai.zip") == {
        "working_dir": "s3://bucket/quant-ai.zip"
    }


def test_submission_ids_are_readable_safe_and_unique() -> None:
    first = submission_id_for("tune", "scheduled__2024-01-01T00:00:00+00:00", 2)
    second = submission_id_for("tune", "scheduled__2024-01-01T00:00:00+00:00", 2)
    assert first != second
    assert first.startswith("quant-ai-tune-scheduled__2024-01-01T00_00_00_00_00-try2-")
    assert safe_token("manual__2024 01/01") == "manual__2024_01_01"


def test_run_id_goes_into_the_tune_output_dir() -> None:
    params = PipelineParams.from_layers(BASE, {"tune_out": "/shared/runs/{run_id}"})
    assert params.for_run("manual__2024-05-01T10:00").tune_out == (
        "/shared/runs/manual__2024-05-01T10_00"
    )
    plain = PipelineParams.from_layers(BASE)
    assert plain.for_run("x") is plain


def test_the_summary_is_the_last_json_object_line() -> None:
    logs = (
        "2024-01-01 INFO starting\n"
        '{"job": "early", "rows": 1}\n'
        "[tune] trial 3 done {not json}\n"
        '{"job": "tune", "gate": {"promoted": true}}\n'
        "ray: shutting down\n"
    )
    assert job_summary(logs) == {"job": "tune", "gate": {"promoted": True}}
    assert job_summary("no summary here\n[1, 2]\n") is None


# -- one schema: PipelineParams and the job CLIs follow configs.schema -------------------------


def test_defaults_are_the_schema_and_job_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    params = PipelineParams.from_layers(BASE)
    ingest, pipeline = IngestConfig(), PipelineConfig()
    assert params.source == ingest.source
    assert params.symbols == tuple(ingest.symbols)
    assert params.tune_config == pipeline.tune
    assert params.serve_config == pipeline.serve
    assert params.pipeline_config == real_parser("pipeline", monkeypatch).get_default("config")
    assert params.serve_config == real_parser("deploy", monkeypatch).get_default("config")
    tune_default = Path(real_parser("tune", monkeypatch).get_default("config"))
    assert params.tune_config is not None and tune_default == REPO / params.tune_config


def test_sources_are_the_schema_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_args(IngestConfig.model_fields["source"].annotation) == SOURCES
    for job in ("ingest", "pipeline"):
        (source,) = [a for a in real_parser(job, monkeypatch)._actions if a.dest == "source"]
        assert tuple(source.choices or ()) == SOURCES, job
    for source in SOURCES:
        assert PipelineParams.from_layers(BASE, {"source": source, "path": "x"}).source == source


@pytest.mark.parametrize(
    "symbol", ["BTCUSDT", "1000SHIBUSDT", "AB", "A" * 20, "A", "A" * 21, "BTC-USDT"]
)
def test_symbols_follow_the_schema_pattern(symbol: str) -> None:
    schema_accepts = re.match(SYMBOL_PATTERN, symbol) is not None
    try:
        IngestConfig(symbols=[symbol])
        ingest_accepts = True
    except ValueError:
        ingest_accepts = False
    try:
        PipelineParams.from_layers(BASE, {"symbols": symbol})
        params_accept = True
    except ValueError:
        params_accept = False
    assert schema_accepts == ingest_accepts == params_accept


# Job flags that a pipeline run never sets: the Ray address comes from RAY_ADDRESS in a job,
# the others are interactive or diagnostic switches (resuming a stopped sweep is an operator's
# call on that sweep's --out).
NOT_PASSED = {
    "ingest": {"address"},
    "features": {"address"},
    "tune": {"address", "shuffle_labels", "resume"},
    "deploy": {"address", "host", "detach"},
}


def test_every_job_flag_is_passed_or_deliberately_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flag added to a job CLI must be wired into `stage_argv` or listed in NOT_PASSED."""
    params = PipelineParams.from_layers(
        BASE,
        {
            "source": "dump",
            "path": "/data/x.csv",
            "start": "2024-01-01",
            "end": "2024-01-02",
            "base_url": "http://b",
            "sim_days": 2,
            "executors": 2,
            "tune_out": "/runs/x",
            "seed": 1,
            "port": 8001,
        },
    )
    for stage, argv in stage_argv(params).items():
        parser = real_parser(argv[2].removeprefix("jobs."), monkeypatch)
        options = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
        passed = {a.dest for a in parser._actions if set(a.option_strings) & set(argv[3:])}
        assert options - passed == NOT_PASSED[stage], stage


def test_a_scheduler_can_import_this_module_without_ray() -> None:
    """The Airflow DAG imports cluster.ray_jobs (and through it configs.schema) without Ray."""
    probe = (
        "import sys, cluster.ray_jobs; "
        "print(sorted(m for m in ('ray', 'torch', 'polars', 'pyspark') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


class _AgentlessAtFirst:
    """A job client whose head has no job agent for its first `refusals` submissions (as Ray
    answers while the agent starts) and whose jobs then succeed at once."""

    def __init__(self, refusals: int, error: str = ray_jobs.NO_AGENT) -> None:
        self.refusals = refusals
        self.error = error
        self.submissions: list[str] = []

    def submit_job(self, *, submission_id: str | None = None, **_: Any) -> str:
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError(f"Request failed with status code 500: {self.error}, try later.")
        assert submission_id is not None
        self.submissions.append(submission_id)
        return submission_id

    def get_job_status(self, job_id: str) -> str:
        return "SUCCEEDED"

    def get_job_logs(self, job_id: str) -> str:
        return ""

    def get_job_info(self, job_id: str) -> Any:
        return None

    def stop_job(self, job_id: str) -> bool:
        return False


def test_a_submission_waits_for_a_job_agent_then_runs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ray_jobs, "SUBMIT_RETRY_POLL_S", 0.01)
    client = _AgentlessAtFirst(refusals=3)
    status = ray_jobs.submit_and_wait(client, "python -c pass", None, timeout_s=5, poll_s=0.01)
    assert status == "SUCCEEDED"
    assert len(client.submissions) == 1


def test_other_submission_errors_and_a_lasting_lack_of_agents_are_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ray_jobs, "SUBMIT_RETRY_POLL_S", 0.01)
    with pytest.raises(RuntimeError, match="runtime_env is invalid"):
        ray_jobs.submit_and_wait(
            _AgentlessAtFirst(1, "runtime_env is invalid"), "x", None, timeout_s=5
        )
    monkeypatch.setattr(ray_jobs, "SUBMIT_RETRY_S", 0.05)
    with pytest.raises(RuntimeError, match=ray_jobs.NO_AGENT):
        ray_jobs.submit_and_wait(_AgentlessAtFirst(10**6), "x", None, timeout_s=5)


def test_the_pipeline_yamls_store_endpoint_reaches_every_job_but_its_secret_does_not() -> None:
    config = PipelineConfig.model_validate(
        {
            "object_store": {
                "endpoint_url": "http://10.0.0.5:8333",
                "region": "eu-west-1",
                "access_key_id": "desk",
                "secret_access_key": "s3cr3t-value",
            }
        }
    )
    params = PipelineParams.from_pipeline_config(
        config, "configs/pipeline.yaml", BASE["lake"], BASE["registry"], "http://head:8265"
    )
    runtime_env = build_runtime_env(params.working_dir, params.env_vars)
    assert runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://10.0.0.5:8333",
        "AWS_REGION": "eu-west-1",
    }
    assert "s3cr3t-value" not in repr(runtime_env) and "desk" not in repr(runtime_env)
    # A store reached through AWS's own endpoint and the default region adds nothing.
    plain = PipelineParams.from_pipeline_config(
        PipelineConfig(), "configs/pipeline.yaml", BASE["lake"], BASE["registry"], "http://h:8265"
    )
    assert plain.env_vars == {}
