"""Bayesian search of the AdamW settings of the wav2vec2 loop on Ray Tune (Optuna TPE + ASHA).

What is searched (:class:`SearchSpace`): the encoder and head peak learning rates, weight
decay, AdamW's beta2, the warm-up and decay-start fractions of the schedule, and gradient
clipping (off, or on at a searched norm). Everything else is a fixed :class:`TrainConfig`.

What is scored: validation UA (``val/uar``) on validation speakers taken from the
*training side* of one outer fold (:meth:`ser_ray.corpus.protocol.Protocol.split`); the
fold's test speakers are never read. ASHA (``ASHAScheduler`` on ``val/uar`` per epoch)
stops weak trials early; the searcher learns from ``best/val_uar`` (the best epoch's val UA,
the epoch whose weights the loop keeps) and the best trial is the one with the highest val
UA at any epoch.

Each trial is a plain Tune function trainable (:func:`adamw_trial`) that trains in its own
process with :func:`ser_ray.training.finetune.run_training` and calls ``tune.report`` once per
epoch; no ``TorchTrainer`` (its ~20 s start-up per trial would dominate small sweeps). Its
clips stream in through Ray Data exactly as a study fold's workers' do (:func:`trial_clips`),
so a trial trains on the batches the study would for the same settings. The frozen CNN's
outputs come from the feature cache, built once before the search
(:mod:`ser_ray.distributed.fold_inputs`).

Ray touch-points: ``tune.with_parameters`` / ``tune.with_resources`` and ``Tuner`` in
:func:`tune_fold`, ``tune.report`` in :func:`adamw_trial`, the clips and the feature cache
(Ray Data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ser_ray.common import config_file, storage
from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed import console, ingest
from ser_ray.distributed.fold_inputs import FoldInputs, build_fold_inputs
from ser_ray.distributed.fold_trainer import count_splits, kept_labels, open_fold_clips
from ser_ray.distributed.fold_work import FoldWork
from ser_ray.distributed.resources import (
    adamw_concurrent_trials,
    adamw_trial_resources,
    trial_torch_threads,
)
from ser_ray.models.ssl import DEMO_MODEL, RANDOM_DEMO_MODEL
from ser_ray.training.clip_data import ClipArrays, count_classes
from ser_ray.training.clip_stream import ClipStream
from ser_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

METRIC = "val/uar"  # ASHA compares trials on this at equal epochs
SEARCH_METRIC = "best/val_uar"  # what Optuna learns from and what picks the best trial
TIME_ATTR = "training_iteration"  # one report per epoch, so this counts epochs
#: The TrainConfig fields a sweep decides (``best.json["params"]`` holds exactly these).
SEARCHED_FIELDS = (
    "lr_encoder",
    "lr_head",
    "weight_decay",
    "betas",
    "warmup_frac",
    "decay_start_frac",
    "grad_clip_norm",
)
BETA1 = 0.9  # AdamW beta1, fixed
PUBLISHED_LR_ENCODER = (1e-5, 1e-4)  # wav2vec2 fine-tuning range in the literature
DEMO_LR_ENCODER = (1e-5, 1e-3)  # the tiny random demo encoder tolerates (and needs) more
GRACE_RULE = (
    "no trial is cut before a third of its epochs nor before the longest searched warm-up "
    "ends (grace_period = max(ceil(epochs / 3), ceil(max warmup_frac * epochs)))"
)
HOLDOUT_NOTE = (
    "tuned on the training speakers of outer fold {fold} only (fit speakers {fit}, validation "
    "speakers {val}); only fold {fold}'s test score (speakers {test}) is untouched by this search. "
    "Running all folds with these params leaks the other folds' test speakers into the choice "
    "(they were training/validation speakers here); use --nested for an unbiased estimate."
)


@dataclasses.dataclass
class SearchSpace:
    """Ranges of the Bayesian search; ``(low, high)``, log-uniform where marked."""

    lr_encoder: tuple[float, float] = DEMO_LR_ENCODER  # log; real models: 1e-5..1e-4
    lr_head: tuple[float, float] = (1e-4, 1e-2)  # log
    weight_decay: tuple[float, float] = (1e-4, 1e-1)  # log
    beta2: tuple[float, float] = (0.95, 0.999)  # uniform
    warmup_frac: tuple[float, float] = (0.0, 0.25)  # uniform
    decay_start_frac: tuple[float, float] = (0.4, 1.0)  # uniform; always >= warmup_frac
    grad_clip_norm: tuple[float, float] = (0.5, 5.0)  # log, when clipping is on

    LOG_SCALE = ("lr_encoder", "lr_head", "weight_decay", "grad_clip_norm")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            low, high = (float(v) for v in getattr(self, f.name))
            setattr(self, f.name, (low, high))
            if not low <= high or (f.name in self.LOG_SCALE and low <= 0):
                raise ValueError(f"{f.name} range {(low, high)} is not a valid range")
        if self.warmup_frac[1] > self.decay_start_frac[0]:
            raise ValueError("warmup_frac's range must end before decay_start_frac's begins")

    @classmethod
    def for_model(cls, model: str, **ranges: tuple[float, float]) -> SearchSpace:
        """Defaults for ``model``: the published encoder-LR range unless it is the demo."""
        if "lr_encoder" not in ranges or ranges["lr_encoder"] is None:
            demo = model in (DEMO_MODEL, RANDOM_DEMO_MODEL)  # demo-size, pre-trained or not
            ranges["lr_encoder"] = DEMO_LR_ENCODER if demo else PUBLISHED_LR_ENCODER
        return cls(**{k: v for k, v in ranges.items() if v is not None})

    def define(self, trial: Any) -> None:
        """Optuna define-by-run space (a clipping norm is drawn only when clipping is on)."""
        for name in ("lr_encoder", "lr_head", "weight_decay"):
            trial.suggest_float(name, *getattr(self, name), log=True)
        trial.suggest_float("beta2", *self.beta2)
        trial.suggest_float("warmup_frac", *self.warmup_frac)
        trial.suggest_float("decay_start_frac", *self.decay_start_frac)
        if trial.suggest_categorical("grad_clip", ["off", "on"]) == "on":
            trial.suggest_float("grad_clip_norm", *self.grad_clip_norm, log=True)

    def contains(self, params: dict[str, Any]) -> bool:
        """Whether TrainConfig values (as in ``best.json["params"]``) lie in this space."""

        def inside(value: float, bounds: tuple[float, float]) -> bool:
            return bounds[0] <= value <= bounds[1]

        clip = params["grad_clip_norm"]
        return (
            all(inside(params[n], getattr(self, n)) for n in ("lr_encoder", "lr_head"))
            and inside(params["weight_decay"], self.weight_decay)
            and list(params["betas"])[0] == BETA1
            and inside(list(params["betas"])[1], self.beta2)
            and inside(params["warmup_frac"], self.warmup_frac)
            and inside(params["decay_start_frac"], self.decay_start_frac)
            and (clip is None or inside(clip, self.grad_clip_norm))
        )

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            f.name: {"range": list(getattr(self, f.name)), "scale": self._scale(f.name)}
            for f in dataclasses.fields(self)
        }
        out["grad_clip"] = {"choices": ["off", "on"], "off": "grad_clip_norm = None"}
        out["beta1"] = BETA1
        return out

    def _scale(self, name: str) -> str:
        return "log-uniform" if name in self.LOG_SCALE else "uniform"


def params_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values of one sampled Tune config (``grad_clip == "off"`` -> None)."""
    clip = config.get("grad_clip", "off")
    return {
        "lr_encoder": float(config["lr_encoder"]),
        "lr_head": float(config["lr_head"]),
        "weight_decay": float(config["weight_decay"]),
        "betas": [BETA1, float(config["beta2"])],
        "warmup_frac": float(config["warmup_frac"]),
        "decay_start_frac": float(config["decay_start_frac"]),
        "grad_clip_norm": float(config["grad_clip_norm"]) if clip == "on" else None,
    }


