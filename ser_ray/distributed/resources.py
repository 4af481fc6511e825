"""What every Ray worker, trial, task and actor of the project reserves, and why (RAY).

Ray starts a task, actor or trial only when the logical CPUs and GPUs it *reserves* are free;
what it then *uses* is another matter. Six folds train at once on a small machine, and a
placement group that a killed trainer left behind can hold CPUs for a while, so anything
that asks for a CPU at the wrong moment can wait for ever. Every reservation is decided
here; the other modules ask this one.

- **Folds** (:func:`plan_folds`, a :class:`FoldPlan`, printed in one line and saved in
  ``config.json``): how many folds train at once, workers per fold, CPUs and GPUs per worker
  and torch threads per worker (= its whole CPUs). Without GPUs a worker gets whole CPUs,
  ``floor(CPUs / (folds x workers))`` and at least one, and as many folds run at once as
  fit: on 2 cores two folds of one single-threaded worker each, instead of six folds sharing
  two cores (six at once was no faster than one after another, docs/benchmarks.md, and
  cost ~7 Ray processes per fold). ``--concurrent-folds``, ``--cpus-per-worker``,
  ``--gpus-per-fold`` override it. GPUs (:func:`gpus_per_worker`): one worker per fold
  takes a fair share of the GPUs (at most one, several folds may share a device); DDP ranks
  each take whole, distinct GPUs, since Ray's fractional GPU ids are not unique and NCCL
  refuses two ranks on one device. TAPT's pre-training workers reserve the same as the
  folds'.
- **Where a fold trains** (:attr:`FoldPlan.in_trial`, :meth:`FoldPlan.trial_resources`): a
  fold of one worker trains in its Tune trial's own process, which reserves the worker's CPUs
  and GPUs. A ``TorchTrainer`` would add six Ray processes per fold (its controller, worker,
  placement-group cleaner, synchronization actor, dataset manager, and the queue that hands
  its reports to Tune) and their CPU time, for one worker that the trial's process can be
  (default run on 2 cores: 19 ``ray::`` processes at most at once, the workers ~72% of the
  CPU while the folds train). Folds of several workers (DDP) run a ``TorchTrainer``; their
  trial reserves no CPU, only its process's memory (:data:`FOLD_TRIAL_RESOURCES`, Tune
  needs a non-empty request), and the trainer reserves the workers in its own placement
  group, so the plan's folds start at once and the others queue.
- **TAPT tasks** (:data:`TAPT_TASK_CPUS`): the Ray task that launches one fold's
  pre-training reserves no CPU, for the same reason: the trainer does the work.
- **The demo encoder's pre-training** runs in the job's driver, not on Ray
  (:mod:`ser_ray.distributed.demo_encoder`): nothing else runs while it is built; torch runs
  on :data:`DEMO_ENCODER_THREADS` threads on every machine (float sums depend on the number
  of threads, so the encoder's weights would otherwise depend on the machine).
- **Parquet read tasks** (:data:`READ_TASK_CPUS`, :data:`READ_CONCURRENCY`): the map tasks
  reading a fold's splits or a pre-training pool (a source over 1 GiB; a smaller one is read
  by the process that builds the trainer, no task) or the feature cache's input reserve no CPU,
  one task at a time per dataset (a worker reads one split at a time). Ray Data's own
  Parquet readers ask for CPUs before any row is read (the classic one samples files in
  tasks of one CPU each, ``use_datasource_v2`` lists files in such a task): with the
  folds' workers holding nearly every CPU they could wait for ever (the deadlock that once
  made workers read Parquet themselves). Reads that reserve nothing always start and take
  a small share of the cores while they decode (:mod:`ser_ray.distributed.ingest`).
- **Feature-cache actors and writes** (:func:`feature_cache_actor`,
  :func:`feature_cache_write`, :func:`feature_cache_actors`): the cache is built alone,
  before the folds start, on every GPU of the cluster when it has some (one actor per GPU,
  one GPU each), else on its CPUs: one actor per CPU (at most :data:`MAX_CACHE_ACTORS`, each
  holds a copy of the model), each on :data:`CACHE_ACTOR_THREADS` torch thread, so a clip's
  features do not depend on the machine. On CPU they reserve no CPU, so the cache is built
  even while a failed trainer's placement groups (its controller killed, e.g. for memory)
  still hold CPUs. An actor that dies is not restarted (``max_restarts=0``): Ray Data's default
  restarts it without limit (one that runs out of memory would keep dying), and Ray prints
  an error-level ``core_worker.cc`` line for every such actor, whose constructor arguments
  Ray Data keeps in the object store. The build then fails with the actor's error, and
  ``--resume`` starts it again (it is written whole or not at all).
- **Featurizing tasks** (:func:`featurize_tasks`, :func:`plan_batches`): about
  :data:`TASKS_PER_CPU` tasks per cluster CPU, enough to balance clips of different
  lengths, few enough to keep the per-task cost small, each at most the batch size. Ray
  Data's per-operator reservation is off (:data:`FEATURIZE_OP_RESERVATION`): with one
  operator on 2 CPUs it kept one CPU idle for most of the run (1440 clips: 3.8 s with,
  2.4 s without).
- **eGeMAPS added later** (:func:`egemaps_task`): one task per features file, one CPU each
  (openSMILE runs on one thread).
- **SVM trials** (:data:`SVM_TRIAL_RESOURCES`, :func:`svm_concurrent_trials`): one CPU
  each, by default as many at once as the cluster has CPUs.
- **AdamW trials** (:func:`adamw_trial_resources`, :func:`adamw_concurrent_trials`,
  :func:`trial_torch_threads`): ``--cpus-per-trial`` (and ``--gpus-per-trial``) each, by
  default as many at once as fit in the cluster's CPUs; torch runs on the whole CPUs a
  trial reserves, at least one thread.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

from ser_ray.common.errors import SettingsError

#: Tune resources of the trial that drives one fold's TorchTrainer: no CPU, its memory.
FOLD_TRIAL_RESOURCES: dict[str, float] = {"CPU": 0, "memory": 300 * 2**20}
#: CPUs of the Ray task that launches one fold's TAPT TorchTrainer (none).
TAPT_TASK_CPUS = 0
#: Torch threads of the demo encoder's pre-training, on every machine (its weights then do not
#: depend on the machine's cores); two use the smallest machine the README targets fully.
DEMO_ENCODER_THREADS = 2
#: Torch threads of a feature-cache actor on CPU: one, the same on every machine.
CACHE_ACTOR_THREADS = 1
#: At most this many feature-cache actors on CPU (each holds a copy of the model).
MAX_CACHE_ACTORS = 8
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
    """The study settings :func:`plan_folds` reads (``KFoldConfig`` has them)."""

    workers_per_fold: int
    gpus_per_fold: float | None
    cpus_per_worker: float | None
    concurrent_folds: int | None


def _cluster() -> dict[str, float]:
    """The Ray cluster's resources (``CPU``, ``GPU``, ...) (RAY)."""
    import ray

    return ray.cluster_resources()


