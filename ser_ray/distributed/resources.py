"""What every Ray worker, trial, task and actor of the project reserves, and why (RAY).

Ray starts a task, actor or trial only when the logical CPUs and GPUs it *reserves* are free;
what it then *uses* is another matter. Six folds train at once on a small machine, and a
placement group that a killed trainer left behind can hold CPUs for a while, so anything
that asks for a CPU at the wrong moment can wait for ever. Every reservation is decided
here; the other modules ask this one.

- **Fold workers** (:func:`fold_resources`): ``--cpus-per-worker``/``--gpus-per-fold``, or by
  default a fair share of the cluster among the folds running at once. CPUs: about one CPU
  is kept free (half the CPUs below 2) for the trial actors and the Ray Data tasks that
  stream each fold's clips into its workers (they reserve none but use some), the rest
  split over folds x workers, rounded down to 0.01, at least 0.05 and at most 4 per worker.
  GPUs (:func:`gpus_per_worker`): one worker per fold takes a fair share of the GPUs (at
  most one, several folds may share a device); DDP ranks each take whole, distinct GPUs,
  since Ray's fractional GPU ids are not unique and NCCL refuses two ranks on one device.
  TAPT's pre-training workers reserve the same as the folds'.
- **Fold trials** (:data:`FOLD_TRIAL_RESOURCES`): each outer fold's Tune trial reserves a
  token CPU; the ``TorchTrainer`` it drives reserves the workers in its own placement
  group, so all folds start at once when the cluster has room and queue otherwise.
- **TAPT tasks** (:data:`TAPT_TASK_CPUS`): the Ray task that launches one fold's
  pre-training reserves a token CPU, for the same reason: the trainer does the work.
- **Parquet read tasks** (:data:`READ_TASK_CPUS`, :data:`READ_CONCURRENCY`): the map tasks
  reading a fold's splits, a pre-training pool or the feature cache's input reserve no CPU,
  one task at a time per dataset (a worker reads one split at a time). Ray Data's own
  Parquet readers ask for CPUs before any row is read (the classic one samples files in
  tasks of one CPU each, ``use_datasource_v2`` lists files in such a task): with the
  folds' workers holding nearly every CPU they could wait for ever (the deadlock that once
  made workers read Parquet themselves). Reads that reserve nothing always start and take
  a small share of the cores while they decode (:mod:`ser_ray.distributed.ingest`).
- **Feature-cache actors and writes** (:func:`feature_cache_actor`,
  :func:`feature_cache_write`): on CPU they reserve no CPU, so the cache is built even
  while a failed trainer's placement groups (its controller killed, e.g. for memory) still
  hold CPUs; on GPU each model actor reserves one GPU. Each actor runs torch on the threads
  Ray gives it (:func:`worker_torch_threads`).
- **Featurizing tasks** (:func:`featurize_tasks`, :func:`plan_batches`): about
  :data:`TASKS_PER_CPU` tasks per cluster CPU, enough to balance clips of different
  lengths, few enough to keep the per-task cost small, each at most the batch size. Ray
  Data's per-operator reservation is off (:data:`FEATURIZE_OP_RESERVATION`): with one
  operator on 2 CPUs it kept one CPU idle for most of the run (1440 clips: 3.8 s with,
  2.4 s without).
- **SVM trials** (:data:`SVM_TRIAL_RESOURCES`, :func:`svm_concurrent_trials`): one CPU
  each, by default as many at once as the cluster has CPUs.
- **AdamW trials** (:func:`adamw_trial_resources`, :func:`adamw_concurrent_trials`,
  :func:`trial_torch_threads`): ``--cpus-per-trial`` (and ``--gpus-per-trial``) each, by
  default as many at once as fit in the cluster's CPUs; torch runs on the whole CPUs a
  trial reserves, at least one thread.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

#: Tune resources of the trial that drives one fold's TorchTrainer (a token CPU).
FOLD_TRIAL_RESOURCES: dict[str, float] = {"CPU": 0.01}
#: CPUs of the Ray task that launches one fold's TAPT TorchTrainer (a token).
TAPT_TASK_CPUS = 0.01
#: CPUs a Parquet read task reserves: none, so it never waits.
READ_TASK_CPUS = 0
#: Parquet read tasks at once per dataset.
READ_CONCURRENCY = 1
#: Featurizing tasks per cluster CPU.
TASKS_PER_CPU = 4
#: Ray Data's per-operator resource reservation while featurizing (off).
FEATURIZE_OP_RESERVATION = False
#: Tune resources of one SVM trial (one CPU).
SVM_TRIAL_RESOURCES: dict[str, float] = {"cpu": 1}


class FoldSettings(Protocol):
    """The study settings :func:`fold_resources` reads (``KFoldConfig`` has them)."""

    workers_per_fold: int
    gpus_per_fold: float | None
    cpus_per_worker: float | None


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def gpus_per_worker(gpus_per_fold: float, workers_per_fold: int) -> float:
    """GPUs each Ray Train worker of a fold reserves; correct by construction.

    One worker per fold may take a fraction of a GPU (several folds share a device, each in
    its own process). DDP ranks (``workers_per_fold > 1``) must each get a whole, distinct
    GPU: Ray's fractional GPU ids are not unique, so two ranks could land on one device,
    which NCCL refuses. Raises ``ValueError`` for anything else.
    """
    if gpus_per_fold <= 0:
        return 0.0
    if workers_per_fold == 1:
        return float(gpus_per_fold)
    per_worker = gpus_per_fold / workers_per_fold
    if per_worker < 1 or per_worker != int(per_worker):
        raise ValueError(
            f"--gpus-per-fold {gpus_per_fold} with --workers-per-fold {workers_per_fold}: "
            "each DDP worker needs whole GPUs of its own (fractional GPUs would put two ranks "
            f"on one device, which NCCL refuses); use --gpus-per-fold "
            f"{workers_per_fold} (or a multiple), or --workers-per-fold 1 to share GPUs"
        )
    return per_worker


def fold_resources(cfg: FoldSettings, n_folds: int) -> dict[str, Any]:
    """Per-fold Train resources (``use_gpu``, ``resources_per_worker``) from the flags or, by
    default, a fair share of the cluster among ``n_folds`` folds running at once."""
    import ray

    cluster = ray.cluster_resources()
    n_cpus, n_gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    gpus_per_fold = cfg.gpus_per_fold
    if gpus_per_fold is None:  # DDP: one whole GPU per worker; one worker: a fair share
        share = min(1.0, n_gpus / n_folds) if cfg.workers_per_fold == 1 else cfg.workers_per_fold
        gpus_per_fold = float(share) if n_gpus else 0.0
    use_gpu = gpus_per_fold > 0
    if use_gpu and not n_gpus:
        raise ValueError(f"--gpus-per-fold {gpus_per_fold}: this Ray cluster has no GPU")
    gpus = gpus_per_worker(gpus_per_fold, cfg.workers_per_fold)
    if gpus > n_gpus:
        raise ValueError(
            f"each worker needs {gpus:g} GPU(s) but this Ray cluster has {n_gpus:g}; lower "
            "--workers-per-fold or --gpus-per-fold"
        )
    cpus = cfg.cpus_per_worker
    if cpus is None:  # keep about one CPU free (see the module doc)
        budget = n_cpus - 1 if n_cpus >= 2 else n_cpus / 2
        cpus = min(4.0, max(0.05, int(100 * budget / (n_folds * cfg.workers_per_fold)) / 100))
    per_worker: dict[str, float] = {"CPU": cpus}
    if use_gpu:
        per_worker["GPU"] = gpus
    return {"use_gpu": use_gpu, "resources_per_worker": per_worker}


def feature_cache_actor(use_gpu: bool) -> dict[str, float]:
    """``map_batches`` resources of one feature-cache model actor: no CPU, or one GPU."""
    return {"num_gpus": 1} if use_gpu else {"num_cpus": 0}


def feature_cache_write(use_gpu: bool) -> dict[str, float]:
    """``ray_remote_args`` of the feature cache's Parquet writes: no CPU (Ray's default with
    a GPU cache)."""
    return {} if use_gpu else {"num_cpus": 0}


def worker_torch_threads() -> int:
    """Torch threads of a Ray actor: the ``OMP_NUM_THREADS`` Ray sets from its CPUs, at
    least one."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))


