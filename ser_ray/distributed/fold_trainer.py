"""The Ray edge of fine-tuning: one outer fold, trained in its Tune trial or by a
``TorchTrainer``.

Both take one :class:`~ser_ray.distributed.fold_work.FoldWork`, what a fold's training is
handed. Read top to bottom: the two ways in — :func:`train_fold_per_worker` (the per-worker
function of a fold's ``TorchTrainer``, DDP) and :func:`train_fold_in_trial` (a fold of one
worker, in its Tune trial's own process) — then :func:`train_fold`, what both run, in named
steps: check the feature cache, open the fold's clip streams, train with resume, refit and
score the test speakers, write the fold's result. Then :func:`fold_data` (the fold's splits
as Ray datasets, :mod:`ser_ray.distributed.ingest`), :func:`build_fold_trainer` (the
``TorchTrainer`` of a fold) and :func:`fold_result_from_checkpoint` (the fold's outcome from
its final checkpoint). Ray touch-points are marked ``# RAY`` and go through the session
(:class:`ser_ray.distributed.train_edge.WorkerSession` or
:class:`ser_ray.distributed.train_in_tune.TrialSession`); the loop itself
(:mod:`ser_ray.training.finetune`) is Ray-free.

Validation speakers come from the training side of the outer fold
(:meth:`ser_ray.corpus.protocol.Protocol.split`); the test fold is only scored once, with the
best-epoch weights, at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ser_ray.common import storage
from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed import ingest as ray_ingest
from ser_ray.distributed import train_edge as edge
from ser_ray.distributed.fold_work import WORK_KEY, FoldWork
from ser_ray.models.precision import resolve_amp
from ser_ray.models.ssl import SPEAKER_NORM_ATTR, PartwiseClassifier, save_model
from ser_ray.training import engine as eng
from ser_ray.training.checkpoints import BEST_MODEL_DIR
from ser_ray.training.clip_data import (
    ClipArrays,
    Clips,
    count_classes,
    count_split,
    predictions_frame,
    table_from_arrow,
)
from ser_ray.training.clip_stream import ClipStream
from ser_ray.training.config import TrainConfig, build_model
from ser_ray.training.finetune import TrainOutcome, evaluate, refit, run_training

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
RESULT_FILE = "result.json"


def train_fold_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function of a fold's ``TorchTrainer``: :func:`train_fold` on this
    worker (RAY). Ray Train hands a dict: the fold's :class:`FoldWork` is unwrapped here, the
    one place that knows its key."""
    work: FoldWork = loop_config[WORK_KEY]
    train_fold(work, edge.WorkerSession(work.progress_key))


def train_fold_in_trial(work: FoldWork, *, device: str, torch_threads: int) -> None:
    """One fold trained in this Tune trial's process (RAY; a fold of one worker, no
    ``TorchTrainer``): :func:`train_fold` on the fold's splits of its inputs as Ray datasets
    (the ones :func:`build_fold_trainer` would give its trainer), on ``device`` with
    ``torch_threads`` threads, reporting to Tune."""
    from ser_ray.distributed.train_in_tune import TrialSession

    work, datasets = fold_data(work)
    train_fold(work, TrialSession(datasets, device, torch_threads, work.progress_key))