def sweep_train_config(**changes: Any) -> TrainConfig:
    """The fixed part of every trial's :class:`TrainConfig` by default: TrainConfig's
    defaults but 8 epochs (as kfold) and no early stopping (ASHA decides when to stop), with
    ``changes`` on top. The searched fields (:data:`SEARCHED_FIELDS`) are drawn per trial."""
    return TrainConfig(**{"epochs": 8, "early_stopping_patience": None, **changes})


@dataclasses.dataclass
class SweepConfig:
    """Settings of a sweep (the resolved copy is saved in ``config.json``)."""

    train: TrainConfig = dataclasses.field(
        default_factory=sweep_train_config,
        metadata={
            "help": "every trial's training settings but the searched ones (model, epochs = "
            "ASHA's max_t, batch size, merge_calm, seed: also the searcher's)"
        },
    )
    num_samples: int = dataclasses.field(default=20, metadata={"help": "trials per outer fold"})
    cpus_per_trial: float = dataclasses.field(
        default=1.0,
        metadata={"help": "Tune resources of one trial (torch threads = max(1, int))"},
    )
    gpus_per_trial: float = dataclasses.field(
        default=0.0, metadata={"help": "> 0: train on CUDA (fractions share a GPU)"}
    )
    max_concurrent_trials: int | None = dataclasses.field(
        default=None,
        metadata={"help": "trials at once (default: the cluster's CPUs / --cpus-per-trial)"},
    )
    grace_period: int | None = dataclasses.field(
        default=None,
        metadata={"help": "ASHA: epochs before a trial may be cut (default: min_grace_period)"},
    )
    reduction_factor: int = dataclasses.field(
        default=2, metadata={"help": "ASHA: keep the top 1/reduction_factor at each rung"}
    )
    space: SearchSpace | None = dataclasses.field(
        default=None, metadata={"help": "search ranges (default: SearchSpace.for_model(model))"}
    )

    def __post_init__(self) -> None:
        epochs = self.train.epochs
        if self.space is None:
            self.space = SearchSpace.for_model(self.train.model)
        if self.num_samples < 1 or epochs < 1:
            raise ValueError("num_samples and epochs must be >= 1")
        least = min_grace_period(epochs, self.space)
        if self.grace_period is None:
            self.grace_period = least
        if not least <= self.grace_period <= epochs:
            raise ValueError(
                f"grace_period={self.grace_period} with {epochs} epochs: ASHA must not cut "
                f"before epoch {least} (a third of the epochs, and every searched warm-up over: "
                f"warmup_frac up to {self.space.warmup_frac[1]}), else it favours short "
                f"warm-ups by construction; use {least}..{epochs}"
            )
        if self.reduction_factor < 2:
            raise ValueError("reduction_factor must be >= 2")

    def base_train_config(self) -> TrainConfig:
        """The fixed part of every trial's TrainConfig (searched fields take defaults)."""
        return dataclasses.replace(self.train)


