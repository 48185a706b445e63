"""Submitting the pipeline stages to a Ray cluster through the Ray Jobs API.

Each stage is one of our job modules run as a Ray job: `python -m jobs.<stage> ...` with the
repository as the job's `working_dir`, exactly as `ray job submit --working-dir . -- python -m
jobs.X ...` would run it. This module holds the parts that do not depend on who schedules the
stages (the Airflow DAG in `cluster/airflow/`, a cron job, our own code):

* `PipelineParams`: the stage arguments and submission settings, merged from layers of plain
  mappings (defaults, an Airflow Variable, DAG-run params) and validated;
* `stage_entrypoints`: the shell command line of every stage, flag for flag as the job CLIs
  define them;
* `build_runtime_env`: the job's `runtime_env` (working dir, excludes, environment variables);
* `submit_and_wait`: submit one job, stream its new log lines while polling its status, and
  return on SUCCEEDED or raise on FAILED / STOPPED / timeout (stopping the job on the way out);
* `run_stages`: the stages in order, stopping at the first failure.

Besides the standard library only `configs.schema` (pydantic, PyYAML) is imported at module
level: the Ray Jobs SDK is imported inside `connect_client`, so that a scheduler's environment can
import this module without Ray. The stage settings are validated by the schema's models, the
rules the job CLIs apply to the same values.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from pydantic import ValidationError

from configs.schema import (
    DEFAULT_PIPELINE_CONFIG,
    BinanceConfig,
    IngestConfig,
    PipelineConfig,
    ServeConfig,
    SparkConfig,
)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

logger = logging.getLogger(__name__)

STAGES: Final = ("ingest", "features", "tune", "deploy")
"""The stages in the order they run; `deploy` is optional."""

TERMINAL_STATUSES: Final = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
"""Ray job statuses after which a job does not change any more."""

DEFAULT_TIMEOUTS_S: Final[Mapping[str, float]] = {
    "ingest": 3600.0,
    "features": 3600.0,
    "tune": 6 * 3600.0,
    "deploy": 900.0,
}
"""How long each stage may run before its job is stopped and the stage fails."""

DEFAULT_EXCLUDES: Final = (
    "/.git",
    "/.venv",
    "/.secrets",
    "/lake",
    "/registry",
    "/runs",
    "/var",
    "/bench/results",
    "/tests/artifacts",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    "*.parquet",
    "spark-warehouse",
    "metastore_db",
)
"""Paths (gitignore syntax, relative to the working dir) never uploaded with a local working dir.

Ray also honours the working dir's `.gitignore`; this list covers copies without one and the
`.git` directory, and keeps secrets (`.secrets/`) out of the cluster's package store.
"""

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_LOG_TAIL_CHARS = 4000


class JobClient(Protocol):
    """The part of `ray.job_submission.JobSubmissionClient` that this module uses."""

    def submit_job(
        self,
        *,
        entrypoint: str,
        runtime_env: dict[str, Any] | None = ...,
        metadata: dict[str, str] | None = ...,
        submission_id: str | None = ...,
    ) -> str:
        """Submit a job; returns its submission id."""
        ...

    def get_job_status(self, job_id: str) -> str:
        """The job's status (a `JobStatus`, which is a `str` enum)."""
        ...

    def get_job_logs(self, job_id: str) -> str:
        """Everything the job's driver printed so far."""
        ...

    def get_job_info(self, job_id: str) -> Any:
        """The job's details (`JobDetails`: status, message, times...)."""
        ...

    def stop_job(self, job_id: str) -> bool:
        """Ask Ray to stop the job; False when it had already finished."""
        ...


class RayJobError(RuntimeError):
    """A Ray job ended in FAILED or STOPPED (or was stopped by us, see the subclass)."""

    def __init__(
        self,
        submission_id: str,
        status: str,
        message: str,
        logs_tail: str,
        headline: str | None = None,
    ) -> None:
        self.submission_id = submission_id
        self.status = status
        self.message = message
        self.logs_tail = logs_tail
        detail = headline or f"Ray job {submission_id} ended {status}"
        if message:
            detail += f": {message}"
        if logs_tail:
            detail += f"\n--- last lines of the job's log ---\n{logs_tail}"
        super().__init__(detail)


