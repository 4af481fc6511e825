"""The Ray Train edge of the training engine: worker context, DDP, reports, the trainer.

Everything a per-worker training function needs from Ray Train V2, in one place, so that
the loops themselves stay Ray-free: :func:`worker_context` (rank, world size, device, the
checkpoint to resume from), :func:`wrap_ddp`, :func:`report` (metrics + a checkpoint
written by rank 0), :func:`checkpoint_text` and :func:`build_torch_trainer`
(``FailureConfig``, storage, resources). :class:`WorkerSession` gathers what a fold's
training function asks of its process; a fold that trains in its Tune trial instead gets a
:class:`ser_ray.distributed.train_in_tune.TrialSession`, the same four things from Tune.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where it runs: a process that hands reports on never loads it
    from torch import nn


@dataclasses.dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: Any  # torch.device


log = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"  # a report's checkpoint, as Ray's callback names it
REPORT_POLL_S = 0.5  # how often fit_with_reports looks at the reports and at fit()


def worker_context(torch_threads: int | None = None) -> WorkerContext:
    """This worker's rank, world size and device (RAY); torch runs on ``torch_threads``
    threads, by default as many as the worker reserved CPUs
    (:func:`ser_ray.distributed.resources.worker_torch_threads`)."""
    import ray.train
    import ray.train.torch
    import torch

    from ser_ray.distributed.resources import worker_torch_threads

    torch.set_num_threads(torch_threads or worker_torch_threads())

    context = ray.train.get_context()
    return WorkerContext(
        context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
    )


class WorkerSession:
    """What a fold's training function asks of the process it runs in, here a Ray Train
    worker (RAY): its :class:`WorkerContext`, the checkpoint to resume from, reports (metrics
    and a checkpoint that ``write`` fills; every rank writes its own files), the trainer's
    datasets by name, and progress lines for the driver's console (published at
    ``progress_key``, when given)."""

    def __init__(self, progress_key: str | None = None) -> None:
        self.context = worker_context()
        self.progress_key = progress_key

    def progress(self, line: str) -> None:
        publish_line(self.progress_key, line)

    def latest_checkpoint(self):
        return latest_checkpoint()

    def report(self, metrics: dict[str, Any], write: Callable[[Path], Any] | None = None) -> None:
        report(metrics, write, self.context.rank, every_rank_writes=True)

    def dataset(self, name: str):
        from ser_ray.distributed.ingest import worker_shard

        return worker_shard(name)


def publish_line(key: str | None, line: str) -> None:
    """A progress line inside an epoch: in this worker's log, and at ``key`` for the driver
    to print (:func:`ser_ray.distributed.console.publish_progress`; RAY)."""
    from ser_ray.distributed import console

    log.debug("progress: %s", line)  # the driver prints it (with --verbose, twice otherwise)
    if key is not None:
        console.publish_progress(key, line)


def wrap_ddp(model: nn.Module, world_size: int, find_unused_parameters: bool = True) -> nn.Module:
    """The model in DDP when there are several workers (RAY), else the model itself."""
    if world_size == 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(
        model,
        move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters},
    )


def report(
    metrics: dict[str, Any],
    write: Callable[[Path], Any] | None = None,
    rank: int = 0,
    *,
    every_rank_writes: bool = False,
) -> None:
    """Report ``metrics`` to Ray Train (RAY); rank 0 attaches a checkpoint that ``write``
    fills in a temporary folder. With ``every_rank_writes`` every rank does (files of its
    own, e.g. its RNG states: Ray merges the ranks' folders into one checkpoint)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if (rank == 0 or every_rank_writes) and write is not None:
            write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def latest_checkpoint():
    """The checkpoint to resume from after a failure or a restart, or None (RAY)."""
    import ray.train

    return ray.train.get_checkpoint()


def checkpoint_text(checkpoint, name: str) -> str | None:
    """The text of the file ``name`` in ``checkpoint``, or None when it has none (RAY: read
    through the checkpoint's filesystem, local or remote, that file alone)."""
    import pyarrow.fs

    path = f"{checkpoint.path.rstrip('/')}/{name}"
    if checkpoint.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with checkpoint.filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def fit(trainer, what: str):
    """Run ``trainer`` to the end (RAY); its final checkpoint, or the run's error."""
    return final_checkpoint(trainer.fit(), what)


def final_checkpoint(result, what: str):
    """A finished run's final checkpoint, or its error (RAY: a Train ``Result``)."""
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what}: the run left no checkpoint")
    return result.checkpoint


def fit_with_reports(
    build_trainer: Callable[[list], Any], on_report: Callable[[dict[str, Any]], None]
) -> Any:
    """Run ``build_trainer(callbacks).fit()`` beside this thread, which calls
    ``on_report(report)`` for every report of the run, in order (rank 0's metrics, a
    checkpoint as its path under ``checkpoint_path``); return the Train ``Result`` once every
    report has been handed on (RAY). The Train controller, an actor of its own, only appends
    to an unbounded queue, so it never waits on ``on_report``."""
    from ray.util.queue import Empty, Queue

    reports = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer([forward_reports(reports)])
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # raised again in the calling thread below
            outcome["error"] = error

    fitting = threading.Thread(target=run, name="train-fit", daemon=True)
    fitting.start()
    try:
        while True:
            # fit() returns only after its controller's last callback has put its report
            finished = not fitting.is_alive()
            try:
                report = reports.get(timeout=REPORT_POLL_S)
            except Empty:
                if finished:
                    break
                continue
            on_report(report)
        fitting.join()
    finally:
        reports.shutdown(force=True)  # its process ends now, not when a handle is collected
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def forward_reports(reports):
    """The Train controller's side of :func:`fit_with_reports`: each report (rank 0's
    metrics, the checkpoint's path) appended to the queue ``reports`` (RAY: a Train
    ``UserCallback``)."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            report = dict(metrics[0])
            if checkpoint is not None:
                report[CHECKPOINT_PATH_KEY] = checkpoint.path
            reports.put(report)

    return ForwardReports()


def build_torch_trainer(
    per_worker: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | os.PathLike | None = None,
    name: str | None = None,
    max_failures: int = 0,
    resources_per_worker: dict[str, float] | None = None,
    callbacks: list | None = None,
    datasets: dict[str, Any] | None = None,
    dataset_config: Any = None,
):
    """A ``TorchTrainer`` (Ray Train V2) running ``per_worker(config)`` on each worker, with
    ``datasets`` (Ray datasets by name) ingested as ``dataset_config`` says; Ray Train's own
    per-report lines only with ``--verbose`` (:mod:`ser_ray.distributed.console`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ser_ray.distributed import console

    return TorchTrainer(
        per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_path) if storage_path is not None else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level=console.train_log_level()),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
