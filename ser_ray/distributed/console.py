"""What a job prints: stage lines, a few lines per fold (its first epoch, at most one every
30 s, its end), warnings, the final table.

Ray, Ray Data and Tune print a lot by default (Tune's trial tables, Ray Data's progress,
Ray Train's per-report lines, its controllers' and helper actors' warnings). Unless
``--verbose`` is given, :func:`configure` turns the driver's share of that down to warnings
before Ray starts, and Ray workers' output stays in their log files in Ray's session folder
(``/tmp/ray/session_latest/logs``) instead of being copied to the console. What the user
needs from the workers comes back to the driver: each fold's epoch metrics (as Tune results),
its progress lines inside a long epoch (:func:`publish_progress`), and any
error, raised with its traceback.

Every console setting of the project is made here: environment variables and logger
levels (:func:`configure`, :func:`quiet_ray_data`), Ray's and Ray Train's console
(:func:`ray_init_kwargs`, :func:`train_log_level`), Tune's tables (:func:`tune_verbosity`,
:func:`search_verbosity`), the readers' datasets (:func:`quiet_dataset`) and Hugging Face's
progress bars (:func:`quiet_transformers`), Ray Data's deprecation of free remote arguments
(:func:`remote_args_without_deprecation`). One exception, below this layer:
``ser_ray.models.ssl.load_model`` hides ``transformers``' load report while it loads (its own
check says it better).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

VERBOSE_ENV = "SER_RAY_VERBOSE"  # "1": Ray's own progress output too (set by configure)


def configure(verbose: bool) -> None:
    """Set how much Ray prints; call before Ray starts (workers inherit the environment)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        # Tune's newer console output prints each experiment's header even at verbose=0;
        # the classic reporter honours it.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # Tune's "The `on_step_begin` operation took 0.8 s, which may be a performance
        # bottleneck": on a busy 2-core machine a few per run, about the machine, not the job
        os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
        # Tune's "Experiment state snapshotting has been triggered multiple times": it saves
        # the experiment's state whenever a fold trial has written num_to_keep checkpoints
        # (so a resume never points at a deleted one), every few seconds in a smoke run; the
        # state of six trials whose only parameter is the fold number is a few kB
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # Tune's ERROR line with the traceback of every failed trial attempt, even one it
        # restarts (a lost node): the fold callbacks print one line instead, and a trial that
        # fails for good raises its error at the end of the run (traceback included)
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        # the "ray" logger of every worker (Ray Train's controller and workers, Tune's trials)
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
        # Hugging Face's per-load/per-save progress bars, in Ray workers (read at import)...
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # ...and here, where it may be imported already
            quiet_transformers()
        # "Token authentication is enabled for this Ray cluster": the default of every local
        # instance since Ray 2.52, a notice about Ray rather than about this job
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )


def quiet_transformers(errors_only: bool = False) -> None:
    """No Hugging Face ``transformers`` progress bars in this process; with ``errors_only``,
    none of its log lines below ERROR either."""
    import transformers

    if errors_only:
        transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quiet_dataset(dataset: ray.data.Dataset) -> None:
    """No progress bars or start-of-execution lines for ``dataset`` and the datasets made from
    it (they share its context), ``--verbose`` or not: a reader's, of which six folds x epochs
    x splits would print otherwise."""
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def tune_verbosity() -> int:
    """``RunConfig(verbose=...)``: Tune's trial tables only with ``--verbose``."""
    return 2 if is_verbose() else 0


def search_verbosity() -> int:
    """``RunConfig(verbose=...)`` of the SVM and AdamW searches: 0 (no Tune trial tables),
    ``--verbose`` or not; each search logs its outcome per fold itself."""
    return 0


