"""The Ray Tune sweep: each trial trains one candidate through Ray Train on every fold.

A trial is a Tune function that launches a `TorchTrainer` (Lightning workers, `ScalingConfig`
from the config) whose per-epoch validation losses reach Tune through `TuneReportCallback`, so
ASHA can stop weak candidates early. With `parallel_folds` above 1 a trial trains that many
folds at once instead, each in its own `TorchTrainer` run, and replays their per-epoch reports
to Tune in fold order as the folds finish (`train_folds_in_parallel`): the same models, scores
and reports as training them in turn, so that a sweep of few trials still fills a cluster's
CPUs or GPUs (ASHA then sees a fold's epochs only once that fold has trained). When training
finishes, the trial loads each fold's model with the shared load function, predicts that
fold's test block, backtests the track record after costs and reports the walk-forward score
(mean fold net Sharpe, annualised). Under CPCV a trial trains one model per split, scores every
backtest path and reports the mean path net Sharpe (`models.evaluation.combine_paths`). Every
trial leaves its fold (or split) models, per-bar returns and folds (or path Sharpe
distribution) in its trial directory (`models.runs`).

Ray Tune's and Ray Train's storage (trial results, checkpoints, the experiment's state) lies in
the run directory, on its filesystem: on an object store every node reads and writes the same
storage, and an interrupted sweep can be resumed from it (`run_sweep(resume=True)`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import BacktestConfig, SearchSpaceConfig, TuneJobConfig
from market.features.spec import HORIZON_BARS
from market.storage import Location
from models.artifact import LoadedModel, load_model_files, read_model_dir
from models.dataset import INPUT_COLUMNS, MarketArrays, cross_asset_columns
from models.evaluation import OutOfSampleBars, evaluate, evaluate_cpcv, model_predictions
from models.folds import CpcvFolds, Fold, Schedule, TrainingRanges, training_units
from models.networks import ModelSpec
from models.runs import COMPLETED, EARLY_STOPPED, ERRORED, RunDir, TrialDir
from models.training import train_loop_per_worker, trial_arrays

EXPERIMENT_NAME = "sweep"
"""The Tune experiment's directory under the run's Tune storage."""

HYPERPARAMETERS = (
    "family",
    "hidden_size",
    "num_layers",
    "dropout",
    "learning_rate",
    "window_bars",
    "batch_size",
    "tcn_kernel_size",
    "tcn_dilations",
    "horizon_bars",
    "label",
    "cross_asset",
)


def search_space(space: SearchSpaceConfig) -> dict[str, Any]:
    """Tune's sampling space from the config (log-uniform learning rate)."""
    from ray import tune

    return {
        "family": tune.choice(list(space.family)),
        "hidden_size": tune.choice(list(space.hidden_size)),
        "num_layers": tune.choice(list(space.num_layers)),
        "dropout": tune.uniform(*space.dropout),
        "learning_rate": tune.loguniform(*space.learning_rate),
        "window_bars": tune.choice(list(space.window_bars)),
        "batch_size": tune.choice(list(space.batch_size)),
        "tcn_kernel_size": tune.choice(list(space.tcn_kernel_size)),
        "tcn_dilations": tune.choice([list(d) for d in space.tcn_dilations]),
        "horizon_bars": tune.choice(list(space.horizon_bars)),
        "label": tune.choice(list(space.label)),
        "cross_asset": tune.choice(list(space.cross_asset)),
    }


def spec_of(config: dict[str, Any], symbols: Sequence[str] = ()) -> ModelSpec:
    """The ModelSpec of a trial's sampled hyper-parameters; a `cross_asset` trial reads the
    same-minute returns of `symbols` (the swept universe) too."""
    cross = tuple(symbols) if config.get("cross_asset") else ()
    return ModelSpec(
        family=config["family"],
        input_size=len(INPUT_COLUMNS) + len(cross_asset_columns(cross)),
        hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_layers"]),
        dropout=float(config["dropout"]),
        window_bars=int(config["window_bars"]),
        learning_rate=float(config["learning_rate"]),
        batch_size=int(config["batch_size"]),
        tcn_kernel_size=int(config["tcn_kernel_size"]),
        tcn_dilations=tuple(int(d) for d in config["tcn_dilations"]),
        # Validated by ModelSpec (one of the Silver horizons); absent in older trial configs.
        horizon_bars=config.get("horizon_bars", HORIZON_BARS),
        label=config.get("label", "direction"),
        cross_asset_symbols=cross,
    )


def backtest_for(config: BacktestConfig, horizon_bars: int) -> BacktestConfig:
    """`config` with its hold set to `horizon_bars` (bars) unless it names its own hold."""
    if config.hold_bars is not None:
        return config
    return config.model_copy(update={"hold_bars": horizon_bars})


