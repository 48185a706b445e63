"""`python -m jobs.pipeline`: the stages `make run` chains: ingest -> Silver -> sweep and gate."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from cluster.etl import run_feature_etl
from cluster.ray_runtime import connect
from configs.schema import PipelineConfig, TuneJobConfig, load_config
from jobs._cli import base_parser, print_summary, setup_logging
from market.ingest import run_ingest

DEFAULT_CONFIG = "configs/pipeline/local.yaml"


def say(line: str) -> None:
    print(f"[pipeline] {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline YAML")
    parser.add_argument("--lake", help="lake directory (overrides the config)")
    parser.add_argument("--registry", help="model registry directory (overrides the config)")
    parser.add_argument(
        "--skip-tune", action="store_true", help="stop after Silver (no sweep, no gate)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, PipelineConfig)
    lake = args.lake or config.lake
    registry = args.registry or config.registry
    tune_path = None if args.skip_tune else config.tune
    stages_total = 3 if tune_path else 2
    started = time.perf_counter()
    connect(config.ray, args.address)
    seconds: dict[str, float] = {}

    say(f"1/{stages_total} ingest: {config.ingest.source} {','.join(config.ingest.symbols)}")
    stage_start = time.perf_counter()
    ingest = run_ingest(config.ingest, lake)
    seconds["ingest"] = round(time.perf_counter() - stage_start, 2)

    say(f"2/{stages_total} features: Spark on Ray -> {Path(lake) / 'silver'}")
    stage_start = time.perf_counter()
    features = run_feature_etl(config.spark, lake)
    seconds["features"] = round(time.perf_counter() - stage_start, 2)
    say(
        f"Silver at {features['silver']} ({features['rows_out']} rows in, "
        f"{features['rows_written']} written; quarantined {features['quarantined']}; "
        f"gaps {features['gaps']})"
    )
    stages: dict[str, Any] = {"ingest": ingest, "features": features}

    if tune_path:
        job = load_config(tune_path, TuneJobConfig)
        out = Path(config.runs) / f"tune-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        say(f"3/{stages_total} tune: {tune_path} ({job.num_samples} trials) -> {out}")
        stage_start = time.perf_counter()
        from models.selection import run_selection

        selection = run_selection(
            lake, registry, job, out, progress=lambda line: say(f"  tune: {line}")
        )
        seconds["tune"] = round(time.perf_counter() - stage_start, 2)
        stages["tune"] = selection.summary
        decision = selection.summary.get("gate", {})
        verdict = (
            f"PROMOTED {decision.get('version')} (DSR {decision.get('dsr', float('nan')):.3f})"
            if decision.get("promoted")
            else "not promoted: " + "; ".join(decision.get("reasons") or [])
        )
        say(f"gate: {verdict}; report {out / 'report.html'}")

    print_summary(
        {
            "job": "pipeline",
            "lake": lake,
            "registry": registry,
            "silver": features["silver"],
            "stages": stages,
            "stage_seconds": seconds,
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
