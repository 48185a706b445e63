"""`python -m jobs.power`: the detection-power study. The real sweep and promotion gate run over
simulated markets with planted signals of increasing strength and over pure random walks,
several seeds each, fanned out over the Ray cluster; prints the per-strength table and one JSON
line with `min_detectable_accuracy`, `false_promotions` and `random_walk_runs`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cluster.ray_runtime import connect
from configs.schema import PowerStudyConfig, load_config
from jobs._cli import base_parser, print_summary, run, setup_logging, summary_stays_last
from market.storage import resolve

# Absolute, so that the job runs from any working directory.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "power" / "ci.yaml"

TABLE_COLUMNS = (
    "strength",
    "planted_accuracy",
    "oracle_sharpe",
    "runs",
    "promotion_rate",
    "median_winning_score",
    "median_dsr",
    "median_pbo",
)
"""The per-strength table's columns the job prints."""


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="power study YAML config")
    parser.add_argument(
        "--out",
        help="local directory for the runs, tables and report; on a cluster of several nodes "
        "one every node sees (default: runs/power-<UTC time>)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, PowerStudyConfig)
    out = args.out or f"runs/power-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    # An object store or unusable location fails here, before Ray starts (one line, status 2).
    resolve(out).local_path()
    started = time.perf_counter()
    connect(config.ray, args.address)
    from models.power import run_study

    def progress(line: str) -> None:
        print(f"[power] {line}", file=sys.stderr, flush=True)

    result = run_study(config, out, progress)
    shown = result.strengths_table[list(TABLE_COLUMNS)]
    print(shown.to_string(index=False), flush=True)
    summary = result.summary.as_dict()
    print_summary(
        {
            **summary,
            "runs": len(result.runs),
            "outputs": result.outputs,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    # Ray forwards its workers' late messages to stdout: the JSON line stays the last.
    summary_stays_last()
    return 0


if __name__ == "__main__":
    run(main, "power")