def train_fold(work: FoldWork, session) -> None:
    """One fold in the process ``session`` describes (a Train worker's
    :class:`~ser_ray.distributed.train_edge.WorkerSession` or a Tune trial's
    :class:`~ser_ray.distributed.train_in_tune.TrialSession`): train on ``train``, select on
    ``val``, score ``test``.

    ``work``: counted by :func:`fold_data` (each split streams in from the session's dataset
    of that name). Reports ``train/*``, ``val/*`` each epoch with a checkpoint, then
    ``test/accuracy``, ``test/uar``, ``test/macro_f1``, ``best_epoch`` with the final
    checkpoint (``best_model/`` and ``predictions.csv``). Resumes from the session's latest
    checkpoint; a run that had ended reports its final result again
    (:func:`ended_fold_report`).
    """
    cfg = work.train
    ctx = session.context
    ended = ended_fold_report(session.latest_checkpoint())  # RAY
    if ended is not None:
        log.info("fold %s had ended: its final checkpoint is reported again", work.fold)
        session.report(ended)  # RAY
        return
    protocol = work.protocol
    class_names = list(protocol.classes)
    eng.seed_everything(cfg.seed, ctx.rank)
    model, fe = build_model(cfg, class_names)
    work.inputs.check(model, fe)
    shards = {name: session.dataset(name) for name, n in work.counted_splits().items() if n}
    clips = open_fold_clips(work, shards, fe)
    wrap = functools.partial(edge.wrap_ddp, world_size=ctx.world_size)  # RAY: DDP
    counts = work.class_counts
    outcome = train_with_resume(
        cfg, model, fe, clips, session, wrap,
        log_dir=work.log_dir if ctx.rank == 0 else None,
        class_counts=counts.get("train"),
    )  # fmt: skip
    final: dict[str, Any] = {
        "epoch": outcome.state.epoch,
        "best_epoch": outcome.state.best_epoch,
        "final": True,  # not "done": Tune ends a trial at a result with done=True
    }
    _, fit_speakers, val_speakers = fold_splits(protocol, work.fold, cfg)
    trained_on = fit_speakers
    if cfg.refit and "val" in clips:
        model, _ = refit(
            cfg, outcome.state.best_epoch, clips["train"], clips["val"], class_names,
            device=ctx.device, rank=ctx.rank, world_size=ctx.world_size, wrap_model=wrap,
            class_counts=refit_class_counts(counts),
            on_progress=lambda line: session.progress(f"refit {line}"),
        )  # fmt: skip
        final["refit_epochs"] = outcome.state.best_epoch
        trained_on = fit_speakers + val_speakers
    if outcome.state.best_uar > -math.inf and "val" in clips:
        final["best/val_uar"] = outcome.state.best_uar
    frame = None
    if "test" in clips:
        test_metrics, frame = score_test(work, model, clips["test"], class_names, ctx)
        final.update(test_metrics)
    result = {
        "metrics": final,
        "history": outcome.state.history,
        "train_config": cfg.to_dict(),
        "fold": work.fold,
        "trained_on_actors": sorted(int(a) for a in trained_on),
        "input_kind": work.inputs.input_kind,
        "class_names": class_names,
    }
    write = functools.partial(
        write_fold_result, outcome=outcome, model=model, feature_extractor=fe, frame=frame,
        result=result, rank=ctx.rank, speaker_norm=work.inputs.speaker_norm,
    )  # fmt: skip
    session.report(final, write)  # RAY


def refit_class_counts(counts: Mapping[str, Sequence[int]]) -> list[int] | None:
    """Clips per class of a refit's training side (fit + validation clips), or None when the
    fold's counts were not given (the loop then counts them)."""
    if "train" not in counts:
        return None
    val = counts.get("val") or [0] * len(counts["train"])
    return [int(a) + int(b) for a, b in zip(counts["train"], val, strict=True)]


def ended_fold_report(checkpoint) -> dict[str, Any] | None:
    """The fold's final report again, its checkpoint's path under ``checkpoint_path``, when
    the run's latest ``checkpoint`` is its final one (it holds ``result.json``); else None.

    A Tune trial restarted after its fold's last report but before Tune recorded the trial's
    end (a driver killed in between, then ``--resume``) restarts the same Train run; it then
    ends at once, instead of refitting, scoring the test fold again and writing a second final
    checkpoint."""
    if checkpoint is None:
        return None
    text = edge.checkpoint_text(checkpoint, RESULT_FILE)  # RAY
    if text is None:
        return None
    return {**json.loads(text)["metrics"], edge.CHECKPOINT_PATH_KEY: checkpoint.path}