def ray_init_kwargs() -> dict[str, Any]:
    """Extra ``ray.init`` arguments: the driver's Ray INFO logs and the Ray workers' console
    output (Ray Train's per-report lines, its placement-group cleaner's and controller's
    warnings, the raylet's notices, our own per-epoch INFO lines) only when verbose. The workers
    still log to their files, Ray's own loggers at warning level only (``RAY_LOGGER_LEVEL``, set
    by :func:`configure`).

    No job-wide ``runtime_env`` here: with one, Ray cannot use the workers it starts with the
    node and starts new ones for the job's first tasks (two more processes on 2 CPUs, ~0.6 s
    before the first task and ~1.3 CPU-seconds per run, measured)."""
    if is_verbose():
        return {}
    return {"logging_level": logging.WARNING, "log_to_driver": False}


def train_log_level() -> str:
    """Ray Train's console level (``ray.train.LoggingConfig``): its per-report and
    per-checkpoint lines, and the training workers' own INFO lines, only when verbose."""
    return "INFO" if is_verbose() else "WARNING"


def quiet_ray_data() -> None:
    """Ray Data's per-dataset start/progress/finish log lines on the console only when
    verbose (its log file in the session folder keeps them)."""
    if is_verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().print_on_execution_start = False
    # its one-time notice that our readers run without progress bars (ray_ingest)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        is_console = isinstance(handler, logging.StreamHandler)
        if is_console and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def remote_args_without_deprecation() -> Iterator[None]:
    """Around a ``map_batches`` given ``max_restarts``: Ray Data 2.60 warns that remote
    arguments outside its named parameters are deprecated, but has no named parameter for
    an actor's restarts (:func:`ser_ray.distributed.resources.feature_cache_actor`)."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`ray_remote_args` is deprecated", category=RayDeprecationWarning
        )
        yield


def no_trial_event_files():
    """A Tune callback standing in for Tune's automatic TensorBoard logger (Tune adds one
    unless a run has its own), which writes every trial's results as event files under the
    run's ``ray/`` folder: TensorBoard on the run folder would show each fold's curves twice
    (ours are in ``tensorboard/``) and every SVM search trial as a run of its own."""
    from ray.tune.logger import TBXLoggerCallback

    class NoTrialEventFiles(TBXLoggerCallback):
        def log_trial_start(self, trial) -> None:
            pass

        def log_trial_result(self, iteration, trial, result) -> None:
            pass

        def log_trial_end(self, trial, failed: bool = False) -> None:
            pass

    return NoTrialEventFiles()


PROGRESS_NAMESPACE = "ser_ray_progress"  # of Ray's key-value store
PROGRESS_POLL_S = 1.0  # how often the driver looks for new progress lines


def progress_key(trial_id: str) -> str:
    """Where the fold of Tune trial ``trial_id`` publishes its progress lines."""
    return f"fold/{trial_id}"


def publish_progress(key: str, line: str) -> None:
    """Make ``line`` the latest progress line of the fold at ``key``, for the driver's
    :func:`fold_progress_callback` to print (RAY).

    How a line inside an epoch reaches the console: the workers' output is not copied to the
    driver without ``--verbose`` (:func:`ray_init_kwargs`), and a ``tune.report`` per line
    would add result rows to every trial (and on several workers, a report every rank must
    join). Ray's key-value store in its control store (GCS) holds the latest line of each
    fold instead: a put from whichever node the fold runs on, no process or actor of its
    own; lines come at most every ``progress_every_s`` (a minute), and the driver looks
    every :data:`PROGRESS_POLL_S`, so none is missed. ``ray.experimental.internal_kv`` is
    the store's Python face (Ray's own libraries use it; its names start with ``_``)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, line, overwrite=True, namespace=PROGRESS_NAMESPACE)


def latest_progress(key: str) -> str | None:
    """The latest line published at ``key``, or None (RAY)."""
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key, namespace=PROGRESS_NAMESPACE)
    return value.decode() if value is not None else None


