"""`python -m jobs.features`: build the Silver zone from Bronze with PySpark on Ray (RayDP)."""

from __future__ import annotations

from cluster.etl import run_feature_etl
from cluster.ray_runtime import connect
from configs.schema import PipelineConfig, load_config
from jobs._cli import base_parser, print_summary, run, setup_logging
from market.storage import object_store_settings, resolve


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument(
        "--lake", required=True, help="lake: a local path or URI (file://, s3://, gs://)"
    )
    parser.add_argument("--config", help="pipeline YAML whose `spark` section applies")
    parser.add_argument("--executors", type=int, help="Spark executors (overrides the config)")
    args = parser.parse_args(argv)
    setup_logging()
    base = load_config(args.config, PipelineConfig) if args.config else PipelineConfig()
    spark = base.spark
    if args.executors:
        spark = spark.model_copy(update={"executors": args.executors})
    # An unusable lake (unreachable store, missing bucket) fails here, before Ray starts.
    resolve(args.lake, base.object_store)
    connect(base.ray, args.address)
    print_summary(run_feature_etl(spark, args.lake, object_store_settings(base.object_store)))
    return 0


if __name__ == "__main__":
    run(main, "features")