def open_fold_clips(
    work: FoldWork, shards: Mapping[str, Any], feature_extractor
) -> dict[str, ClipStream[ClipArrays]]:
    """The fold's clips by split (``train``: fit speakers, ``val``, ``test``), each streamed
    from its Ray Data iterator in ``shards`` (:func:`ser_ray.distributed.ingest.shard_stream`)
    ``work.train.window_clips`` at a time; a split without clips is left out.

    What a study fold's worker (its ``get_dataset_shard`` iterators) and an AdamW trial
    (:func:`ser_ray.distributed.ingest.local_shards`) both train on, so that for the same seed
    their batches are the same. ``work``'s clips per split are counted (:func:`count_splits`).
    """
    to_clips = functools.partial(
        table_from_arrow,
        kind=work.inputs.input_kind,
        label_index=work.protocol.label_index(),
        feature_extractor=feature_extractor,
    )
    window = work.train.window_clips
    clips = {
        name: ray_ingest.shard_stream(shards[name], n, to_clips, window)  # RAY
        for name, n in work.counted_splits().items()
        if n
    }
    if "train" not in clips:
        raise ValueError(f"fold {work.fold}: no training clips in {work.inputs.source}")
    return clips


def count_splits(
    source: str, split_speakers: Mapping[str, Sequence[int]], labels: Sequence[str] | None = None
) -> dict[str, int]:
    """Clips per split of ``source`` (of ``labels`` only, unless None), counted before any
    worker reads them (a stream's size sets the number of steps of an epoch)."""
    return {name: count_split(source, a, labels) if a else 0 for name, a in split_speakers.items()}


def fold_splits(
    protocol: Protocol, fold: int, cfg: TrainConfig
) -> tuple[list[int], list[int], list[int]]:
    """(test, fit, validation) speakers of ``fold`` under ``protocol``, checked against the
    validation speakers ``cfg`` asks for (a corpus's own partitions give their dev side,
    whatever its size)."""
    test, fit, val = protocol.split(int(fold))
    if len(val) != cfg.n_val_speakers and not protocol.given_sides:
        raise ValueError(
            f"fold {fold}: the protocol holds {len(val)} validation speakers, the "
            f"training settings ask for n_val_speakers={cfg.n_val_speakers}; resolve the protocol "
            "with the same number"
        )
    return test, fit, val


def train_with_resume(
    cfg: TrainConfig,
    model: PartwiseClassifier,
    feature_extractor,
    clips: dict[str, Clips],
    session,
    wrap,
    log_dir: str | None,
    class_counts: Sequence[int] | None = None,
) -> TrainOutcome:
    """:func:`run_training` in ``session``'s process, reporting every epoch with a checkpoint
    and resuming from the session's latest one (after a failure or a restart). TensorBoard
    events go to ``log_dir`` in the run location (on a URI: written on this node, uploaded
    when the fold ends). Progress lines inside an epoch go to ``session.progress``;
    ``class_counts`` (training clips per class) set the loss's class weights."""
    ctx = session.context
    checkpoint = session.latest_checkpoint()  # RAY
    with contextlib.ExitStack() as stack:
        if log_dir is not None:
            log_dir = str(stack.enter_context(storage.staged(log_dir)))
        resume_dir = None
        if checkpoint is not None:
            resume_dir = Path(stack.enter_context(checkpoint.as_directory()))
            log.info("resuming from %s", resume_dir)
        return run_training(
            cfg,
            model,
            feature_extractor,
            clips["train"],
            clips.get("val"),
            device=ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
            wrap_model=wrap,
            resume_from=resume_dir,
            on_epoch_end=session.report,  # RAY
            log_dir=log_dir,
            class_counts=class_counts,
            on_progress=session.progress,  # RAY: to the driver's console
        )


def score_test(
    work: FoldWork,
    model: nn.Module,
    test: Clips,
    class_names: list[str],
    ctx: edge.WorkerContext,
) -> tuple[dict[str, float], pd.DataFrame]:
    """``test/*`` metrics and the per-clip predictions of the test speakers (their ``model``
    column: the work's variant)."""
    cfg = work.train
    metrics, probs, scored = evaluate(
        model,
        test,
        batch_size=cfg.eval_batch_size,
        device=ctx.device,
        num_classes=len(class_names),
        amp_dtype=resolve_amp(cfg.amp, ctx.device),
        prefix="test",
    )
    return metrics, predictions_frame(scored, probs, class_names, work.fold, work.variant)