def labelling(job: TuneJobConfig, spec: ModelSpec) -> dict[str, Any]:
    """The keyword arguments of `MarketArrays.labelled` for a trial's model (picklable)."""
    backtest = job.backtest
    return {
        "horizon_bars": spec.horizon_bars,
        "label": spec.label,
        "barrier": job.triple_barrier,
        "round_trip_cost_bps": 2.0 * (backtest.fee_bps + backtest.slippage_bps),
        "meta": job.meta_label,
    }


def load_fold_models(
    trial_dir: TrialDir, units: Sequence[Fold] | Sequence[TrainingRanges]
) -> list[LoadedModel]:
    """The trained model of each fold (or CPCV split), in the order given."""
    return [load_model_files(read_model_dir(trial_dir.fold(u.index))) for u in units]


def make_trial(
    job: TuneJobConfig,
    schedule: Schedule,
    data_ref: Any,
    run: RunDir,
    shuffle_labels: bool,
) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of this sweep (closes over picklable values only: the
    run directory's filesystem travels with its endpoint and credentials)."""
    folds_json = [unit.as_dict() for unit in training_units(schedule)]

    def trial(config: dict[str, Any]) -> None:
        import ray
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        base: MarketArrays = ray.get(data_ref)
        spec = spec_of(config, base.symbols)
        train_config = {
            "data": [data_ref],
            "labelling": labelling(job, spec),
            "spec": spec.model_dump(mode="json"),
            "folds": folds_json,
            "seed": job.seed,
            "max_epochs": job.max_epochs,
            "max_train_windows": job.max_train_windows,
            "shuffle_labels": shuffle_labels,
            "threads": max(1, int(job.scaling.cpus_per_worker)),
        }
        trial_dir = run.trial(trial_id)
        if job.parallel_folds > 1 and len(folds_json) > 1:
            val_loss = train_folds_in_parallel(job, run, trial_id, train_config, trial_dir)
        else:
            val_loss = train_folds_in_one_run(job, run, trial_id, train_config, trial_dir)
        trial_dir.config.write_text(json.dumps(config, default=str))
        arrays = trial_arrays(base, labelling(job, spec), spec)
        backtest = backtest_for(job.backtest, spec.horizon_bars)
        if isinstance(schedule, CpcvFolds):
            models = load_fold_models(trial_dir, schedule.splits)
            scored = evaluate_cpcv(trial_id, arrays, schedule, backtest, models)
            evaluation = scored.record
            trial_dir.save(evaluation, (), scored.distribution)
        else:
            test = OutOfSampleBars.of(arrays, schedule)
            models = load_fold_models(trial_dir, schedule)
            predicted, p_up = model_predictions(arrays, schedule, test, models)
            evaluation = evaluate(trial_id, arrays, schedule, test, backtest, predicted, p_up)
            trial_dir.save(evaluation, schedule)
        tune.report({**evaluation.metrics, "evaluated": 1.0, "val_loss": val_loss})

    # Tune registers a trainable under its name for the whole Ray job: two sweeps running at
    # once from one driver (the power study's runs) would otherwise share the name and run
    # each other's closures. Derived from the run directory, so a resumed sweep keeps it.
    trial.__name__ = trial.__qualname__ = trainable_name(run)
    return trial


def trainable_name(run: RunDir) -> str:
    """The Tune trainable name of the sweep stored in `run`: unique per run directory."""
    return "trial_" + hashlib.sha256(run.root.uri.encode()).hexdigest()[:10]


def _torch_trainer(
    job: TuneJobConfig,
    run: RunDir,
    name: str,
    train_config: dict[str, Any],
    callbacks: list[Any],
) -> Any:
    """A `TorchTrainer` of `train_loop_per_worker` on the job's scaling, storing in the run's
    Train storage under `name`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = job.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(name=name, **ray_storage(run.train_storage), callbacks=callbacks),
    )


def train_folds_in_one_run(
    job: TuneJobConfig,
    run: RunDir,
    trial_id: str,
    train_config: dict[str, Any],
    trial_dir: TrialDir,
) -> float:
    """Train every fold of a trial in turn in one Ray Train run whose per-epoch reports reach
    Tune as they happen; the checkpoint (every fold's model) goes to `trial_dir`. Returns the
    last fold's best validation loss."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = _torch_trainer(job, run, f"train-{trial_id}", train_config, [TuneReportCallback()])
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: training returned no checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        trial_dir.path.upload(Path(checkpoint_dir))
    return _last_val(result)


def train_folds_in_parallel(
    job: TuneJobConfig,
    run: RunDir,
    trial_id: str,
    train_config: dict[str, Any],
    trial_dir: TrialDir,
) -> float:
    """Train a trial's folds (or CPCV splits) `job.parallel_folds` at a time, each in its own
    Ray Train run (the job's scaling, its own workers), started in fold order; each run's
    checkpoint (its fold's model) goes to `trial_dir` as it finishes, laid out as the one-run
    path leaves it. Returns the last fold's best validation loss.

    Every fold is seeded by the job's seed and its index alone (`models.training.train_fold`),
    so each model and each loss equals the one-run path's, bit for bit. Tune receives the same
    reports in the same order, at the same `training_iteration`s: fold i's per-epoch reports
    are replayed once folds 0..i have all finished, then the one-run path's closing report
    (without its checkpoint). What ASHA sees differs only in time: a fold's epochs reach it
    after that fold and every earlier one have finished training, not epoch by epoch. So it
    makes the same decisions, but a trial it stops has already trained the folds in flight
    (up to `parallel_folds` of them): early stopping saves the folds not yet started and the
    evaluation, not the training of those in flight (their runs end with the trial).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from ray import tune

    def train_one(fold: dict[str, Any]) -> dict[str, Any]:
        name = f"train-{trial_id}-fold_{fold['index']}"
        one_fold = {**train_config, "folds": [fold], "epoch_history": True}
        # A fold's run reports to no Tune session: its epochs are replayed below, in order.
        result = _torch_trainer(job, run, name, one_fold, []).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"trial {trial_id}: fold {fold['index']} returned no checkpoint")
        with result.checkpoint.as_directory() as checkpoint_dir:
            trial_dir.path.upload(Path(checkpoint_dir))
        return dict(result.metrics or {})

    folds: list[dict[str, Any]] = train_config["folds"]
    # Threads, not tasks: each only waits on its Train run, whose workers hold the resources.
    executor = ThreadPoolExecutor(
        max_workers=min(job.parallel_folds, len(folds)), thread_name_prefix=f"{trial_id}-fold"
    )
    try:
        futures: list[Future[dict[str, Any]]] = [executor.submit(train_one, f) for f in folds]
        finals = []
        for future in futures:
            final = future.result()
            for report in final["epoch_history"]:
                tune.report(dict(report))
            finals.append(final)
    finally:
        # On a failed fold, the runs not yet started never start; those in flight end with
        # the trial's process.
        executor.shutdown(wait=False, cancel_futures=True)
    last_val_loss = float(finals[-1].get("val_loss", float("nan")))
    tune.report(
        {
            "val_loss": last_val_loss,
            "trained_folds": len(folds),
            "world_size": int(finals[-1]["world_size"]),
        }
    )
    return last_val_loss


def ray_storage(location: Location) -> dict[str, Any]:
    """The `storage_path` (and, on an object store, `storage_filesystem`) arguments of a Tune
    or Train `RunConfig` storing at `location`: a local path as is, an object store through
    the filesystem it was resolved with (endpoint and credentials included)."""
    if location.is_local:
        return {"storage_path": location.path}
    return {"storage_path": location.path, "storage_filesystem": location.filesystem}


def trial_resources(job: TuneJobConfig, units: int) -> dict[str, float]:
    """The most one trial of a sweep whose trials train `units` folds (or splits) holds at
    once: its driver's CPUs, and `num_workers` workers of `cpus_per_worker` CPUs (and one GPU
    each with `use_gpu`) per fold run in flight (min(parallel_folds, units) runs)."""
    scaling = job.scaling
    runs = max(1, min(job.parallel_folds, units))
    held = {"CPU": scaling.trial_driver_cpus + runs * scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        held["GPU"] = float(runs * scaling.num_workers)
    return held


def check_parallel_folds_fit(job: TuneJobConfig, units: int, cluster: Mapping[str, float]) -> None:
    """Refuse (ValueError) fold-parallel trials that the cluster's resources (`cluster`, as
    `ray.cluster_resources()` gives them) cannot hold: a fold run that cannot get its workers
    fails after Ray Train's worker-group start timeout instead of waiting. On an autoscaling
    cluster only the nodes already up count. Trials that train their folds in one run
    (`parallel_folds` 1) are not checked."""
    if job.parallel_folds == 1 or units < 2:
        return
    for resource, amount in trial_resources(job, units).items():
        available = float(cluster.get(resource, 0.0))
        if amount > available:
            raise ValueError(
                f"a trial training {min(job.parallel_folds, units)} folds at once holds "
                f"{amount:g} {resource} (driver {job.scaling.trial_driver_cpus:g} CPU, each fold "
                f"run {job.scaling.num_workers} x {job.scaling.cpus_per_worker:g} CPU); the "
                f"cluster has {available:g}: lower parallel_folds or scaling.cpus_per_worker"
            )


class SweepResumeError(Exception):
    """A sweep asked to resume has no experiment state in its run directory."""


class SweepInterruptedError(Exception):
    """The sweep stopped before every trial finished (its driver was interrupted, e.g. by
    Ctrl-C): nothing is scored or registered; its state stays in the run directory, from which
    `run_sweep(resume=True)` continues it."""


def _last_val(result: Any) -> float:
    metrics = result.metrics or {}
    return float(metrics.get("val_loss", float("nan")))


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    status: str
    iterations: int
    metrics: dict[str, Any]
    error: str | None = None


def run_sweep(
    job: TuneJobConfig,
    schedule: Schedule,
    data_ref: Any,
    run: RunDir,
    *,
    shuffle_labels: bool = False,
    resume: bool = False,
) -> list[TrialOutcome]:
    """Run the sweep; every trial started is returned (the DSR counts them all).

    `resume`: continue the experiment stored in `run` (interrupted by a stopped driver or a
    lost cluster) instead of starting one: its finished trials are kept as they are, its
    unfinished and errored ones run again, and the trials it never started run as sampled.
    SweepResumeError when the run directory holds no experiment."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    check_parallel_folds_fit(job, len(training_units(schedule)), ray.cluster_resources())

    # Reports per trial: one per fold (or split) epoch, the checkpoint report, then the
    # evaluation. ASHA stops a trial when it reaches max_t, so max_t must lie past the
    # evaluation report.
    max_t = len(training_units(schedule)) * job.max_epochs + 3
    scheduler: Any = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=min(job.asha_grace_period, max_t),
            reduction_factor=job.asha_reduction_factor,
        )
        if job.asha
        else FIFOScheduler()
    )
    trainable = tune.with_resources(
        make_trial(job, schedule, data_ref, run, shuffle_labels),
        {"CPU": job.scaling.trial_driver_cpus},
    )
    storage = ray_storage(run.tune_storage)
    if resume:
        experiment = run.tune_storage / EXPERIMENT_NAME
        filesystem = storage.get("storage_filesystem")
        if not tune.Tuner.can_restore(experiment.path, storage_filesystem=filesystem):
            raise SweepResumeError(f"no sweep to resume at {experiment.uri}")
        tuner = tune.Tuner.restore(
            experiment.path,
            trainable,
            resume_unfinished=True,
            restart_errored=True,
            storage_filesystem=filesystem,
        )
        return _outcomes(_finished(tuner.fit(), job, run))
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(job.search),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=job.num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(
                random_state=job.seed, max_concurrent=job.max_concurrent_trials
            ),
            max_concurrent_trials=job.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT_NAME, verbose=1, **storage),
    )
    return _outcomes(_finished(tuner.fit(), job, run))


