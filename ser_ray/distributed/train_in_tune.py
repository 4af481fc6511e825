"""A Ray Train run inside a Ray Tune trial (one fold of the study), and a watchdog for trials
that stop making progress.

How the reports reach Tune. A fold's ``TorchTrainer`` reports from its Train controller, an
actor of its own; Tune reads results from the trial's session. Ray's ``TuneReportCallback``
puts each report into a one-slot queue that the *trial's main thread* drains and then reports
itself, blocking until its own result queue has room. When ``trainer.fit()`` returns while the
last report still waits in that queue, the trial's function thread ends and Tune puts its
closing result into the result queue first; the main thread then takes the last report and
waits forever for room that only it would make (Ray 2.60, ``_TrainSession.
_get_result_from_queues``). Whether the Tune driver asks for the next result before or after
the Train run ends decides it: a busy driver (six folds on two cores, a submitted job) loses
the race.

So here the trial's own function thread is the only one that reports to Tune
(:func:`ser_ray.distributed.train_edge.fit_with_reports`): the Train controller's callback
only appends to an unbounded queue, the function thread runs ``fit()`` beside it, hands each
report on with ``tune.report`` (which blocks in the way Tune expects), and returns only once
every report has been handed on.
A report must not carry a key Tune reads as an order (:data:`TUNE_CONTROL_KEYS`): ``done``
ends the trial at once, killing the Train controller before it has shut its workers down,
and their placement group then holds its CPUs for the rest of the job (Train's cleaner of
such groups asks the State API, which a local Ray started without its dashboard lacks).

A fold of one worker needs none of this: it trains in the trial's own process
(:class:`TrialSession`, what :class:`ser_ray.distributed.train_edge.WorkerSession` gives a
Train worker, from Tune: the trial's checkpoint to resume from, ``tune.report`` with a
checkpoint, the fold's datasets read as a one-worker trainer's worker reads them), and Tune
restores a failed trial from its latest checkpoint.

The watchdog (:func:`stall_watchdog`) covers whatever else can stop a fold without an error:
a running trial without a result for ``timeout_s`` fails the whole Tune run with a message
naming the fold and the result it waited for.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ser_ray.distributed import ingest
from ser_ray.distributed import train_edge as edge

TUNE_CONTROL_KEYS = ("done",)  # a result key Tune acts on (it ends the trial)


class FoldStalledError(RuntimeError):
    """A fold's trial made no progress for longer than the watchdog allows."""


def fit_reporting_to_tune(build_trainer: Callable[[list], Any]) -> Any:
    """Run ``build_trainer(callbacks).fit()`` in this Tune trial, handing every report of the
    Train run to Tune from this thread (``tune.report``, a checkpoint as its path under
    ``checkpoint_path``); return the Train ``Result`` once all reports are handed on."""
    from ray import tune

    return edge.fit_with_reports(build_trainer, lambda report: tune.report(checked_report(report)))


class TrialSession:
    """What a fold's training function asks of its process, when that is the fold's Tune
    trial (RAY): rank 0 of one, on ``device`` with ``torch_threads`` threads; the trial's
    checkpoint to resume from (``tune.get_checkpoint``); reports to Tune with a checkpoint
    that ``write`` fills; ``datasets`` read as a one-worker ``TorchTrainer``'s worker reads
    them (:func:`ser_ray.distributed.ingest.local_shards`: same rows, same order); progress
    lines published at ``progress_key`` for the driver's console."""

    def __init__(
        self,
        datasets: dict[str, Any],
        device: str,
        torch_threads: int,
        progress_key: str | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.context = edge.WorkerContext(rank=0, world_size=1, device=torch.device(device))
        self._shards = ingest.local_shards(datasets)
        self.progress_key = progress_key

    def progress(self, line: str) -> None:
        edge.publish_line(self.progress_key, line)

    def latest_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], write: Callable[[Path], Any] | None = None) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory() as tmp:  # Tune copies it to the trial's storage
            checkpoint = None
            if write is not None:
                write(Path(tmp))
                checkpoint = tune.Checkpoint.from_directory(tmp)
            tune.report(checked_report(metrics), checkpoint=checkpoint)

    def dataset(self, name: str):
        return self._shards[name]


def checked_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` if Tune can take it as a plain result; ``ValueError`` naming the key
    otherwise (a ``done`` key would end the trial before its Train run has shut down)."""
    control = [key for key in TUNE_CONTROL_KEYS if key in report]
    if control:
        raise ValueError(
            f"a Train report carries {control}, a key Ray Tune acts on (it ends the trial "
            "while Train still runs, leaving its workers' CPUs reserved); rename it in the "
            "training loop's report"
        )
    return report


def stall_watchdog(label: str, timeout_s: float, clock: Callable[[], float] = time.monotonic):
    """A Tune callback that fails the run when a started trial has had no result for
    ``timeout_s`` seconds: ``FoldStalledError`` naming ``label``'s fold (``config["fold"]``)
    and the result it waited for. ``timeout_s <= 0`` turns it off. Its ``saw_progress(trial)``
    counts a progress line inside an epoch as a sign of life (an epoch of an hour, with a
    line every minute, is not a stall)."""
    from ray import tune

    class StallWatchdog(tune.Callback):
        def __init__(self) -> None:
            self.waiting: dict[str, tuple[float, Any, str]] = {}  # trial id -> since, fold, what

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.waiting[trial.trial_id] = (clock(), trial.config.get("fold"), "its first result")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            epoch = result.get("epoch")
            what = f"the result after epoch {epoch}" if epoch is not None else "its next result"
            self.waiting[trial.trial_id] = (clock(), trial.config.get("fold"), what)

        def saw_progress(self, trial) -> None:
            if trial.trial_id in self.waiting:
                _, fold, what = self.waiting[trial.trial_id]
                self.waiting[trial.trial_id] = (clock(), fold, what)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.waiting.pop(trial.trial_id, None)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.waiting.pop(trial.trial_id, None)

        def on_step_begin(self, iteration, trials, **info) -> None:
            if timeout_s <= 0:
                return
            now = clock()
            for since, fold, what in self.waiting.values():
                if now - since > timeout_s:
                    raise FoldStalledError(
                        f"{label} fold {fold} made no progress for {now - since:.0f} s "
                        f"(limit {timeout_s:g} s): waiting for {what}. Its trial, Train "
                        "controller or workers are stuck; the Ray logs of this session say "
                        "which (/tmp/ray/session_latest/logs). If an epoch really takes that "
                        "long, raise --stall-timeout-s."
                    )

    return StallWatchdog()
