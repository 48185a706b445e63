"""`python -m jobs.tune`: sweep LSTM/GRU/TCN candidates with Ray Tune, score them walk-forward
after costs, apply the promotion gate and register the best candidate."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cluster.ray_runtime import connect
from configs.schema import DEFAULT_TUNE_CONFIG, TuneJobConfig, load_config
from jobs._cli import base_parser, print_summary, run, setup_logging
from market.storage import object_store_settings, resolve

# Absolute, so that the job runs from any working directory.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / DEFAULT_TUNE_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--lake", required=True, help="lake directory or URI (reads silver/)")
    parser.add_argument("--registry", required=True, help="model registry directory or URI")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="tune YAML config")
    parser.add_argument(
        "--out",
        help="where trials, leaderboard and report go: a path or a URI (s3://, gs://, file://; "
        "default: runs/tune-<UTC time>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep stored in --out (its finished trials are kept)",
    )
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="control run: train on permuted labels (should find no edge)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    job = load_config(args.config, TuneJobConfig)
    if args.seed is not None:
        job = job.model_copy(update={"seed": args.seed})
    if args.resume and not args.out:
        parser.error("--resume needs the --out of the sweep to continue")
    out = args.out or f"runs/tune-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    # The object store's unset fields come from this driver's environment, once, for every
    # trial on every node. An unusable location fails here, before Ray starts (StorageError:
    # one line, status 2).
    object_store = object_store_settings(job.object_store)
    for location in (args.lake, args.registry, out):
        resolve(location, object_store)
    connect(job.ray, args.address)
    from models.selection import run_selection

    def progress(line: str) -> None:
        print(f"[tune] {line}", file=sys.stderr, flush=True)

    result = run_selection(
        args.lake,
        args.registry,
        job,
        out,
        shuffle_labels=args.shuffle_labels,
        resume=args.resume,
        object_store=object_store,
        progress=progress,
    )
    print_summary(result.summary)
    return 0


if __name__ == "__main__":
    run(main, "tune")