class RayJobTimeoutError(RayJobError, TimeoutError):
    """A Ray job did not finish within its timeout; it has been asked to stop."""

    def __init__(self, submission_id: str, status: str, timeout_s: float, logs_tail: str) -> None:
        super().__init__(
            submission_id,
            status,
            f"not finished after {timeout_s:.0f} s; asked Ray to stop it",
            logs_tail,
            headline=f"Ray job {submission_id} timed out (still {status})",
        )


def _as_symbols(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip().upper() for item in items if str(item).strip())


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _as_optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _as_str_mapping(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping, got {type(value).__name__}")
    return {str(key): str(item) for key, item in value.items()}


def _as_timeouts(value: Any) -> dict[str, float]:
    given = {key: float(item) for key, item in _as_str_mapping(value).items()}
    unknown = sorted(set(given) - set(STAGES))
    if unknown:
        raise ValueError(f"timeouts_s names unknown stages {unknown}; stages are {list(STAGES)}")
    return {**DEFAULT_TIMEOUTS_S, **given}


_INGEST_DEFAULTS: Final = IngestConfig()
_PIPELINE_DEFAULTS: Final = PipelineConfig()


def _check(model: type[Any], **values: Any) -> None:
    """Validate `values` (those not None) as fields of the schema model `model`.

    Raises ValueError naming each rejected setting, e.g. `invalid symbols: String should match
    pattern ...`, so that a bad setting fails here rather than in a submitted job.
    """
    try:
        model(**{key: value for key, value in values.items() if value is not None})
    except ValidationError as exc:
        reasons = "; ".join(
            f"invalid {error['loc'][0] if error['loc'] else model.__name__}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(reasons) from None


@dataclass(frozen=True)
class PipelineParams:
    """What the stage jobs need and how to submit them.

    The stage fields carry the job CLIs' flags (`python -m jobs.X --help`); `None` leaves a flag
    out so that the job's own default applies. `lake` and `registry` must be visible to every
    node of the cluster (a shared file system or an object-store URI): each Ray job runs in its
    own copy of the working dir, so relative paths would not survive from one stage to the next.
    """

    lake: str
    registry: str
    # jobs.ingest
    source: str = _INGEST_DEFAULTS.source
    symbols: tuple[str, ...] = tuple(_INGEST_DEFAULTS.symbols)
    path: str | None = None
    start: str | None = None
    end: str | None = None
    base_url: str | None = None
    sim_days: int | None = None
    # jobs.ingest and jobs.features (the pipeline YAML's ingest/spark sections)
    pipeline_config: str | None = DEFAULT_PIPELINE_CONFIG
    # jobs.features
    executors: int | None = None
    # jobs.tune
    tune_config: str | None = _PIPELINE_DEFAULTS.tune
    tune_out: str | None = None
    seed: int | None = None
    # jobs.deploy
    deploy: bool = False
    serve_config: str | None = _PIPELINE_DEFAULTS.serve
    port: int | None = None
    # submission
    address: str = "http://127.0.0.1:8265"
    working_dir: str = "."
    env_vars: Mapping[str, str] = field(default_factory=dict)
    timeouts_s: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS_S))
    poll_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.lake or not self.registry:
            raise ValueError("lake and registry are required (directories or URIs)")
        _check(
            IngestConfig,
            source=self.source,
            symbols=list(self.symbols),
            path=self.path,
            start=self.start,
            end=self.end,
            sim_days=self.sim_days,
        )
        # jobs.ingest enforces this one when it opens the source; checked here before any job.
        if self.source == "dump" and not self.path:
            raise ValueError("source 'dump' needs path (a dump file or glob)")
        _check(BinanceConfig, base_url=self.base_url)
        _check(SparkConfig, executors=self.executors)
        _check(ServeConfig, port=self.port)
        if self.poll_s <= 0:
            raise ValueError("poll_s must be positive")
        missing = sorted(set(STAGES) - set(self.timeouts_s))
        if missing:
            raise ValueError(f"timeouts_s lacks stages {missing}")
        if any(seconds <= 0 for seconds in self.timeouts_s.values()):
            raise ValueError("every stage timeout must be positive")

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any] | None) -> PipelineParams:
        """Merge mappings left to right (a later non-None value wins), coerce, validate.

        Strings are accepted where a scheduler's UI or a variable store yields strings:
        `symbols` as "BTCUSDT,ETHUSDT", `deploy` as "true"/"false", numbers as text,
        `env_vars` / `timeouts_s` as JSON objects (`timeouts_s` may name only some stages).
        Unknown keys are an error, so that a misspelt setting does not pass silently.
        """
        known = {item.name for item in fields(cls)}
        merged: dict[str, Any] = {}
        for layer in layers:
            if not layer:
                continue
            unknown = sorted(set(layer) - known)
            if unknown:
                raise ValueError(f"unknown pipeline settings {unknown}; known: {sorted(known)}")
            merged.update({key: value for key, value in layer.items() if value is not None})
        converters: dict[str, Callable[[Any], Any]] = {
            "symbols": _as_symbols,
            "deploy": _as_bool,
            "sim_days": _as_optional_int,
            "executors": _as_optional_int,
            "seed": _as_optional_int,
            "port": _as_optional_int,
            "poll_s": float,
            "env_vars": _as_str_mapping,
            "timeouts_s": _as_timeouts,
        }
        for key, convert in converters.items():
            if key in merged:
                try:
                    merged[key] = convert(merged[key])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"invalid {key}: {exc}") from exc
        for key in ("lake", "registry"):
            if key not in merged:
                raise ValueError(f"{key} is required (a directory or URI every node can reach)")
        return cls(**merged)

    @classmethod
    def from_pipeline_config(
        cls, config: PipelineConfig, config_path: str, lake: str, registry: str, address: str
    ) -> PipelineParams:
        """The stage jobs of a pipeline YAML (`config`, read from `config_path`), submitted to the
        Ray dashboard at `address`: its ingest settings, its tune and serve YAMLs (deploying when
        it names a serve YAML), and `config_path` for the stages that read the YAML themselves.
        The YAML's object-store endpoint and region go to every job's environment; the
        credentials do not (see `ObjectStoreConfig.endpoint_environment`)."""
        ingest = config.ingest
        return cls(
            lake=lake,
            registry=registry,
            source=ingest.source,
            symbols=tuple(ingest.symbols),
            path=ingest.path,
            start=ingest.start,
            end=ingest.end,
            pipeline_config=config_path,
            tune_config=config.tune,
            deploy=config.serve is not None,
            serve_config=config.serve,
            address=address,
            # Every stage job, tune and deploy included, reaches the pipeline YAML's store.
            env_vars=config.object_store.endpoint_environment(),
        )

    def for_run(self, run_id: str) -> PipelineParams:
        """These params with `{run_id}` in `tune_out` replaced by `safe_token(run_id)`."""
        if self.tune_out is None or "{run_id}" not in self.tune_out:
            return self
        return replace(self, tune_out=self.tune_out.replace("{run_id}", safe_token(run_id)))