def _cluster_cpus() -> float:
    return _cluster().get("CPU", 1)


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
        raise SettingsError(
            f"--gpus-per-fold {gpus_per_fold} with --workers-per-fold {workers_per_fold}: "
            "each DDP worker needs whole GPUs of its own (fractional GPUs would put two ranks "
            f"on one device, which NCCL refuses); use --gpus-per-fold "
            f"{workers_per_fold} (or a multiple), or --workers-per-fold 1 to share GPUs"
        )
    return per_worker


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """How the wav2vec2 folds use the cluster (:func:`plan_folds`)."""

    folds: int
    concurrent_folds: int
    workers_per_fold: int
    cpus_per_worker: float
    gpus_per_worker: float
    torch_threads: int  # per worker: its whole CPUs, at least one
    cluster_cpus: float
    cluster_gpus: float
    in_trial: bool  # a fold trains in its Tune trial's process (one worker), not a TorchTrainer

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def trial_resources(self) -> dict[str, float]:
        """Tune resources of a fold's trial: the worker's when the fold trains in it, else
        :data:`FOLD_TRIAL_RESOURCES` (its ``TorchTrainer`` reserves the workers)."""
        if not self.in_trial:
            return dict(FOLD_TRIAL_RESOURCES)
        return dict(self.train_resources()["resources_per_worker"])

    def train_resources(self) -> dict[str, Any]:
        """``use_gpu`` and ``resources_per_worker`` of each fold's TorchTrainer."""
        per_worker: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            per_worker["GPU"] = self.gpus_per_worker
        return {"use_gpu": self.use_gpu, "resources_per_worker": per_worker}

    def line(self) -> str:
        """The plan in one line, for the console."""
        gpus = f" + {self.gpus_per_worker:g} GPU" if self.use_gpu else ""
        where = (
            "each in its Tune trial's process"
            if self.in_trial
            else f"{self.workers_per_fold} TorchTrainer workers per fold"
        )
        return (
            f"resource plan: {self.concurrent_folds} of {self.folds} folds at once, {where}, "
            f"{self.cpus_per_worker:g} CPU{gpus} and {self.torch_threads} torch thread(s) per "
            f"worker (cluster: {self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs)"
        )