def plan_batches(n_clips: int, num_cpus: int, max_batch_size: int) -> tuple[int, int]:
    """(clips per task, number of tasks): about TASKS_PER_CPU tasks per CPU so every CPU has
    work, no task larger than ``max_batch_size`` clips (fewer, larger tasks cost less; a
    worker holds :data:`ser_ray.features.featurize.WRITE_CHUNK_CLIPS` of them at a time).

    >>> plan_batches(24, 2, 128), plan_batches(1440, 2, 128), plan_batches(1440, 16, 128)
    ((3, 8), (128, 12), (23, 63))
    """
    per_task = max(1, min(max_batch_size, -(-n_clips // (num_cpus * TASKS_PER_CPU))))
    return per_task, -(-n_clips // per_task)


def featurize_tasks(n_clips: int, max_batch_size: int) -> tuple[int, int]:
    """(clips per task, number of tasks) of featurizing ``n_clips`` on this cluster's CPUs
    (:func:`plan_batches`)."""
    num_cpus = max(1, int(_cluster_cpus()))
    return plan_batches(n_clips, num_cpus, max_batch_size)


def svm_concurrent_trials() -> int:
    """SVM trials at once by default: one per cluster CPU."""
    return max(1, int(_cluster_cpus()))


def adamw_trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Tune resources of one AdamW trial: its CPUs, and its GPUs when it has some."""
    resources: dict[str, float] = {"CPU": cpus_per_trial}
    if gpus_per_trial:
        resources["GPU"] = gpus_per_trial
    return resources


def adamw_concurrent_trials(cpus_per_trial: float) -> int:
    """AdamW trials at once by default: as many as fit in the cluster's CPUs."""
    return max(1, int(_cluster_cpus() // max(cpus_per_trial, 1e-3)))


def trial_torch_threads(cpus_per_trial: float) -> int:
    """Torch threads of one AdamW trial: its whole CPUs, at least one."""
    return max(1, int(cpus_per_trial))