def _job(module: str, flags: Iterable[tuple[str, Any]]) -> list[str]:
    """`python -m <module>` followed by every flag whose value is not None."""
    argv = ["python", "-m", module]
    for flag, value in flags:
        if value is not None:
            argv += [flag, str(value)]
    return argv


def stage_argv(params: PipelineParams) -> dict[str, list[str]]:
    """The argument vector of every stage, in run order (`STAGES`)."""
    return {
        "ingest": _job(
            "jobs.ingest",
            [
                ("--source", params.source),
                ("--symbols", ",".join(params.symbols)),
                ("--path", params.path),
                ("--start", params.start),
                ("--end", params.end),
                ("--lake", params.lake),
                ("--config", params.pipeline_config),
                ("--base-url", params.base_url),
                ("--sim-days", params.sim_days),
            ],
        ),
        "features": _job(
            "jobs.features",
            [
                ("--lake", params.lake),
                ("--config", params.pipeline_config),
                ("--executors", params.executors),
            ],
        ),
        "tune": _job(
            "jobs.tune",
            [
                ("--lake", params.lake),
                ("--registry", params.registry),
                ("--config", params.tune_config),
                ("--out", params.tune_out),
                ("--seed", params.seed),
            ],
        ),
        "deploy": _job(
            "jobs.deploy",
            [
                ("--config", params.serve_config),
                ("--registry", params.registry),
                ("--lake", params.lake),
                ("--port", params.port),
            ],
        ),
    }