def plan_folds(
    cfg: FoldSettings, n_folds: int, cluster: dict[str, float] | None = None
) -> FoldPlan:
    """The plan for ``n_folds`` folds on ``cluster`` (default: ``ray.cluster_resources()``),
    from the flags where given (``concurrent_folds``, ``cpus_per_worker``, ``gpus_per_fold``)
    and the rules of the module doc otherwise (tests/test_kfold_config.py has examples)."""
    cluster = _cluster() if cluster is None else cluster
    n_cpus, n_gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    workers = cfg.workers_per_fold
    gpus_per_fold = cfg.gpus_per_fold
    if gpus_per_fold is None:  # DDP: one whole GPU per worker; one worker: a fair share
        share = min(1.0, n_gpus / n_folds) if workers == 1 else workers
        gpus_per_fold = float(share) if n_gpus else 0.0
    if gpus_per_fold > 0 and not n_gpus:
        raise SettingsError(f"--gpus-per-fold {gpus_per_fold}: this Ray cluster has no GPU")
    gpus = gpus_per_worker(gpus_per_fold, workers)
    if gpus > n_gpus:
        raise SettingsError(
            f"each worker needs {gpus:g} GPU(s) but this Ray cluster has {n_gpus:g}; lower "
            "--workers-per-fold or --gpus-per-fold"
        )
    cpus = cfg.cpus_per_worker
    if cpus is None:  # whole CPUs: a worker's threads never share a core with another's
        cpus = float(max(1, int(n_cpus // (n_folds * workers))))
    if cpus <= 0:
        raise SettingsError(f"--cpus-per-worker {cpus}: give a positive number of CPUs")
    concurrent = cfg.concurrent_folds
    if concurrent is None:
        concurrent = max(1, int(n_cpus // (workers * cpus)))
    if concurrent < 1:
        raise SettingsError(f"--concurrent-folds {concurrent}: give at least 1")
    return FoldPlan(
        folds=n_folds,
        concurrent_folds=min(concurrent, n_folds),
        workers_per_fold=workers,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        torch_threads=max(1, int(cpus)),
        cluster_cpus=n_cpus,
        cluster_gpus=n_gpus,
        in_trial=workers == 1,
    )


def asked_resources(cfg: FoldSettings, n_folds: int) -> tuple[float, float]:
    """(CPUs, GPUs) the flags explicitly ask of the cluster for the folds: ``concurrent_folds``
    folds (all ``n_folds`` when only ``gpus_per_fold`` is given) of ``workers_per_fold``
    workers, each ``cpus_per_worker`` (default 1) CPUs and its GPU share; (0, 0) when neither
    flag is given (the plan then fits the folds to the cluster it finds)."""
    if cfg.concurrent_folds is None and not cfg.gpus_per_fold:
        return 0.0, 0.0
    folds = min(cfg.concurrent_folds or n_folds, n_folds)
    cpus = folds * cfg.workers_per_fold * (cfg.cpus_per_worker or 1.0)
    return float(cpus), float(folds * (cfg.gpus_per_fold or 0.0))


def cluster_has_gpu() -> bool:
    """Whether the Ray cluster has a GPU."""
    return _cluster().get("GPU", 0) > 0


def feature_cache_actors(use_gpu: bool) -> int:
    """Feature-cache model actors at once: one per GPU, or one per CPU (at most
    :data:`MAX_CACHE_ACTORS`)."""
    cluster = _cluster()
    if use_gpu:
        return max(1, int(cluster.get("GPU", 0)))
    return max(1, min(MAX_CACHE_ACTORS, int(cluster.get("CPU", 1))))


def feature_cache_actor(use_gpu: bool) -> dict[str, Any]:
    """``map_batches`` resources of one feature-cache model actor: no CPU, or one GPU; never
    restarted. Spread over the nodes: an actor that reserves no CPU fits anywhere, and Ray
    would put them all on the driver's node, leaving a cluster's other CPUs idle."""
    if use_gpu:
        return {"num_gpus": 1, "max_restarts": 0}
    return {"num_cpus": 0, "max_restarts": 0, "scheduling_strategy": "SPREAD"}


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


def egemaps_task() -> dict[str, float]:
    """``options`` of the task that adds eGeMAPS to one features file: one CPU."""
    return {"num_cpus": 1}


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