def _finished(grid: Any, job: TuneJobConfig, run: RunDir) -> Any:
    """`grid` when every trial of the sweep ended (completed, stopped early or errored);
    SweepInterruptedError when Tune returned early: on SIGINT it saves its state and returns
    with trials unfinished or never started. The saved state is read back, not the returned
    grid, which shows the trials it stopped on the way out as ended; resuming reads the same
    state."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    storage = ray_storage(run.tune_storage)
    experiment = run.tune_storage / EXPERIMENT_NAME
    saved = ExperimentAnalysis(
        experiment.path, storage_filesystem=storage.get("storage_filesystem")
    ).trials
    ended = sum(trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in saved)
    if ended < max(len(saved), job.num_samples):
        raise SweepInterruptedError(
            f"the sweep was interrupted with {ended} of {job.num_samples} trials ended; "
            f"its state is in {experiment}: resume it with "
            f"`jobs.tune --out {run.root} --resume`"
        )
    return grid


def _outcomes(grid: Any) -> list[TrialOutcome]:
    """Every trial of a finished Tune experiment, by trial id."""
    outcomes = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        if result.error is not None:
            status, error = ERRORED, f"{type(result.error).__name__}: {result.error}"
        elif metrics.get("evaluated") == 1.0:
            status, error = COMPLETED, None
        else:
            status, error = EARLY_STOPPED, None
        outcomes.append(
            TrialOutcome(
                trial_id=trial_id,
                config=dict(result.config or {}),
                status=status,
                iterations=int(metrics.get("training_iteration", 0)),
                metrics=metrics,
                error=error,
            )
        )
    outcomes.sort(key=lambda o: o.trial_id)
    return outcomes