def forget_progress(key: str) -> None:
    """Remove the line at ``key`` (a fold that ended; RAY)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=PROGRESS_NAMESPACE)


def fold_progress_callback(
    label: str,
    epochs: int,
    on_line: Callable[[Any], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    every_s: float = 30.0,
):
    """A Tune callback printing a fold's first epoch, then at most one epoch line every
    ``every_s`` seconds, and one line when it ends (with its best epoch); one when a failed
    fold restarts (in place of Tune's traceback, see :func:`configure`); and the progress
    lines its running folds publish inside long epochs (:func:`publish_progress`), each also
    handed to ``on_line(trial)`` (the stall watchdog: a fold that prints is not stuck).
    Six folds of a few seconds an epoch print a few lines each, not one per epoch."""
    from ray import tune

    class FoldProgress(tune.Callback):
        def __init__(self) -> None:
            self.polled = -math.inf
            self.shown: dict[str, str] = {}  # trial id -> its last line printed
            self.epoch_printed_at: dict[str, float] = {}  # trial id -> when
            self.last_epoch: dict[str, dict] = {}  # trial id -> its latest epoch's result

        def on_step_begin(self, iteration, trials, **info) -> None:
            if clock() - self.polled < PROGRESS_POLL_S:
                return
            self.polled = clock()
            for trial in trials:
                if trial.status != "RUNNING":
                    continue
                line = latest_progress(progress_key(trial.trial_id))
                if line is not None and line != self.shown.get(trial.trial_id):
                    self.shown[trial.trial_id] = line
                    print(f"{label} fold {trial.config['fold']} {line}", flush=True)
                    if on_line is not None:
                        on_line(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("final") or "epoch" not in result:
                return
            self.last_epoch[trial.trial_id] = result
            printed_at = self.epoch_printed_at.get(trial.trial_id)
            if printed_at is not None and clock() - printed_at < every_s:
                return
            self.epoch_printed_at[trial.trial_id] = clock()
            shown = {k: result[k] for k in ("train/loss", "val/uar") if k in result}
            print(
                f"{label} fold {trial.config['fold']} epoch {result['epoch']}/{epochs}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()),
                flush=True,
            )

        def ended(self, trial) -> None:
            """A fold that printed progress lines: its last one leaves the store."""
            if self.shown.pop(trial.trial_id, None) is not None:
                forget_progress(progress_key(trial.trial_id))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.ended(trial)
            last = self.last_epoch.pop(trial.trial_id, {})
            outcome = f" after epoch {last['epoch']}/{epochs}" if "epoch" in last else ""
            if "best_epoch" in last and "best/val_uar" in last:
                outcome += f", best val/uar {last['best/val_uar']:.4g} (epoch {last['best_epoch']})"
            print(f"{label} fold {trial.config['fold']}: done{outcome}", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            print(
                f"{label} fold {trial.config['fold']}: its trial failed (failure "
                f"{trial.num_failures}: its process or node was lost, or it raised; --verbose "
                "shows why); restarting it from its last checkpoint",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.ended(trial)
            print(f"{label} fold {trial.config['fold']}: FAILED (see the error below)", flush=True)

    return FoldProgress()


def pretrain_progress(
    label: str,
    epochs: int,
    every_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    emit: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Callable[[dict[str, Any]], None]:
    """A pre-training run's report handler (:func:`ser_ray.distributed.train_edge.
    fit_with_reports`): one line for the first epoch, then at most one every ``every_s``
    seconds and one for the last epoch — ``demo encoder: epoch 12/40, contrastive 3.712,
    loss 3.95 (118 s)``. The run's closing report (``final``) prints nothing."""
    start = clock()
    last: list[float] = []

    def on_report(report: dict[str, Any]) -> None:
        if report.get("final") or "epoch" not in report:
            return
        now, epoch = clock(), int(report["epoch"])
        if last and now - last[-1] < every_s and epoch < epochs:
            return
        last.append(now)
        shown = [
            f"{name} {report[key]:.3f}"
            for key, name in (("pretrain/contrastive", "contrastive"), ("pretrain/loss", "loss"))
            if key in report
        ]
        emit(f"{label}: epoch {epoch}/{epochs}, {', '.join(shown)} ({now - start:.0f} s)")

    return on_report
