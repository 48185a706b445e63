"""`python -m jobs.ingest`: fetch klines into the Bronze zone of a lake."""

from __future__ import annotations

from cluster.ray_runtime import connect
from configs.schema import SOURCES, IngestConfig, PipelineConfig, load_config
from jobs._cli import base_parser, print_summary, run, setup_logging
from market.ingest import run_ingest
from market.storage import object_store_settings, resolve


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--symbols", required=True, help="comma-separated, e.g. BTCUSDT,ETHUSDT")
    parser.add_argument("--path", help="dump file or glob (--source dump)")
    parser.add_argument("--start", help="ISO-8601 UTC start (inclusive)")
    parser.add_argument("--end", help="ISO-8601 UTC end (inclusive)")
    parser.add_argument(
        "--lake", required=True, help="lake: a local path or a URI (file://, s3://, gs://)"
    )
    parser.add_argument("--config", help="pipeline YAML whose ingest.sim/ingest.binance apply")
    parser.add_argument("--base-url", help="Binance REST base URL (overrides the config)")
    parser.add_argument("--sim-days", type=int, help="days to simulate when --end is absent")
    args = parser.parse_args(argv)
    setup_logging()

    base = load_config(args.config, PipelineConfig) if args.config else PipelineConfig()
    binance = base.ingest.binance
    if args.base_url:
        binance = binance.model_copy(update={"base_url": args.base_url})
    config = IngestConfig(
        source=args.source,
        symbols=[s.strip().upper() for s in args.symbols.split(",") if s.strip()],
        path=args.path,
        start=args.start,
        end=args.end,
        sim_days=args.sim_days or base.ingest.sim_days,
        sim=base.ingest.sim,
        binance=binance,
    )
    # An unusable lake fails here, before Ray starts (StorageError: one line, exit status 2);
    # the settings are completed from the environment once, for the probe and every task.
    object_store = object_store_settings(base.object_store)
    lake = resolve(args.lake, object_store)
    connect(base.ray, args.address)
    print_summary(run_ingest(config, lake, object_store))
    return 0


if __name__ == "__main__":
    run(main, "ingest")
