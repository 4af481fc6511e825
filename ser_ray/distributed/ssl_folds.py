"""The outer folds of one SSL variant as concurrent Ray Tune trials (RAY), one trial per fold.

A fold of one worker (the default) trains in the trial's own process
(:func:`ser_ray.distributed.fold_trainer.train_fold_in_trial`), which reserves the worker's
CPUs and GPUs; a fold of several workers (DDP) drives a Ray Train ``TorchTrainer`` running
:func:`ser_ray.distributed.fold_trainer.train_fold_per_worker` (Ray Train V2 + Tune interop),
whose workers reserve their CPUs and GPUs in its own placement group. The resource plan
(:mod:`ser_ray.distributed.resources`) says which, and how many folds run at once. Two layers
of fault tolerance:

- a fold whose process dies is restarted from its last epoch checkpoint (by Tune,
  ``FailureConfig``, for a fold in its trial; by Ray Train for a trainer's worker);
- a driver that dies is continued with ``resume=True`` (``Tuner.restore``): finished folds
  are not re-run, unfinished ones resume from their checkpoints.

What a trial is given is one :class:`FoldJob`; Tune's param space is the fold number alone,
so its tables and saved state stay small. From it the trial makes its fold's
:class:`~ser_ray.distributed.fold_work.FoldWork`, what the fold's training is handed. The
study's settings come in as :class:`SslFoldSettings` (a protocol the study's
``KFoldConfig`` satisfies): this layer does not import the study.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Mapping
from typing import Any

from ser_ray.common import storage
from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed import console
from ser_ray.distributed.fold_inputs import FoldInputs, fold_inputs_per_fold
from ser_ray.distributed.fold_trainer import FoldOutcome, fold_result_from_checkpoint
from ser_ray.distributed.fold_work import FoldWork
from ser_ray.distributed.resources import FoldPlan, FoldSettings, plan_folds
from ser_ray.distributed.train_edge import CHECKPOINT_PATH_KEY
from ser_ray.training.config import TrainConfig

log = logging.getLogger(__name__)


class SslFoldSettings(FoldSettings, typing.Protocol):
    """The study settings :func:`run_ssl_folds` reads besides the resource plan's."""

    max_failures: int
    resume: bool
    stall_timeout_s: float


@dataclasses.dataclass(frozen=True)
class FoldJob:
    """What every fold trial of one SSL variant is handed (``tune.with_parameters``).

    The defaults of the plan's fields are the plan of one worker per fold on a CPU, trained
    in its trial's process (what a test of one fold needs)."""

    #: The variant's name: TensorBoard folder, the TorchTrainer's run name, console lines.
    variant: str
    #: The resolved protocol (what ``protocol.json`` holds).
    protocol: Protocol
    #: Per fold number: its training settings (encoder resolved, TAPT's per fold).
    train_configs: dict[int, TrainConfig]
    #: Per fold number: what it reads, features or a feature cache.
    inputs: dict[int, FoldInputs]
    #: TensorBoard's root; a fold logs under ``<variant>/fold_<k>``.
    tensorboard_dir: str
    #: Ray Train workers per fold (DDP when more than one).
    workers_per_fold: int = 1
    #: Train in the trial's own process (one worker), else through a TorchTrainer.
    in_trial: bool = True
    #: Torch threads of a fold trained in its trial (the worker's whole CPUs).
    torch_threads: int = 1
    #: Restarts of a TorchTrainer's workers before the fold fails.
    max_failures: int = 0
    #: Where a TorchTrainer keeps its state (checkpoints a restart resumes from).
    storage_path: str | None = None
    #: Train on CUDA.
    use_gpu: bool = False
    #: What each TorchTrainer worker reserves.
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1.0})

    def work(self, fold: int, progress_key: str | None = None) -> FoldWork:
        """What ``fold``'s training is handed: its training settings, inputs, the protocol,
        its TensorBoard folder and where its progress lines go."""
        return FoldWork(
            train=self.train_configs[fold],
            inputs=self.inputs[fold],
            fold=fold,
            protocol=self.protocol,
            variant=self.variant,
            log_dir=storage.join(self.tensorboard_dir, self.variant, f"fold_{fold}"),
            progress_key=progress_key,
        )