def min_grace_period(epochs: int, space: SearchSpace) -> int:
    """The first epoch ASHA may cut at: a third of the epochs, and not before the longest
    searched warm-up is over, so trials are compared after their schedules have peaked
    rather than while the warm-up fraction under search still holds their LR down."""
    return max(1, math.ceil(epochs / 3), math.ceil(space.warmup_frac[1] * epochs))


def make_searcher(space: SearchSpace, seed: int, max_concurrent: int):
    """Optuna TPE (seeded) that asks for ``max_concurrent`` configs at a time.

    ``batch=True``: the next batch is asked only after the whole previous one was told, so a
    given seed (and the same scores) gives the same configs whatever the trials' timing.
    """
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=space.define,
        metric=SEARCH_METRIC,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent, batch=True)


def make_scheduler(cfg: SweepConfig):
    """ASHA on ``val/uar`` per epoch (``training_iteration``), up to ``cfg.train.epochs``."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=METRIC,
        mode="max",
        max_t=cfg.train.epochs,
        grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
    )


def scheduler_info(cfg: SweepConfig) -> dict[str, Any]:
    return {
        "type": "ASHAScheduler",
        "metric": METRIC,
        "mode": "max",
        "time_attr": TIME_ATTR,
        "max_t": cfg.train.epochs,
        "grace_period": cfg.grace_period,
        "reduction_factor": cfg.reduction_factor,
        "grace_rule": GRACE_RULE,
    }


def _speaker_string(speakers) -> str:
    return " ".join(str(int(a)) for a in sorted(set(int(a) for a in speakers)))


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial of the search on one outer fold shares (``tune.with_parameters``);
    a trial's sampled values stay in Tune's own config, where the searcher reads them."""

    #: The fold's work with the sweep's fixed training settings (searched fields at their
    #: defaults), its fit (``train``) and ``val`` clips counted, ``class_counts["train"]``
    #: the fit clips per class (the loss's class weights).
    work: FoldWork
    #: The fit (``train``) and ``val`` speakers; the fold's test speakers are not even named.
    split_speakers: dict[str, list[int]]
    #: Torch threads of a trial.
    threads: int
    #: Where a trial trains: ``cuda`` or ``cpu``.
    device: str

    def with_train(self, train: TrainConfig) -> TrialSetup:
        """This setup with ``train`` as the work's training settings (a trial's own)."""
        return dataclasses.replace(self, work=dataclasses.replace(self.work, train=train))


