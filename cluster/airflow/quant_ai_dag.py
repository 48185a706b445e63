"""Airflow DAG `quant_ai_retrain`: the retraining pipeline as Ray jobs, for teams that run Airflow.

    ingest -> features -> tune (the promotion gate runs inside tune) -> deploy (optional)

Every task submits one stage, `python -m jobs.<stage> ...`, to a Ray cluster through the Ray Jobs
API (`ray.job_submission.JobSubmissionClient`) with the repository as the job's `working_dir`,
follows the job's status and log until it ends, and fails when the job fails, is stopped, or
runs past its stage timeout (the job is then stopped). The job's last line, its JSON summary,
becomes the task's XCom value (`{"submission_id", "status", "summary"}`); for `tune` the summary
carries the gate's decision.

Use: put this directory on Airflow's DAG path (`dags_folder`, or a symlink into it) in a checkout
of the repository, or point `QUANT_AI_REPO` at such a checkout. The Airflow workers need network
access to the Ray dashboard (port 8265) and `ray[default]` at the cluster's version (2.60.0),
imported only inside the tasks: the scheduler and DAG processor need neither Ray nor the
project's dependencies beyond pydantic and PyYAML (for `configs.schema`), which Airflow ships.
Tested with Airflow 3.3.2 (tests/integration/test_airflow_dag.py); the imports fall back to
Airflow 2's module paths.

Settings, each read when a task runs (a later source wins):
  1. defaults: those of `cluster.ray_jobs.PipelineParams`, `working_dir` = the checkout;
  2. Airflow Variable `quant_ai_retrain`, a JSON object, e.g.
     {"address": "http://ray-head:8265", "lake": "s3://bucket/lake",
      "registry": "s3://bucket/registry", "source": "binance", "symbols": "BTCUSDT,ETHUSDT",
      "tune_config": "configs/tune/full.yaml", "deploy": true};
  3. the DAG-run params (same names; null means "not set here").
`lake` and `registry` have no default: set them to locations every Ray node can reach.
`tune_out` may contain `{run_id}`, replaced by the DAG run's id. A cluster with token
authentication (`RAY_AUTH_MODE=token`) needs its token in the Variable `quant_ai_ray_auth_token`
or in `RAY_AUTH_TOKEN` on the workers.

Schedule: environment variable `QUANT_AI_RETRAIN_SCHEDULE` of the DAG processor (a preset such as
`@hourly`, a cron expression, or `none` for manual runs only); default `@daily`. The schedule is
fixed when the file is parsed, so it cannot be a run param; reading an Airflow Variable at parse
time would query the metadata database on every parse.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(os.environ.get("QUANT_AI_REPO") or Path(__file__).resolve().parents[2])
if str(REPO_ROOT) not in sys.path:
    # Appended, not prepended: the checkout's top-level packages never shadow Airflow's.
    sys.path.append(str(REPO_ROOT))

from cluster import ray_jobs  # noqa: E402  (needs the checkout on sys.path, set just above)
from configs.schema import SOURCES  # noqa: E402

try:  # Airflow 3: the Task SDK
    from airflow.sdk import DAG, Param, Variable, get_current_context, task
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:  # Airflow 2.x
    from airflow.decorators import task
    from airflow.exceptions import AirflowSkipException
    from airflow.models import DAG, Variable
    from airflow.models.param import Param
    from airflow.operators.python import get_current_context

DAG_ID = "quant_ai_retrain"
VARIABLE = "quant_ai_retrain"
TOKEN_VARIABLE = "quant_ai_ray_auth_token"  # "token" in the name: Airflow masks it in logs
SCHEDULE_ENV = "QUANT_AI_RETRAIN_SCHEDULE"
DEFAULT_SCHEDULE = "@daily"

log = logging.getLogger("airflow.task")


def schedule_from_env(value: str | None) -> str | None:
    """The DAG's schedule: `value` (a preset or cron), None for `none`/empty, else the default."""
    if value is None:
        return DEFAULT_SCHEDULE
    value = value.strip()
    return None if value.lower() in {"", "none", "null", "manual"} else value


def resolve_params(
    run_params: dict[str, Any], variable: dict[str, Any] | None
) -> ray_jobs.PipelineParams:
    """`PipelineParams` from the defaults, the Variable's JSON object and the run's params."""
    defaults = {"working_dir": str(REPO_ROOT)}
    given = {key: value for key, value in run_params.items() if key in _PARAM_NAMES}
    return ray_jobs.PipelineParams.from_layers(defaults, variable or {}, given)


def _param(kind: str | list[str], description: str, **extra: Any) -> Any:
    kinds = [kind] if isinstance(kind, str) else kind
    return Param(None, type=["null", *kinds], description=description, **extra)


