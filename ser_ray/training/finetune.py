"""Our own PyTorch fine-tuning loop for the SSL-encoder classifier (no Ray).

Read it top to bottom: :func:`build_optimizer` (AdamW, no decay on biases/norms, separate
peaks for encoder and head), :func:`train_one_epoch` (one pass of optimizer steps on the
shared :class:`ser_ray.training.engine.Engine`: AMP, gradient accumulation, optional clipping, NaN
check; the transformer frozen for the first steps), :func:`evaluate` (loss, accuracy, UA,
macro-F1 and per-clip probabilities), :func:`validate_epoch` and :func:`record_epoch` (the
epoch's validation and its place in the history), :func:`run_training` (epochs, best-epoch
selection on validation UA, early stopping, TensorBoard, checkpoints and exact resume) and
:func:`refit` (retrain on fit + validation clips for the best epoch count).

Settings and the model come from :mod:`ser_ray.training.config`, clips and batches from
:mod:`ser_ray.training.clip_data` (a whole split in memory, or streamed window by window,
:mod:`ser_ray.training.clip_stream`), checkpoints from :mod:`ser_ray.training.checkpoints`; the Ray
Train edge that runs this loop on each worker is :mod:`ser_ray.distributed.fold_trainer`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ser_ray.common.metrics import classification_metrics
from ser_ray.models.ssl import PartwiseClassifier, inference_batches
from ser_ray.training import engine as eng
from ser_ray.training.checkpoints import TrainState, load_checkpoint, write_checkpoint
from ser_ray.training.class_weights import class_weights, resolve_class_weight
from ser_ray.training.clip_data import (
    ClipArrays,
    Clips,
    batches_per_epoch,
    collate,
    collated_batches,
    merge_tables,
)
from ser_ray.training.clip_stream import chain_streams
from ser_ray.training.config import TrainConfig, build_model
from ser_ray.training.progress import EpochProgress

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in four groups: {encoder, head} x {decay, none}.

    Biases, norm weights and other 1-D parameters (layer weights, mask embedding) get no
    weight decay. Call before any temporary freezing (``freeze_encoder_steps``).
    """
    core = eng.unwrap(model)
    return eng.build_adamw(
        core,
        lr={"encoder": cfg.lr_encoder, "head": cfg.lr_head},
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        part_of=lambda name: "encoder" if core.is_encoder_parameter(name) else "head",
    )


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR of the encoder and head groups (``train/lr`` is the head's)."""
    lrs = {g["name"].split("/")[0]: g["lr"] for g in optimizer.param_groups}
    return {"train/lr": lrs.get("head", 0.0), "train/lr_encoder": lrs.get("encoder", 0.0)}


def epoch_batches(
    clips: Clips, cfg: TrainConfig, epoch: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``epoch``, collated (similar lengths, seeded by epoch)."""
    return collated_batches(
        clips,
        cfg.batch_size,
        seed=cfg.seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        group_factor=cfg.length_group_factor,
    )


def _micro_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    device,
    group_clips: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clips' share of their group's mean loss, and their summed loss (for logging).

    With class ``weights`` (:mod:`ser_ray.training.class_weights`, mean 1 over the training
    clips) each clip's cross-entropy is scaled by its class's weight; the group's loss is
    still divided by its clip count, so the loss keeps its scale and a group's gradient does
    not depend on how its clips fell into micro-batches."""
    clips = len(batch["labels"])
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if weights is None:
        loss = model(**inputs).loss
        return loss * (clips / group_clips), {"loss_sum": loss.item() * clips}
    labels = inputs.pop("labels")
    logits = model(**inputs).logits.float()
    loss_sum = nn.functional.cross_entropy(logits, labels, weight=weights, reduction="sum")
    return loss_sum / group_clips, {"loss_sum": loss_sum.item()}


def train_one_epoch(
    engine: eng.Engine,
    batches: Iterable[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    epoch: int,
    step: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    weights: torch.Tensor | None = None,
    progress: EpochProgress | None = None,
) -> tuple[int, dict[str, float]]:
    """One pass over ``batches`` (collated, e.g. by :func:`epoch_batches`); returns (steps
    done so far, {train/loss, ...}).

    Gradient accumulation over ``cfg.grad_accum_steps`` micro-batches (the loss is the mean
    over the clips of the group, class-weighted with ``weights``), the transformer frozen
    while ``step < cfg.freeze_encoder_steps``; ``progress`` is told after every step (its
    lines count this epoch's steps).
    """
    engine.wrapped.train()
    accum = cfg.grad_accum_steps
    total_loss, total_clips, t0 = 0.0, 0, time.perf_counter()
    batches = iter(batches)
    while group := list(itertools.islice(batches, accum)):
        engine.model.set_transformer_trainable(step >= cfg.freeze_encoder_steps)
        group_clips = sum(len(b["labels"]) for b in group)
        lrs = current_lrs(engine.optimizer)  # the LRs this step uses
        logs = engine.step(
            group,
            functools.partial(
                _micro_batch_loss, device=engine.device, group_clips=group_clips, weights=weights
            ),
            where=f"at epoch {epoch + 1}, step {step + 1}",
        )
        group_loss = sum(values["loss_sum"] for values in logs)
        step += 1
        total_loss += group_loss
        total_clips += group_clips
        if on_step is not None:
            on_step(step, {"train/loss": group_loss / group_clips, **lrs})
        if progress is not None:
            progress.update(clips=group_clips, loss_sum=group_loss)
    seconds = time.perf_counter() - t0
    return step, {
        "train/loss": total_loss / max(total_clips, 1),
        "train/clips_per_s": total_clips / seconds if seconds > 0 else 0.0,
        "train/epoch_s": seconds,
        **current_lrs(engine.optimizer),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    clips: Clips,
    *,
    batch_size: int,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    prefix: str = "val",
    progress: EpochProgress | None = None,
) -> tuple[dict[str, float], np.ndarray, ClipArrays]:
    """({prefix}/loss, /accuracy, /uar, /macro_f1), softmax probabilities (N, classes) and the
    scored clips (paths, speakers, labels; no inputs) in path order, row by row with the
    probabilities. ``progress`` (counting clips) is told after every batch.

    Window by window, clips are batched as :func:`ser_ray.models.ssl.inference_batches` says, so
    each clip gets the probabilities the standard class (and ``pipeline()``) gives it alone."""
    core = eng.unwrap(model)
    was_training = core.training
    core.eval()
    scored: list[ClipArrays] = []
    window_probs: list[np.ndarray] = []
    total_loss = 0.0
    for table in clips.windows():
        probs = np.zeros((len(table), num_classes), dtype=np.float64)
        for indices, inputs in _inference_inputs(core, table, batch_size, device):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = core(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            logits = logits.float()
            batch_loss = nn.functional.cross_entropy(
                logits, inputs["labels"], reduction="sum"
            ).item()
            total_loss += batch_loss
            probs[indices] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
            if progress is not None:
                progress.update(units=len(indices), clips=len(indices), loss_sum=batch_loss)
        scored.append(table.without_inputs())
        window_probs.append(probs)
        del table  # before the next window is read
    core.train(was_training)
    if not scored:
        raise ValueError("no clips to evaluate")
    table = merge_tables(*scored)
    paths = np.array([p for t in scored for p in t.paths], dtype=object)
    probs = np.concatenate(window_probs)[np.argsort(paths, kind="stable")]  # merge_tables' order
    if len(table) == 0:
        return {}, probs, table
    scores = classification_metrics(table.labels, probs.argmax(axis=1), num_classes)
    metrics = {f"{prefix}/loss": total_loss / len(table)}
    metrics.update({f"{prefix}/{k}": v for k, v in scores.items()})
    return metrics, probs, table


def _inference_inputs(
    core: PartwiseClassifier, table: ClipArrays, batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """A window's clips in inference batches (indices into the window, collated inputs),
    padded only where padding changes nothing (the rule of jobs/predict.py)."""
    exact_length = table.kind != "pooled" and not core.pads_exactly
    for indices in inference_batches(table.lengths, batch_size, exact_length):
        yield indices, collate(table, indices, device)


@torch.no_grad()
def pooled_batches(
    model: PartwiseClassifier, clips: Clips, *, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pooled layer states (B, K, H), labels (B,)) of ``clips`` batch by batch, under the
    model as it is, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        for table in clips.windows():
            for _, inputs in _inference_inputs(model, table, batch_size, device):
                labels = inputs.pop("labels")
                yield model.pooled_inputs(**inputs), labels
    finally:
        model.train(was_training)


@torch.no_grad()
def standardize_head(
    model: PartwiseClassifier,
    clips: Clips,
    *,
    batch_size: int,
    device: torch.device,
    world_size: int = 1,
    keep_pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Standardise the head's input with its mean and std over ``clips`` (the training
    clips, all ranks' together) under the model as it is (in eval mode): see
    :meth:`ser_ray.models.ssl.PartwiseClassifier.standardize_head_inputs`.

    With ``keep_pooled``, returns this rank's clips' pooled layer states and labels on the
    CPU (what :func:`warm_up_head` trains on); else None."""
    hidden = model.config.hidden_size
    sums = torch.zeros(1 + 2 * hidden, dtype=torch.float64, device=device)  # n, sum, sum sq
    kept = []
    for states, labels in pooled_batches(model, clips, batch_size=batch_size, device=device):
        if keep_pooled:
            kept.append((states.float().cpu(), labels.cpu()))
        x = model.layer_sum(states).double()
        sums += torch.cat([x.new_tensor([len(x)]), x.sum(0), (x * x).sum(0)])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    count = float(sums[0])
    if count < 2:
        raise ValueError(f"{int(count)} training clips: the head's input needs 2 to standardise")
    mean = sums[1 : 1 + hidden] / count
    var = (sums[1 + hidden :] / count - mean * mean).clamp_min(0.0)
    model.standardize_head_inputs(mean.float(), var.sqrt().float())
    return _concat(kept) if keep_pooled else None


def _concat(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches])


def gather_ranks(pooled: torch.Tensor, labels: torch.Tensor, world_size: int):
    """Every rank's (pooled states, labels) concatenated in rank order, on every rank."""
    if world_size == 1:
        return pooled, labels
    import torch.distributed as dist

    parts: list = [None] * world_size
    dist.all_gather_object(parts, (pooled, labels))
    return _concat(parts)


def warm_up_head(
    model: PartwiseClassifier,
    pooled: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """Linear probing before fine-tuning (LP-FT): train the head alone (layer weights,
    projector, classifier; no dropout) for ``cfg.head_warmup_epochs`` epochs on the training
    clips' pooled layer states under the initial encoder, with AdamW at
    ``cfg.head_warmup_lr`` on the loop's schedule; batches of ``cfg.batch_size`` clips drawn
    by a generator of its own (the fine-tuning's batches and seeds stay as they are); the
    loss class-weighted as the fine-tuning's (``weights``).

    A fine-tuning that starts from a random head first spends the encoder's updates
    correcting the head's errors; starting from a trained head it keeps what the frozen
    encoder already separates (Kumar et al. 2022). Returns the first and last epoch's loss."""
    optimizer = eng.build_adamw(
        model,
        lr=cfg.head_warmup_lr,
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        keep=lambda name: not model.is_encoder_parameter(name),
    )
    n = len(labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    engine = eng.build_engine(
        model, optimizer, cfg, total_steps=steps_per_epoch * cfg.head_warmup_epochs,
        device=device,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.seed)
    was_training = model.training
    model.eval()  # no dropout; the encoder is not run
    losses = []
    for _ in range(cfg.head_warmup_epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=generator).split(cfg.batch_size):
            batch = {"pooled_layers": pooled[idx], "labels": labels[idx]}
            logs = engine.step(
                [batch],
                functools.partial(
                    _micro_batch_loss, device=device, group_clips=len(idx), weights=weights
                ),
                where="in the head warm-up",
            )
            total += logs[0]["loss_sum"]
        losses.append(total / n)
    model.train(was_training)
    log.info(
        "head warm-up: %d epochs on %d clips' pooled layer states, loss %.4f -> %.4f",
        cfg.head_warmup_epochs, n, losses[0], losses[-1],
    )  # fmt: skip
    return {"head_warmup/first_loss": losses[0], "head_warmup/last_loss": losses[-1]}


def rank0_value(value: float, world_size: int, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a broadcast; the value itself with one rank).

    Decisions that change the control flow (best epoch, early stop) are taken on rank 0's
    figures only, so no rank can leave the loop while the others wait in an all-reduce.
    """
    if world_size == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def validate_epoch(
    model: PartwiseClassifier,
    val_clips: Clips | None,
    cfg: TrainConfig,
    engine: eng.Engine,
    *,
    epoch: int,
    world_size: int = 1,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], float]:
    """The epoch's validation metrics (none without validation clips) and the score the best
    epoch is chosen on: validation UA, else the epoch (the last epoch wins); rank 0's score on
    every rank, so that every rank takes the same decision. A long validation hands progress
    lines to ``on_progress`` (every ``cfg.progress_every_s``)."""
    val_metrics: dict[str, float] = {}
    if val_clips is not None and len(val_clips):
        progress = EpochProgress(
            f"validation after epoch {epoch + 1}/{cfg.epochs}", len(val_clips), on_progress,
            every_s=cfg.progress_every_s, unit="clip",
        )  # fmt: skip
        val_metrics, _, _ = evaluate(
            model,
            val_clips,
            batch_size=cfg.eval_batch_size,
            device=engine.device,
            num_classes=model.config.num_labels,
            amp_dtype=engine.amp_dtype,
            progress=progress,
        )
    uar = val_metrics.get("val/uar", float(epoch))  # no validation: the last epoch wins
    return val_metrics, rank0_value(uar, world_size, engine.device)


def record_epoch(
    state: TrainState,
    epoch: int,
    uar: float,
    cfg: TrainConfig,
    train_metrics: dict[str, float],
    val_metrics: dict[str, float],
) -> tuple[dict[str, float], bool]:
    """Count ``epoch`` (0-based) as done in ``state``: best epoch on ``uar``, early stop,
    the epoch's metrics in the history. Returns the metrics and whether it is the best epoch
    so far."""
    state.epoch = epoch + 1
    improved = uar > state.best_uar
    if improved:
        state.best_uar, state.best_epoch, state.epochs_since_best = uar, epoch + 1, 0
    else:
        state.epochs_since_best += 1
    patience = cfg.early_stopping_patience
    if patience and state.epochs_since_best >= patience and state.epoch < cfg.epochs:
        state.stopped_early = True
        log.info("early stopping after epoch %d (best epoch %d)", state.epoch, state.best_epoch)
    metrics = {
        "epoch": state.epoch,
        "step": state.step,
        **train_metrics,
        **val_metrics,
        "best_epoch": state.best_epoch,
    }
    if val_metrics:
        metrics["best/val_uar"] = state.best_uar
    state.history.append(metrics)
    log.debug(  # the job's progress line says it (ser_ray.distributed.console)
        "epoch %d/%d step %d: %s",
        state.epoch,
        cfg.epochs,
        state.step,
        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k),
    )
    return metrics, improved


def prepare_head(
    model: PartwiseClassifier,
    train_clips: Clips,
    cfg: TrainConfig,
    device: torch.device,
    world_size: int,
    *,
    resumed: bool,
    weights: torch.Tensor | None = None,
) -> None:
    """The head before the first epoch (a step of :func:`run_training`): its inputs
    standardised over the training clips under the initial encoder (on a resumed run too),
    and, on a fresh fine-tuning run, warmed up alone on the pooled training clips (a resumed
    run has its trained head in the checkpoint; a probe trains nothing but its head)."""
    warm_up = cfg.head_warmup_epochs > 0 and not cfg.probe and not resumed
    kept = None
    if cfg.standardize_head_inputs:
        kept = standardize_head(
            model, train_clips, batch_size=cfg.eval_batch_size, device=device,
            world_size=world_size, keep_pooled=warm_up,
        )  # fmt: skip
    if warm_up:
        if kept is None:
            batches = pooled_batches(
                model, train_clips, batch_size=cfg.eval_batch_size, device=device
            )
            kept = _concat([(p.float().cpu(), y.cpu()) for p, y in batches])
        warm_up_head(model, *gather_ranks(*kept, world_size), cfg, device, weights)


@dataclasses.dataclass
class TrainOutcome:
    state: TrainState
    best_weights: dict[str, torch.Tensor] | None
    #: writes the final training state (a restart from it skips straight to the end)
    write_checkpoint: Callable[[Path], Path]


def train_class_counts(clips: Clips, num_classes: int) -> list[int]:
    """Clips per class index of ``clips`` (a stream is read once for it, window by window)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for table in clips.windows():
        counts += np.bincount(table.labels, minlength=num_classes)
    return [int(c) for c in counts]


def loss_weights(
    cfg: TrainConfig,
    train_clips: Clips,
    class_counts: Sequence[int] | None,
    num_classes: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The loss's class weights that ``cfg.class_weight`` gives for the training clips per
    class (``class_counts``, else counted from ``train_clips``), or None (unweighted)."""
    if cfg.class_weight == "none":
        return None
    counts = list(class_counts) if class_counts is not None else None
    if counts is None:
        counts = train_class_counts(train_clips, num_classes)
    weights = class_weights(cfg.class_weight, counts)
    log.info(
        "class_weight=%s: %s loss (training clips per class %s)", cfg.class_weight,
        resolve_class_weight(cfg.class_weight, counts), counts,
    )  # fmt: skip
    if weights is None:
        return None
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _weights_copy(model: PartwiseClassifier) -> dict[str, torch.Tensor]:
    """The model's weights as they are now, on the CPU (the best epoch's, kept)."""
    return {k: v.detach().cpu().clone() for k, v in model.model.state_dict().items()}


def _training_engine(
    cfg: TrainConfig,
    model: PartwiseClassifier,
    wrapped: nn.Module,
    train_clips: Clips,
    device: torch.device,
    world_size: int,
) -> tuple[eng.Engine, int]:
    """The run's engine (AdamW, its schedule over every epoch's steps) and the optimizer
    steps of one epoch."""
    num_batches = batches_per_epoch(
        train_clips, cfg.batch_size, world_size=world_size, group_factor=cfg.length_group_factor
    )
    steps = eng.steps_per_epoch(num_batches, cfg.grad_accum_steps)
    engine = eng.build_engine(
        model, build_optimizer(model, cfg), cfg, total_steps=steps * cfg.epochs, device=device,
        wrapped=wrapped,
    )  # fmt: skip
    return engine, steps


def run_training(
    cfg: TrainConfig,
    model: PartwiseClassifier,
    feature_extractor,
    train_clips: Clips,
    val_clips: Clips | None,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    resume_from: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict[str, float], Callable[[Path], Path]], None] | None = None,
    log_dir: str | os.PathLike | None = None,
    class_counts: Sequence[int] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Train for ``cfg.epochs`` (or until early stopping); leave the best weights in ``model``.

    ``on_epoch_end(metrics, write_checkpoint)`` runs after every epoch on every rank;
    ``write_checkpoint(dir)`` saves the full training state there. With ``resume_from`` (a
    checkpoint folder) training continues exactly where that checkpoint left off.
    ``class_counts`` (training clips per class, all ranks'; else counted from this rank's
    ``train_clips``) set the loss's class weights (:func:`loss_weights`); ``on_progress``
    takes rank 0's progress lines inside an epoch."""
    device = torch.device(device)
    model.to(device)
    weights = loss_weights(cfg, train_clips, class_counts, model.config.num_labels, device)
    resumed = resume_from is not None
    prepare_head(model, train_clips, cfg, device, world_size, resumed=resumed, weights=weights)
    wrapped = wrap_model(model) if wrap_model is not None else model
    engine, steps = _training_engine(cfg, model, wrapped, train_clips, device, world_size)
    state, best_weights = TrainState(), None
    if resumed:
        state, best_weights = load_checkpoint(resume_from, model=model, engine=engine, rank=rank)
        log.info(
            "resumed at epoch %d, step %d (best epoch %d)", state.epoch, state.step,
            state.best_epoch,
        )  # fmt: skip
    scalars = eng.ScalarLog(log_dir, rank, resume_step=state.step)
    emit = on_progress if rank == 0 else None

    def checkpoint_writer(state: TrainState, best_weights) -> Callable[[Path], Path]:
        return functools.partial(
            write_checkpoint, model=model, feature_extractor=feature_extractor, engine=engine,
            state=state, best_weights=best_weights, rank=rank,
        )  # fmt: skip

    try:
        for epoch in range(state.epoch, cfg.epochs):
            if state.stopped_early:
                break
            state.step, train_metrics = train_one_epoch(
                engine,
                epoch_batches(train_clips, cfg, epoch, rank, world_size),
                cfg,
                epoch=epoch,
                step=state.step,
                on_step=lambda step, values: scalars.add(values, step),
                weights=weights,
                progress=EpochProgress(
                    f"epoch {epoch + 1}/{cfg.epochs}", steps, emit, every_s=cfg.progress_every_s
                ),
            )
            val_metrics, uar = validate_epoch(
                model, val_clips, cfg, engine, epoch=epoch, world_size=world_size,
                on_progress=emit,
            )  # fmt: skip
            metrics, improved = record_epoch(state, epoch, uar, cfg, train_metrics, val_metrics)
            if improved:
                best_weights = _weights_copy(model)
            scalars.add({**val_metrics, "train/epoch_loss": metrics["train/loss"]}, state.step)
            scalars.flush()
            if on_epoch_end is not None:
                on_epoch_end(metrics, checkpoint_writer(copy.deepcopy(state), best_weights))
    finally:
        scalars.close()
    if best_weights is not None:
        model.model.load_state_dict(best_weights)
    return TrainOutcome(state, best_weights, checkpoint_writer(state, best_weights))


def refit(
    cfg: TrainConfig,
    epochs: int,
    fit_clips: Clips,
    val_clips: Clips,
    class_names: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    class_counts: Sequence[int] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[PartwiseClassifier, Clips]:
    """A fresh model trained on the fit and validation clips for ``epochs`` epochs (the best
    epoch count found with the validation speakers held out), its schedule spread over them,
    a new head for ``class_names``; ``class_counts`` (fit and validation clips per class) and
    ``on_progress`` as :func:`run_training` takes them.

    Returns the model (last-epoch weights: there is nothing left to select on) and the clips
    it trained on. No checkpoints: a restart repeats the refit, seeded, to the same weights.
    """
    refit_cfg = dataclasses.replace(cfg, epochs=max(1, epochs), early_stopping_patience=None)
    eng.seed_everything(cfg.seed, rank)
    model, fe = build_model(refit_cfg, class_names)
    if isinstance(fit_clips, ClipArrays):
        clips = merge_tables(fit_clips, val_clips)
    else:
        clips = chain_streams(fit_clips, val_clips)
    run_training(
        refit_cfg, model, fe, clips, None, device=device, rank=rank, world_size=world_size,
        wrap_model=wrap_model, class_counts=class_counts, on_progress=on_progress,
    )  # fmt: skip
    log.info("refit on %d clips for %d epochs", len(clips), refit_cfg.epochs)
    return model, clips