def fold_trial(config: dict[str, Any], job: FoldJob) -> None:
    """One Tune trial = one outer fold (``config["fold"]``) of ``job``'s variant, trained in
    this process (one worker) or by a TorchTrainer (DDP), as the resource plan says."""
    from ray import tune

    from ser_ray.distributed.fold_trainer import build_fold_trainer, train_fold_in_trial
    from ser_ray.distributed.train_in_tune import fit_reporting_to_tune

    fold = int(config["fold"])
    trial_id = tune.get_context().get_trial_id()  # RAY: where its progress lines go
    work = job.work(fold, console.progress_key(trial_id))
    if job.in_trial:
        device = "cuda" if job.use_gpu else "cpu"
        train_fold_in_trial(work, device=device, torch_threads=job.torch_threads)
        return
    result = fit_reporting_to_tune(  # RAY: Train reports -> this Tune trial
        lambda callbacks: build_fold_trainer(
            work,
            num_workers=job.workers_per_fold,
            use_gpu=job.use_gpu,
            resources_per_worker=job.resources_per_worker,
            storage_path=job.storage_path,
            name=f"{job.variant}_fold_{fold}",  # stable: a restart resumes its checkpoints
            max_failures=job.max_failures,
            callbacks=callbacks,
        )
    )
    if result.error is not None:
        raise result.error


def run_ssl_folds(
    variant: str,
    features_dir: str | os.PathLike,
    settings: SslFoldSettings,
    protocol: Protocol,
    train_cfgs: Mapping[int, TrainConfig],
    out: str,
    ray_storage: str,
    *,
    speaker_norm: bool = False,
) -> list[FoldOutcome]:
    """All folds of ``variant`` as concurrent Tune trials; each fold's outcome (metrics,
    history, predictions, model), its final checkpoint copied to ``out/<variant>/fold_<k>/``.
    ``speaker_norm``: a probe's pooled layers z-normalised per speaker."""
    fold_numbers = protocol.fold_numbers
    plan = plan_folds(settings, len(fold_numbers))
    # before the folds start: building a cache needs CPUs that running folds would hold
    inputs = fold_inputs_per_fold(
        features_dir, train_cfgs, storage.join(out, "feature_cache"), speaker_norm=speaker_norm
    )
    job = FoldJob(
        variant=variant,
        protocol=protocol,
        train_configs={k: train_cfgs[k] for k in fold_numbers},
        inputs={k: inputs[k] for k in fold_numbers},
        tensorboard_dir=storage.join(out, "tensorboard"),
        workers_per_fold=settings.workers_per_fold,
        in_trial=plan.in_trial,
        torch_threads=plan.torch_threads,
        max_failures=settings.max_failures,
        storage_path=ray_storage,
        **plan.train_resources(),
    )
    epochs = train_cfgs[fold_numbers[0]].epochs
    grid = _tuner(job, plan, settings, fold_numbers, epochs).fit()
    return _outcomes(grid, variant, out)


def _tuner(
    job: FoldJob, plan: FoldPlan, settings: SslFoldSettings, fold_numbers: list[int], epochs: int
):
    """The Tune run of ``job``'s folds, a grid over the fold numbers; restored from
    ``job.storage_path`` with ``settings.resume`` (finished folds are not re-run)."""
    from ray import tune

    from ser_ray.distributed.train_in_tune import stall_watchdog

    trainable = tune.with_resources(
        tune.with_parameters(fold_trial, job=job), plan.trial_resources()
    )
    name = f"{job.variant}_folds"
    watchdog = stall_watchdog(job.variant, settings.stall_timeout_s)
    experiment = storage.join(job.storage_path, name)
    if settings.resume and tune.Tuner.can_restore(experiment):
        log.info("resuming %s", experiment)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"fold": tune.grid_search(fold_numbers)},
        # a finished fold's trial process takes the next fold: no new process, no imports
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrent_folds, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=job.storage_path,
            # a fold in its trial restarts as a Train worker would; a TorchTrainer's
            # trial once more after the trainer's own restarts
            failure_config=tune.FailureConfig(
                max_failures=settings.max_failures if plan.in_trial else 1
            ),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=console.tune_verbosity(),
            callbacks=[  # progress first: its lines tell the watchdog a fold is alive
                console.fold_progress_callback(job.variant, epochs, watchdog.saw_progress),
                watchdog,
                console.no_trial_event_files(),
            ],
        ),
    )


def _outcomes(grid, variant: str, out: str) -> list[FoldOutcome]:
    """Each fold's outcome, in fold order, from its final checkpoint (a TorchTrainer's is in
    its run folder, a trial's in Tune's); a failed fold raises, naming it."""
    import ray.train

    outcomes = []
    for result in sorted(grid, key=lambda r: r.config["fold"]):
        fold = int(result.config["fold"])
        if result.error is not None:
            raise RuntimeError(f"{variant} fold {fold} failed: {result.error}") from result.error
        path = result.metrics.get(CHECKPOINT_PATH_KEY)
        checkpoint = ray.train.Checkpoint(path) if path else result.checkpoint
        outcomes.append(
            fold_result_from_checkpoint(checkpoint, storage.join(out, variant, f"fold_{fold}"))
        )
    return outcomes