PARAMS: dict[str, Any] = {
    "address": _param("string", "Ray dashboard / Jobs API address, e.g. http://ray-head:8265"),
    "working_dir": _param("string", "job working_dir: a local checkout or a package URI"),
    "lake": _param("string", "lake directory or URI that every Ray node can reach"),
    "registry": _param("string", "model registry directory or URI every Ray node can reach"),
    "source": _param("string", "jobs.ingest --source", enum=[None, *SOURCES]),
    "symbols": _param("string", "jobs.ingest --symbols, comma-separated, e.g. BTCUSDT,ETHUSDT"),
    "path": _param("string", "jobs.ingest --path (dump file or glob)"),
    "start": _param("string", "jobs.ingest --start (ISO-8601 UTC)"),
    "end": _param("string", "jobs.ingest --end (ISO-8601 UTC)"),
    "sim_days": _param("integer", "jobs.ingest --sim-days"),
    "pipeline_config": _param("string", "--config of jobs.ingest and jobs.features"),
    "tune_config": _param("string", "jobs.tune --config, e.g. configs/tune/full.yaml"),
    "tune_out": _param("string", "jobs.tune --out; `{run_id}` is replaced by the run id"),
    "deploy": _param("boolean", "run the deploy stage (jobs.deploy) after tune"),
    "serve_config": _param("string", "jobs.deploy --config"),
    "timeouts_s": _param("object", 'per-stage job timeouts, e.g. {"tune": 36000}'),
    "poll_s": _param("number", "seconds between job status polls"),
    "env_vars": _param("object", "environment variables of the Ray jobs"),
}
_PARAM_NAMES = frozenset(PARAMS)


def run_stage(stage: str) -> dict[str, Any]:
    """Submit `stage` as a Ray job, wait for it, and return its id, status and JSON summary."""
    context = get_current_context()
    run_id = str(context["run_id"])
    variable = Variable.get(VARIABLE, None, deserialize_json=True)
    params = resolve_params(dict(context["params"]), variable).for_run(run_id)
    if stage == "deploy" and not params.deploy:
        raise AirflowSkipException("deploy is off: set the run param or Variable key deploy=true")
    entrypoint = ray_jobs.stage_entrypoints(params)[stage]
    runtime_env = ray_jobs.build_runtime_env(params.working_dir, params.env_vars)
    attempt = getattr(context.get("ti"), "try_number", None)
    submission_id = ray_jobs.submission_id_for(stage, run_id, attempt)
    log.info("stage %s -> Ray job %s at %s: %s", stage, submission_id, params.address, entrypoint)

    lines: list[str] = []

    def sink(line: str) -> None:
        lines.append(line)
        log.info("[%s] %s", stage, line)

    token = Variable.get(TOKEN_VARIABLE, None)  # else RAY_AUTH_TOKEN of the worker, if any
    status = ray_jobs.submit_and_wait(
        ray_jobs.connect_client(params.address, token),
        entrypoint,
        runtime_env,
        params.timeouts_s[stage],
        params.poll_s,
        submission_id=submission_id,
        metadata={"stage": stage, "airflow_dag_id": DAG_ID, "airflow_run_id": run_id},
        log_sink=sink,
    )
    return {
        "submission_id": submission_id,
        "status": status,
        "summary": ray_jobs.job_summary("\n".join(lines)),
    }


with DAG(
    dag_id=DAG_ID,
    description="Retrain on Ray: ingest -> features -> tune and gate -> deploy (optional)",
    doc_md=__doc__,
    schedule=schedule_from_env(os.environ.get(SCHEDULE_ENV)),
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # the stages of two runs would write the same lake and registry
    params=PARAMS,
    default_args={"owner": "quant-ai", "retries": 0},
    tags=["quant-ai", "ray"],
) as dag:

    @task(task_id="ingest", retries=2, retry_delay=timedelta(minutes=5))
    def ingest() -> dict[str, Any]:
        """Klines into Bronze (retried: exchanges rate-limit; the Bronze writes are idempotent)."""
        return run_stage("ingest")

    @task(task_id="features")
    def features() -> dict[str, Any]:
        """Bronze -> Silver with Spark on Ray (RayDP)."""
        return run_stage("features")

    @task(task_id="tune")
    def tune() -> dict[str, Any]:
        """Ray Tune sweep, walk-forward scoring and the promotion gate."""
        return run_stage("tune")

    @task(task_id="deploy")
    def deploy() -> dict[str, Any]:
        """Deploy the signal API with Ray Serve (skipped unless `deploy` is true)."""
        return run_stage("deploy")

    ingest() >> features() >> tune() >> deploy()