def stage_entrypoints(params: PipelineParams | Mapping[str, Any]) -> dict[str, str]:
    """The Ray job entrypoint (a shell-quoted command line) of every stage, in run order.

    The jobs take the cluster from `RAY_ADDRESS`, which Ray sets for a job's driver, so no
    `--address` is passed. `deploy` is always listed; whether it runs is `params.deploy`.
    """
    if not isinstance(params, PipelineParams):
        params = PipelineParams.from_layers(params)
    return {stage: shlex.join(argv) for stage, argv in stage_argv(params).items()}


def build_runtime_env(
    working_dir: str,
    env_vars: Mapping[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The jobs' `runtime_env`: the repository as working dir, plus environment variables.

    `working_dir` is a local directory (uploaded by the SDK, minus `excludes` and what the
    directory's `.gitignore` names) or a remote package URI such as `s3://bucket/quant-ai.zip`
    (used as is; `excludes` apply to uploads only). The cluster's image provides the packages.
    """
    env: dict[str, Any] = {"working_dir": working_dir}
    if "://" not in working_dir and excludes:
        env["excludes"] = list(excludes)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def safe_token(text: str, limit: int = 80) -> str:
    """`text` with every run of characters other than letters, digits, `_` and `-` as `_`."""
    return _UNSAFE_CHARS.sub("_", text).strip("_")[:limit]


def submission_id_for(stage: str, run_id: str | None = None, attempt: int | None = None) -> str:
    """A readable, unique Ray submission id: `quant-ai-<stage>-<run id>-try<n>-<random>`."""
    parts = ["quant-ai", stage]
    if run_id:
        parts.append(safe_token(run_id))
    if attempt is not None:
        parts.append(f"try{attempt}")
    parts.append(uuid.uuid4().hex[:8])
    return "-".join(parts)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _tail(text: str, chars: int = _LOG_TAIL_CHARS) -> str:
    return text[-chars:].strip()


NO_AGENT = "No available agent to submit job"
"""Ray's answer (HTTP 500) while no job agent can take a submission: agents start after the
head's dashboard and may not answer health checks on a loaded node. Nothing was submitted."""
SUBMIT_RETRY_S = 60.0
"""How long a submission refused with `NO_AGENT` is retried, in seconds."""
SUBMIT_RETRY_POLL_S = 2.0


def _submit(client: JobClient, **job: Any) -> str:
    """`client.submit_job(**job)`, retried for up to `SUBMIT_RETRY_S` seconds while Ray has no
    job agent to take it; any other refusal is raised at once."""
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if NO_AGENT not in str(exc) or time.monotonic() >= deadline:
                raise
            logger.warning("Ray has no job agent for the submission yet; retrying: %s", exc)
            time.sleep(SUBMIT_RETRY_POLL_S)


def submit_and_wait(
    client: JobClient,
    entrypoint: str,
    runtime_env: Mapping[str, Any] | None,
    timeout_s: float,
    poll_s: float = 5.0,
    *,
    submission_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    log_sink: Callable[[str], None] | None = None,
    raise_on_failure: bool = True,
    max_status_errors: int = 5,
) -> str:
    """Submit `entrypoint` as a Ray job and wait until it ends; return its final status.

    Every `poll_s` seconds the job's status is read and the log lines printed since the last
    poll go to `log_sink` (one call per line), so a scheduler's task log follows the job.
    SUCCEEDED is returned. FAILED or STOPPED raise `RayJobError` carrying Ray's message and the
    log's tail (or are returned when `raise_on_failure` is False). Past `timeout_s` the job is
    stopped and `RayJobTimeoutError` is raised. Whatever interrupts the wait (a timeout, the
    scheduler killing the task, Ctrl-C), a job still running is asked to stop: it never
    outlives its waiter. Up to `max_status_errors` consecutive failures to read the status
    (the dashboard restarting, a network blip) are tolerated.
    """
    job_id = _submit(
        client,
        entrypoint=entrypoint,
        runtime_env=dict(runtime_env) if runtime_env is not None else None,
        metadata=dict(metadata) if metadata else None,
        submission_id=submission_id or submission_id_for("job"),
    )
    logger.info("submitted Ray job %s: %s", job_id, entrypoint)
    printed = 0
    pending = ""
    last_logs = ""

    def drain(final: bool = False) -> str:
        """Send the complete new log lines to the sink; return the whole log so far."""
        nonlocal printed, pending, last_logs
        try:
            last_logs = client.get_job_logs(job_id)
        except Exception as exc:  # the logs are best-effort; the status decides
            logger.warning("could not read the logs of Ray job %s: %s", job_id, exc)
        if log_sink is not None:
            pending += last_logs[printed:]
            *lines, pending = pending.split("\n")
            if final and pending:
                lines.append(pending)
                pending = ""
            for line in lines:
                log_sink(line.rstrip("\r"))
        printed = max(printed, len(last_logs))
        return last_logs

    deadline = time.monotonic() + timeout_s
    status = ""
    finished = False
    status_errors = 0
    try:
        while True:
            try:
                status = _status_name(client.get_job_status(job_id))
                status_errors = 0
            except Exception as exc:  # a dashboard hiccup should not fail a long stage
                status_errors += 1
                if status_errors > max_status_errors:
                    raise
                logger.warning("reading the status of Ray job %s failed: %s", job_id, exc)
            if status in TERMINAL_STATUSES:
                finished = True
                break
            drain()
            if time.monotonic() >= deadline:
                break
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
    finally:
        if not finished:
            try:
                client.stop_job(job_id)
                logger.warning("asked Ray to stop job %s (status %s)", job_id, status)
            except Exception as exc:
                logger.warning("could not stop Ray job %s: %s", job_id, exc)
    logs = drain(final=True)
    if not finished:
        raise RayJobTimeoutError(job_id, status or "UNKNOWN", timeout_s, _tail(logs))
    logger.info("Ray job %s ended %s", job_id, status)
    if status != "SUCCEEDED" and raise_on_failure:
        message = ""
        try:
            message = str(getattr(client.get_job_info(job_id), "message", "") or "")
        except Exception as exc:
            logger.warning("could not read the details of Ray job %s: %s", job_id, exc)
        raise RayJobError(job_id, status, message, _tail(logs))
    return status


def job_summary(logs: str) -> dict[str, Any] | None:
    """The JSON summary line every job prints last, found in a job's log (None if absent)."""
    for line in reversed(logs.splitlines()):
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


API_SERVER_ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API and Jobs SDK look for a dashboard before any address they are given."""


def connect_client(address: str, token: str | None = None) -> JobSubmissionClient:
    """A Ray Jobs client for the dashboard at `address` (e.g. http://ray-head:8265).

    Clusters with token authentication (`RAY_AUTH_MODE=token`; Ray 2.60 turns it on for a local
    `ray.init()` by default) need the cluster's token: `token`, else the environment
    variable `RAY_AUTH_TOKEN`; it is sent as `Authorization: Bearer <token>`. Without either, Ray's
    own client set-up applies (`RAY_AUTH_MODE=token` plus a token file).
    """
    from ray.job_submission import JobSubmissionClient

    token = token or os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray's SDK lets RAY_API_SERVER_ADDRESS override the address it is given, and
    # `cluster.ray_runtime.connect` sets that variable for a local Ray it starts: a process
    # running its own Ray would otherwise send this cluster's jobs (and token) to that Ray. The
    # address is resolved once, here; the variable is put back at once.
    own_api_server = os.environ.pop(API_SERVER_ADDRESS_ENV, None)
    try:
        return JobSubmissionClient(address, headers=headers)
    finally:
        if own_api_server is not None:
            os.environ[API_SERVER_ADDRESS_ENV] = own_api_server


def run_stages(
    client: JobClient,
    params: PipelineParams,
    stages: Sequence[str] | None = None,
    *,
    run_id: str | None = None,
    log_sink: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Run `stages` (default: ingest, features, tune, and deploy when `params.deploy`) in order.

    Returns each stage's final status; the first failure raises `RayJobError` and later stages
    are not submitted. With a `run_id`, `{run_id}` in `tune_out` becomes that id.
    """
    if run_id:
        params = params.for_run(run_id)
    if stages is None:
        stages = [stage for stage in STAGES if stage != "deploy" or params.deploy]
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages are {list(STAGES)}")
    entrypoints = stage_entrypoints(params)
    runtime_env = build_runtime_env(params.working_dir, params.env_vars)
    results: dict[str, str] = {}
    for stage in stages:
        results[stage] = submit_and_wait(
            client,
            entrypoints[stage],
            runtime_env,
            params.timeouts_s[stage],
            params.poll_s,
            submission_id=submission_id_for(stage, run_id),
            metadata={"stage": stage, **({"run_id": run_id} if run_id else {})},
            log_sink=log_sink,
        )
    return results