def write_fold_result(
    out: Path,
    *,
    outcome: TrainOutcome,
    model: PartwiseClassifier,
    feature_extractor,
    frame: pd.DataFrame | None,
    result: dict[str, Any],
    rank: int,
    speaker_norm: bool = False,
) -> Path:
    """The final checkpoint: the training state (a restart after the end resumes to here)
    and, from rank 0, the tested weights (a model trained on speaker-normalised pooled
    layers says so in its config), ``predictions.csv`` and ``result.json``."""
    outcome.write_checkpoint(out)
    if rank != 0:
        return out
    # best-epoch (or refit) weights, the head's input standardisation folded in
    standard = model.standard_model()
    if speaker_norm:
        setattr(standard.config, SPEAKER_NORM_ATTR, True)
    save_model(standard, feature_extractor, out / BEST_MODEL_DIR)
    if frame is not None:
        frame.to_csv(out / PREDICTIONS_FILE, index=False)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2, default=float))
    return out


def kept_labels(protocol: Protocol) -> list[str] | None:
    """The labels whose clips a fold reads: None (all) unless the label map drops some."""
    return protocol.kept_labels if protocol.dropped_labels else None


def fold_data(work: FoldWork) -> tuple[FoldWork, dict[str, Any]]:
    """``work`` with ``split_clips`` (clips per split, counted before any row is read) and
    ``class_counts`` (fit and validation clips per class: the loss's class weights), and
    the fold's train/val/test clips of its inputs as Ray datasets by split
    (:mod:`ser_ray.distributed.ingest`)."""
    protocol = work.protocol
    test_speakers, fit_speakers, val_speakers = fold_splits(protocol, work.fold, work.train)
    split_speakers = {"train": fit_speakers, "val": val_speakers, "test": test_speakers}
    source = work.inputs.source
    labels = kept_labels(protocol)
    datasets = ray_ingest.fold_datasets(  # RAY
        source, split_speakers, work.inputs.input_kind, labels
    )
    counts = {
        name: count_classes(source, split_speakers[name], protocol.label_index())
        for name in ("train", "val")
    }
    split_clips = count_splits(source, split_speakers, labels)
    return dataclasses.replace(work, split_clips=split_clips, class_counts=counts), datasets


def build_fold_trainer(work: FoldWork, **trainer_kwargs: Any):
    """The ``TorchTrainer`` of one fold (:func:`train_fold_per_worker` per worker), fed the
    fold's datasets (:func:`fold_data`); ``trainer_kwargs`` go to
    :func:`ser_ray.distributed.train_edge.build_torch_trainer`."""
    work, datasets = fold_data(work)
    return edge.build_torch_trainer(
        train_fold_per_worker,
        {WORK_KEY: work},  # Ray Train's loop config is a dict
        datasets=datasets,
        dataset_config=ray_ingest.data_config(),
        **trainer_kwargs,
    )


@dataclasses.dataclass
class FoldOutcome:
    """A finished fold, as read back from its final checkpoint."""

    fold: int
    metrics: dict[str, float]  # test/accuracy, test/uar, test/macro_f1, best_epoch, ...
    history: list[dict[str, float]]  # one row per epoch: train/*, val/*
    predictions: pd.DataFrame  # the test speakers' clips, predictions.csv format
    model_dir: str  # the tested weights (best epoch, or refit), an HF checkpoint's location


def fold_result_from_checkpoint(checkpoint, fold_dir: str | os.PathLike) -> FoldOutcome:
    """Copy a fold's final checkpoint (what :func:`write_fold_result` wrote:
    ``best_model/``, ``predictions.csv``, ``result.json`` and the training state) to the
    location ``fold_dir``, replacing what was there, and read the fold's outcome from it
    (RAY: ``Checkpoint.to_directory``)."""
    fold_dir = storage.absolute(fold_dir)
    storage.delete(fold_dir)
    with storage.staged(fold_dir) as local:
        checkpoint.to_directory(str(local))
        info = json.loads((local / RESULT_FILE).read_text())
        predictions = pd.read_csv(local / PREDICTIONS_FILE)
    return FoldOutcome(
        fold=int(info["fold"]),
        metrics=info["metrics"],
        history=info["history"],
        predictions=predictions,
        model_dir=storage.join(fold_dir, BEST_MODEL_DIR),
    )