def adamw_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune trainable: train one sampled AdamW config (``config``, Tune's) on the fit
    speakers, score on val speakers.

    The trial's settings are ``setup``'s fixed ones with the sampled values on top. The clips
    stream in as a study fold's do (:func:`trial_clips`). Reports every epoch's
    ``run_training`` metrics plus, for auditing, the speakers it trained on (``fit_actors``)
    and validated on (``val_actors``), read from the rows it received.
    """
    import torch
    from ray import tune

    from ser_ray.training.config import build_model
    from ser_ray.training.engine import seed_everything
    from ser_ray.training.finetune import run_training

    torch.set_num_threads(setup.threads)
    cfg = TrainConfig.from_dict({**setup.work.train.to_dict(), **params_from_config(config)})
    setup = setup.with_train(cfg)
    work = setup.work
    seed_everything(cfg.seed)
    model, fe = build_model(cfg, list(work.protocol.classes))
    work.inputs.check(model, fe)
    clips = trial_clips(setup, fe)
    seen: dict[str, set[int]] = {"train": set(), "val": set()}
    train, val = (_recording_speakers(clips[name], seen[name]) for name in ("train", "val"))

    def report(metrics: dict[str, float], _write_checkpoint) -> None:
        audit = {  # the first report comes after a whole pass over both splits
            "fold": work.fold,
            "fit_actors": _speaker_string(seen["train"]),
            "val_actors": _speaker_string(seen["val"]),
            "n_train": len(train),
            "n_val": len(val),
        }
        tune.report({**metrics, **audit})  # RAY: ASHA may stop the trial here

    run_training(
        cfg, model, fe, train, val, device=setup.device, on_epoch_end=report,
        class_counts=work.class_counts["train"],
    )  # fmt: skip


def trial_clips(setup: TrialSetup, feature_extractor) -> dict[str, ClipStream[ClipArrays]]:
    """A trial's ``train`` (fit speakers) and ``val`` clips, streamed exactly as a study fold's
    workers stream theirs: the same Ray datasets
    (:func:`ser_ray.distributed.ingest.fold_datasets`), read in the order a Train worker
    reads them (:func:`ser_ray.distributed.ingest.local_shards`), windowed and converted by
    :func:`ser_ray.distributed.fold_trainer.open_fold_clips`; so for the same seed, the same
    batches."""
    # the test speakers of the fold are not even named here: only fit and validation speakers
    work = setup.work
    datasets = ingest.fold_datasets(
        work.inputs.source,
        setup.split_speakers,
        work.inputs.input_kind,
        kept_labels(work.protocol),
    )
    clips = open_fold_clips(work, ingest.local_shards(datasets), feature_extractor)
    if "val" not in clips:
        raise ValueError(f"fold {work.fold}: no validation clips in {work.inputs.source}")
    return clips


def _recording_speakers(stream: ClipStream[ClipArrays], seen: set[int]) -> ClipStream[ClipArrays]:
    """``stream``, adding the speakers of every window it hands out to ``seen``."""

    def to_clips(rows):
        table = stream.to_clips(rows)
        seen.update(int(a) for a in table.speakers)
        return table

    return dataclasses.replace(stream, to_clips=to_clips)


def trial_setup(source: FoldInputs, fold: int, cfg: SweepConfig, protocol: Protocol) -> TrialSetup:
    """What every trial of the search on outer fold ``fold`` shares (:func:`adamw_trial`'s
    ``setup``): the base TrainConfig, the inputs, the protocol, the fit (``train``) and
    ``val`` speakers and their clip counts, threads and device. The fold's test speakers are left
    out."""
    _, fit_speakers, val_speakers = protocol.split(fold)
    if not val_speakers:
        raise ValueError("the sweep needs validation speakers (n_val_speakers > 0)")
    split_speakers = {"train": fit_speakers, "val": val_speakers}
    work = FoldWork(
        train=cfg.base_train_config(),
        inputs=source,
        fold=int(fold),
        protocol=protocol,
        split_clips=count_splits(source.source, split_speakers, kept_labels(protocol)),
        class_counts={"train": count_classes(source.source, fit_speakers, protocol.label_index())},
    )
    return TrialSetup(
        work=work,
        split_speakers=split_speakers,
        threads=trial_torch_threads(cfg.cpus_per_trial),
        device="cuda" if cfg.gpus_per_trial > 0 else "cpu",
    )


def tune_fold(
    source: FoldInputs,
    fold: int,
    cfg: SweepConfig,
    protocol: Protocol,
    *,
    storage_path: str | os.PathLike,
    name: str,
) -> dict[str, Any]:
    """Search AdamW settings on the training side of outer fold ``fold``.

    Returns ``{"params", "val_uar", "trials" (DataFrame, best first), "search" (what was
    searched, how, on which speakers, where the results are)}``.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("connect to a Ray cluster (ray.init) before the sweep")
    setup = trial_setup(source, fold, cfg, protocol)
    resources, max_concurrent = trial_resources(cfg)
    grid, search_s = run_trials(
        setup, cfg, resources, max_concurrent, storage_path=storage_path, name=name
    )
    base = cfg.base_train_config()
    trials = trial_table(grid, base.epochs)
    test_speakers, fit_speakers, val_speakers = protocol.split(fold)
    seen = {int(a) for s in [*trials["fit_actors"], *trials["val_actors"]] for a in s.split()}
    leaked = sorted(seen & set(test_speakers))
    if leaked:  # cannot happen by construction; a guard for future edits
        raise RuntimeError(f"fold {fold}: test speakers {leaked} reached the search")
    best = trials.iloc[0]
    params = params_from_config(best["config"])
    log.info(
        "fold %d: best val UA %.3f with %s (%d trials, %d stopped early, %.1f s)",
        fold,
        best["val_uar"],
        params,
        len(trials),
        int(trials["stopped_early"].sum()),
        search_s,
    )
    search = {
        "fold": int(fold),
        "scheme": protocol.scheme,
        "test_actors": [int(a) for a in test_speakers],
        "fit_actors": [int(a) for a in fit_speakers],
        "val_actors": [int(a) for a in val_speakers],
        "objective": f"{METRIC} (max) on the validation speakers; searcher told {SEARCH_METRIC}",
        "searcher": {"type": "OptunaSearch", "sampler": "TPESampler", "seed": base.seed},
        "scheduler": scheduler_info(cfg),
        "space": cfg.space.describe(),
        "num_samples": cfg.num_samples,
        "max_concurrent_trials": max_concurrent,
        "resources_per_trial": resources,
        "n_trials": len(trials),
        "n_stopped_early": int(trials["stopped_early"].sum()),
        "search_s": round(search_s, 2),
        "fixed": {k: v for k, v in base.to_dict().items() if k not in SEARCHED_FIELDS},
        # Tune's path is inside the storage's filesystem (bucket/…): its scheme put back
        "experiment_path": storage.uri_prefix(storage_path) + str(grid.experiment_path),
        "note": HOLDOUT_NOTE.format(
            fold=fold, fit=fit_speakers, val=val_speakers, test=list(test_speakers)
        ),
    }
    return {
        "params": params,
        "val_uar": float(best["val_uar"]),
        "trials": trials,
        "search": search,
    }


def trial_resources(cfg: SweepConfig) -> tuple[dict[str, float], int]:
    """What one trial reserves, and how many trials run at once (by default as many as the
    cluster's CPUs hold)."""
    resources = adamw_trial_resources(cfg.cpus_per_trial, cfg.gpus_per_trial)
    max_concurrent = cfg.max_concurrent_trials or adamw_concurrent_trials(cfg.cpus_per_trial)
    return resources, max_concurrent


def run_trials(
    setup: TrialSetup,
    cfg: SweepConfig,
    resources: dict[str, float],
    max_concurrent: int,
    *,
    storage_path: str | os.PathLike,
    name: str,
) -> tuple[Any, float]:
    """Run the search (RAY: ``Tuner.fit``): ``cfg.num_samples`` trials of
    :func:`adamw_trial` asked from the seeded TPE searcher and cut by ASHA. Returns their
    results (a ``ResultGrid``) and the seconds the search took; raises when a trial failed."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(adamw_trial, setup=setup), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(cfg.space, cfg.train.seed, max_concurrent),
            scheduler=make_scheduler(cfg),
            num_samples=cfg.num_samples,  # concurrency: the searcher's ConcurrencyLimiter
            trial_dirname_creator=_trial_dirname,
            reuse_actors=True,  # saves a process start per trial; each trial seeds itself
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.absolute(storage_path),
            verbose=console.search_verbosity(),
        ),
    )
    start_s = time.perf_counter()
    grid = tuner.fit()  # RAY
    search_s = time.perf_counter() - start_s
    if grid.errors:
        raise RuntimeError(
            f"{len(grid.errors)} trials failed; first: {grid.errors[0]!r}"
        ) from grid.errors[0]
    return grid, search_s


def trial_table(grid: Any, epochs: int) -> pd.DataFrame:
    """One row per trial, best first (highest val UA at any epoch, then trial id): scores,
    epochs run, whether ASHA stopped it, the speakers it saw, its TrainConfig values and its
    sampled ``config``."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        epochs_run = int(history[TIME_ATTR].max())
        rows.append(
            {
                "trial_id": result.metrics["trial_id"],
                "val_uar": float(history[METRIC].max()),
                "last_val_uar": float(result.metrics[METRIC]),
                "epochs_run": epochs_run,
                "stopped_early": epochs_run < epochs,
                "fit_actors": result.metrics["fit_actors"],
                "val_actors": result.metrics["val_actors"],
                **params_from_config(result.config),
                "config": dict(result.config),
            }
        )
    return pd.DataFrame(rows).sort_values(
        ["val_uar", "trial_id"], ascending=[False, True], ignore_index=True
    )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # short: the default lists every sampled value


@dataclasses.dataclass
class SweepResult:
    """``best``: the content of best.json; ``trials``: per fold, the trial table."""

    best: dict[str, Any]
    trials: dict[int, pd.DataFrame]


def run_sweep(
    features_dir: str | os.PathLike,
    cfg: SweepConfig,
    out: str | os.PathLike,
    protocol: Protocol,
    *,
    fold: int = 1,
    nested: bool = False,
    outer_folds: Sequence[int] | None = None,
) -> SweepResult:
    """Sweep on ``fold`` (or, ``nested``, on every outer fold) and write ``out/best.json``.

    ``outer_folds`` restricts a nested sweep to some outer folds (default: all).

    Also writes ``out/trials_fold<k>.csv`` and the Tune experiments ``out/tune/adamw_fold<k>``
    (TensorBoard event files per trial). The feature cache goes to ``out/feature_cache``.
    ``out`` is a location, a local folder or a URI (:mod:`ser_ray.common.storage`), that the
    trials on every node reach. Needs a running Ray instance.
    """
    out = storage.absolute(out)
    storage.make_dirs(out)
    n_folds = len(protocol.folds)
    if nested:
        fold_numbers = sorted(int(k) for k in (outer_folds or range(1, n_folds + 1)))
    else:
        fold_numbers = [int(fold)]
    if not fold_numbers or not set(fold_numbers) <= set(range(1, n_folds + 1)):
        raise ValueError(f"folds {fold_numbers} do not exist; choose from 1..{n_folds}")
    # built (or reused) once, before any trial, as the study does
    source = build_fold_inputs(
        features_dir, cfg.base_train_config(), storage.join(out, "feature_cache")
    )
    found, trials = {}, {}
    for k in fold_numbers:
        found[k] = tune_fold(
            source, k, cfg, protocol, storage_path=storage.join(out, "tune"), name=f"adamw_fold{k}"
        )
        trials[k] = found[k].pop("trials")
        table = trials[k].drop(columns=["config"]).to_csv(index=False)
        storage.write_text(storage.join(out, f"trials_fold{k}.csv"), table)
    if nested:
        best = {
            "per_fold": {
                str(k): {"params": f["params"], "val_uar": f["val_uar"], "search": f["search"]}
                for k, f in found.items()
            },
            "note": "per outer fold: params tuned on that fold's training speakers only; "
            "each fold's test score is untouched by its own search",
        }
    else:
        (k,) = fold_numbers
        best = {**found[k], "fold": k}
    storage.write_text(
        storage.join(out, "best.json"), json.dumps(config_file.to_jsonable(best), indent=2)
    )
    return SweepResult(best=best, trials=trials)
