"""`python -m jobs.pipeline`: the stages `make run` chains (today: ingest -> Silver)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cluster.etl import run_feature_etl
from cluster.ray_runtime import connect
from configs.schema import PipelineConfig, load_config
from jobs._cli import base_parser, print_summary, setup_logging
from market.ingest import run_ingest

DEFAULT_CONFIG = "configs/pipeline/local.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline YAML")
    parser.add_argument("--lake", help="lake directory (overrides the config)")
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, PipelineConfig)
    lake = args.lake or config.lake
    started = time.perf_counter()
    connect(config.ray, args.address)

    print(
        f"[pipeline] 1/2 ingest: {config.ingest.source} {','.join(config.ingest.symbols)}",
        file=sys.stderr,
        flush=True,
    )
    ingest = run_ingest(config.ingest, lake)
    print(
        f"[pipeline] 2/2 features: Spark on Ray -> {Path(lake) / 'silver'}",
        file=sys.stderr,
        flush=True,
    )
    features = run_feature_etl(config.spark, lake)
    rows_by_symbol = features["months_written"]
    print(
        f"[pipeline] Silver at {features['silver']} ({features['rows_out']} rows in, "
        f"{features['rows_written']} written; months per symbol: "
        f"{ {s: len(m) for s, m in rows_by_symbol.items()} }; "
        f"quarantined {features['quarantined']}; gaps {features['gaps']})",
        file=sys.stderr,
        flush=True,
    )
    print_summary(
        {
            "job": "pipeline",
            "lake": lake,
            "silver": features["silver"],
            "stages": {"ingest": ingest, "features": features},
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
