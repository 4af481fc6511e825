"""Our own PyTorch fine-tuning loop for the SSL-encoder classifier, on Ray Train V2.

Read it top to bottom:

1. :class:`TrainConfig` — every setting with its default and what it does.
2. Ray-free pieces, unit-tested without Ray: :func:`table_from_arrow` (clips in worker
   memory), :func:`length_grouped_batches` (similar lengths per batch), :func:`collate`
   (dynamic padding), :func:`build_optimizer` (AdamW, no decay on biases/norms, separate
   peaks for encoder and head), :func:`train_one_epoch` (AMP, gradient accumulation,
   optional clipping, NaN check), :func:`evaluate` (loss, accuracy, UA, macro-F1 and
   per-clip probabilities), checkpoints (:func:`write_checkpoint` / :func:`load_checkpoint`)
   and :func:`run_training` (epochs, best-epoch selection on validation UA, early stopping,
   TensorBoard, exact resume).
3. Ray touch-points, marked ``# RAY:``: :func:`train_fold_per_worker` (the per-worker
   function of a ``TorchTrainer``; also what a Tune trial runs), :func:`read_split`,
   :func:`build_trainer` and the plain driver :func:`fit_fold`.

Validation actors come from the training side of the outer fold
(:func:`ser_ray.folds.validation_actors`); the test fold is only scored once, with the
best-epoch weights, at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from ser_ray import folds, ravdess
from ser_ray.engine import (  # the loop skeleton's pieces shared with pre-training
    NonFiniteLossError,
    resolve_amp,
    rng_states,
    seed_everything,
    set_rng_states,
)
from ser_ray.metrics import classification_metrics
from ser_ray.model import (
    PartwiseClassifier,
    inference_batches,
    load_model,
    pad_waveforms,
    prepare_waveform,
    save_model,
)
from ser_ray.schedule import build_scheduler

log = logging.getLogger(__name__)

#: What a worker holds per clip: a waveform, the frozen CNN's output, or pooled layers.
INPUT_KINDS = ("waveform", "cnn", "pooled")
TRAIN_STATE_FILE = "train_state.pt"
RNG_STATE_FILE = "rng_rank{rank}.pt"  # one per DDP rank: each draws its own dropout masks
MODEL_DIR = "model"  # latest weights (HF checkpoint)
BEST_MODEL_DIR = "best_model"  # best-epoch weights (HF checkpoint)
PREDICTIONS_FILE = "predictions.csv"
MODEL_NAME = "wav2vec2"


# ----------------------------------------------------------------------------------------
# 1. Settings
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    """Settings of one fine-tuning run (one outer fold). Defaults suit a pretrained encoder."""

    # model
    model: str = dataclasses.field(
        default="demo",
        metadata={
            "help": "hub id or local folder of a wav2vec2, HuBERT, WavLM or data2vec-audio "
            "encoder (facebook/wav2vec2-base, microsoft/wavlm-large, ...), or 'demo'"
        },
    )
    probe: bool = dataclasses.field(
        default=False, metadata={"help": "freeze the whole encoder; train the head only"}
    )
    use_weighted_layer_sum: bool = dataclasses.field(
        default=True, metadata={"help": "learnable softmax-weighted sum of all hidden layers"}
    )
    head_dropout: float = dataclasses.field(
        default=0.1,
        metadata={"help": "dropout after the projector, in training only (not in the checkpoint)"},
    )
    freeze_feature_encoder: bool = dataclasses.field(
        default=True, metadata={"help": "freeze the CNN feature encoder (wav2vec 2.0 paper)"}
    )
    freeze_encoder_steps: int = dataclasses.field(
        default=0, metadata={"help": "train only the head for the first N optimizer steps"}
    )
    mask_time_prob: float | None = dataclasses.field(
        default=None,
        metadata={"help": "SpecAugment time-mask probability; None keeps the model config's"},
    )
    # optimizer (AdamW)
    lr_encoder: float = dataclasses.field(
        default=5e-5, metadata={"help": "peak LR of the encoder (published range 1e-5..1e-4)"}
    )
    lr_head: float = dataclasses.field(default=1e-3, metadata={"help": "peak LR of the head"})
    weight_decay: float = dataclasses.field(
        default=0.01, metadata={"help": "AdamW decoupled weight decay (not on biases/norms)"}
    )
    betas: tuple[float, float] = dataclasses.field(
        default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2)"}
    )
    eps: float = dataclasses.field(default=1e-8, metadata={"help": "AdamW epsilon"})
    # schedule (ser_ray.schedule)
    warmup_frac: float = dataclasses.field(
        default=0.1, metadata={"help": "fraction of steps of linear warm-up"}
    )
    decay_start_frac: float = dataclasses.field(
        default=0.7, metadata={"help": "fraction of steps after which the LR decays"}
    )
    final_lr_scale: float = dataclasses.field(
        default=0.05, metadata={"help": "LR at the last step, as a fraction of the peak"}
    )
    decay_shape: str = dataclasses.field(
        default="linear", metadata={"help": "decay shape: linear, cosine or exponential"}
    )
    grad_clip_norm: float | None = dataclasses.field(
        default=None, metadata={"help": "clip the global grad norm to this value; None = off"}
    )
    grad_accum_steps: int = dataclasses.field(
        default=1, metadata={"help": "micro-batches per optimizer step"}
    )
    # data
    batch_size: int = dataclasses.field(default=8, metadata={"help": "clips per micro-batch"})
    eval_batch_size: int = dataclasses.field(
        default=16, metadata={"help": "clips per batch in evaluation"}
    )
    length_group_factor: int = dataclasses.field(
        default=50, metadata={"help": "sort by length within windows of this many batches"}
    )
    epochs: int = dataclasses.field(default=10, metadata={"help": "maximum number of epochs"})
    early_stopping_patience: int | None = dataclasses.field(
        default=5, metadata={"help": "stop after N epochs without a better val UA; None = off"}
    )
    merge_calm: bool = dataclasses.field(
        default=False, metadata={"help": "merge calm into neutral (7 classes)"}
    )
    n_val_actors: int = dataclasses.field(
        default=4, metadata={"help": "validation actors taken from the training side; 0 = none"}
    )
    use_feature_cache: bool = dataclasses.field(
        default=True, metadata={"help": "reuse the frozen CNN's (probe: all layers') outputs"}
    )
    refit: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "after choosing the best epoch on the validation actors, retrain from "
            "scratch on fit + validation actors for that many epochs and test that model"
        },
    )
    # runtime
    amp: str = dataclasses.field(
        default="auto", metadata={"help": "auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off"}
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of init and order; rank r's dropout uses seed + r"}
    )

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # lists arrive from JSON / Tune
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.grad_accum_steps < 1 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("grad_accum_steps, batch_size and epochs must be >= 1")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError("grad_clip_norm must be > 0 (or None to turn clipping off)")
        if self.use_feature_cache and not self.freeze_feature_encoder:
            raise ValueError("the feature cache needs a frozen CNN (freeze_feature_encoder=True)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring keys that are not settings (fold, input_kind, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@dataclasses.dataclass
class TrainState:
    """Progress saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_uar: float = -math.inf
    best_epoch: int = 0  # 1-based; 0 = none yet
    epochs_since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------
# 2. Ray-free pieces
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClipTable:
    """Clips held in a worker's memory, sorted by path (a deterministic order).

    ``inputs[i]`` is a prepared waveform (S,), CNN features (T, C) or pooled layer states
    (K, H), by ``kind``.
    """

    kind: str
    paths: list[str]
    actors: np.ndarray
    emotions: list[str]
    labels: np.ndarray
    inputs: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([x.shape[0] for x in self.inputs], dtype=np.int64)


def _list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<float32> column as float32 numpy arrays (no Python floats in between)."""
    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # pyarrow may keep one chunk
        column = column.chunk(0) if column.num_chunks else pa.array([], column.type)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def table_from_arrow(
    table: pa.Table,
    kind: str,
    class_names: Sequence[str],
    merge_calm: bool,
    feature_extractor=None,
) -> ClipTable:
    """Clips from a features table (``waveform`` column) or a feature cache (``features``).

    Waveforms are prepared per clip (feature extractor's normalisation) once, here.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    if table.num_rows == 0:
        return ClipTable(kind, [], np.zeros(0, np.int64), [], np.zeros(0, np.int64), [])
    order = np.argsort(np.array(table.column("path").to_pylist(), dtype=object), kind="stable")
    table = table.take(pa.array(order))
    paths = table.column("path").to_pylist()
    emotions = table.column("emotion").to_pylist()
    if kind == "waveform":
        if feature_extractor is None:
            raise ValueError("waveforms need the feature extractor (normalisation)")
        inputs = [prepare_waveform(w, feature_extractor) for w in _list_column(table, "waveform")]
    else:
        rows = table.column("feature_rows").to_numpy()
        dims = table.column("feature_dim").to_numpy()
        inputs = [
            x.reshape(int(r), int(d))
            for x, r, d in zip(_list_column(table, "features"), rows, dims, strict=True)
        ]
    names = list(class_names)
    labels = np.array([ravdess.label_index(e, merge_calm) for e in emotions], dtype=np.int64)
    if len(names) != len(ravdess.class_names(merge_calm)):
        raise ValueError(f"class names {names} do not match merge_calm={merge_calm}")
    return ClipTable(
        kind=kind,
        paths=paths,
        actors=table.column("actor").to_numpy().astype(np.int64),
        emotions=emotions,
        labels=labels,
        inputs=inputs,
    )


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    group_factor: int = 50,
) -> list[list[int]]:
    """Shuffled batches of clips of similar length, this rank's share (equal for every rank).

    Shuffle with an RNG seeded by ``(seed, epoch)``, sort each window of
    ``batch_size * group_factor`` clips by length, cut it into batches, shuffle the batches;
    rank ``r`` takes batches ``r, r + world_size, ...`` (the remainder is dropped so that
    every rank runs the same number of steps).
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * max(1, group_factor)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(lengths)} clips make fewer batches than {world_size} workers")
    return batches[rank::world_size][:per_rank]


def collate(
    table: ClipTable, indices: Sequence[int], device: torch.device | str = "cpu", padding_value=0.0
) -> dict[str, torch.Tensor]:
    """Model keyword arguments for the clips ``indices`` (dynamic padding to the longest)."""
    items = [table.inputs[i] for i in indices]
    if table.kind == "waveform":
        values, lengths = pad_waveforms(items, padding_value)
        batch = {"input_values": values, "lengths": lengths}
    elif table.kind == "cnn":
        feats = nn.utils.rnn.pad_sequence([torch.tensor(x) for x in items], batch_first=True)
        frames = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
        batch = {"cnn_features": feats, "frame_lengths": frames}
    else:
        batch = {"pooled_layers": torch.from_numpy(np.stack(items))}
    batch["labels"] = torch.from_numpy(table.labels[list(indices)])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def unwrap(model: nn.Module) -> PartwiseClassifier:
    """The classifier inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in four groups: {encoder, head} x {decay, none}.

    Biases, norm weights and other 1-D parameters (layer weights, mask embedding) get no
    weight decay. Call before any temporary freezing (``freeze_encoder_steps``).
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    core = unwrap(model)
    for name, p in core.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoder" if core.is_encoder_parameter(name) else "head"
        groups.setdefault((part, _no_decay(name, p)), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    param_groups = [
        {
            "params": params,
            "lr": cfg.lr_encoder if part == "encoder" else cfg.lr_head,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "name": f"{part}{'/no_decay' if no_decay else ''}",
        }
        for (part, no_decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=cfg.betas, eps=cfg.eps)


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR of the encoder and head groups (``train/lr`` is the head's)."""
    lrs = {g["name"].split("/")[0]: g["lr"] for g in optimizer.param_groups}
    return {"train/lr": lrs.get("head", 0.0), "train/lr_encoder": lrs.get("encoder", 0.0)}


def steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    return math.ceil(num_batches / grad_accum_steps)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    table: ClipTable,
    batches: Sequence[Sequence[int]],
    cfg: TrainConfig,
    *,
    epoch: int,
    step: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[int, dict[str, float]]:
    """One pass over ``batches``; returns (steps done so far, {train/loss, ...}).

    Gradient accumulation over ``cfg.grad_accum_steps`` micro-batches (the loss is the mean
    over the clips of the group), clipping only when ``cfg.grad_clip_norm`` is set, the
    transformer frozen while ``step < cfg.freeze_encoder_steps``.
    """
    model.train()
    core = unwrap(model)
    accum = cfg.grad_accum_steps
    total_loss, total_clips, t0 = 0.0, 0, time.perf_counter()
    for g in range(0, len(batches), accum):
        group = batches[g : g + accum]
        core.set_transformer_trainable(step >= cfg.freeze_encoder_steps)
        optimizer.zero_grad(set_to_none=True)
        group_clips = sum(len(b) for b in group)
        group_loss = 0.0
        for j, indices in enumerate(group):
            inputs = collate(table, indices, device)
            last = j == len(group) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(model, "no_sync")
                else model.no_sync()
            )
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = model(**inputs).loss
                if not torch.isfinite(loss):
                    lrs = current_lrs(optimizer)
                    raise NonFiniteLossError(
                        f"training loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr_encoder={lrs['train/lr_encoder']:.3g}, lr_head={lrs['train/lr']:.3g})"
                        ": training diverged; lower the learning rates (lr_encoder, lr_head) "
                        "or set grad_clip_norm"
                    )
                weighted = loss * (len(indices) / group_clips)
                (scaler.scale(weighted) if scaler is not None else weighted).backward()
            group_loss += loss.item() * len(indices)
        if cfg.grad_clip_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [p for grp in optimizer.param_groups for p in grp["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        lrs = current_lrs(optimizer)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        total_loss += group_loss
        total_clips += group_clips
        if on_step is not None:
            on_step(step, {"train/loss": group_loss / group_clips, **lrs})
    seconds = time.perf_counter() - t0
    return step, {
        "train/loss": total_loss / max(total_clips, 1),
        "train/clips_per_s": total_clips / seconds if seconds > 0 else 0.0,
        "train/epoch_s": seconds,
        **current_lrs(optimizer),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    table: ClipTable,
    *,
    batch_size: int,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    prefix: str = "val",
) -> tuple[dict[str, float], np.ndarray]:
    """({prefix}/loss, /accuracy, /uar, /macro_f1) and softmax probabilities (N, classes).

    Clips are batched as :func:`ser_ray.model.inference_batches` says, so each clip gets the
    probabilities the standard class (and ``pipeline()``) gives it alone."""
    core = unwrap(model)
    was_training = core.training
    core.eval()
    probs = np.zeros((len(table), num_classes), dtype=np.float64)
    total_loss = 0.0
    # the padding rule of jobs/predict.py: padded batches only where padding changes nothing
    exact_length = table.kind != "pooled" and not core.pads_exactly
    for indices in inference_batches(table.lengths, batch_size, exact_length):
        inputs = collate(table, indices, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = core(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        logits = logits.float()
        total_loss += nn.functional.cross_entropy(logits, inputs["labels"], reduction="sum").item()
        probs[indices] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
    core.train(was_training)
    if len(table) == 0:
        return {}, probs
    scores = classification_metrics(table.labels, probs.argmax(axis=1), num_classes)
    metrics = {f"{prefix}/loss": total_loss / len(table)}
    metrics.update({f"{prefix}/{k}": v for k, v in scores.items()})
    return metrics, probs


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


def write_checkpoint(
    out_dir: str | os.PathLike,
    *,
    model: nn.Module,
    feature_extractor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    best_weights: dict[str, torch.Tensor] | None,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
) -> Path:
    """Everything a restarted run needs: latest and best weights (HF), optimizer, scheduler,
    scaler, step/epoch/best so far (rank 0 writes these), and this rank's RNG states
    (``rng_rank<r>.pt``, every rank; all ranks may write into the same folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(rng_states(), out / RNG_STATE_FILE.format(rank=rank))
    if rank != 0:
        return out
    core = unwrap(model)
    save_model(core.model, feature_extractor, out / MODEL_DIR)
    if best_weights is not None:
        from safetensors.torch import save_file

        best_dir = out / BEST_MODEL_DIR
        best_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in best_weights.items()}
        save_file(tensors, str(best_dir / "model.safetensors"), metadata={"format": "pt"})
        core.model.config.save_pretrained(best_dir)
        feature_extractor.save_pretrained(best_dir)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": dataclasses.asdict(state),
            "extra": extra or {},
        },
        out / TRAIN_STATE_FILE,
    )
    return out


def _load_weights(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    missing, unexpected = unwrap(model).model.load_state_dict(weights, strict=False)
    if unexpected or missing:
        raise ValueError(f"checkpoint {folder} does not fit: missing {missing}, extra {unexpected}")
    return weights


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint written by :func:`write_checkpoint` (this rank's RNG states)."""
    ckpt = Path(ckpt_dir)
    rng_file = ckpt / RNG_STATE_FILE.format(rank=rank)
    if not rng_file.exists():
        saved_ranks = sorted(p.name for p in ckpt.glob(RNG_STATE_FILE.format(rank="*")))
        raise FileNotFoundError(
            f"{ckpt} holds no RNG states for rank {rank} (it has {saved_ranks}); resume with "
            "the number of workers that wrote it"
        )
    _load_weights(model, ckpt / MODEL_DIR)
    saved = torch.load(ckpt / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    set_rng_states(torch.load(rng_file, weights_only=False))
    best = None
    if (ckpt / BEST_MODEL_DIR).is_dir():
        from safetensors.torch import load_file

        best = {}
        for f in sorted((ckpt / BEST_MODEL_DIR).glob("*.safetensors")):
            best.update(load_file(str(f)))
    return TrainState(**saved["state"]), best


@dataclasses.dataclass
class TrainOutcome:
    state: TrainState
    best_weights: dict[str, torch.Tensor] | None
    #: writes the final training state (a restart from it skips straight to the end)
    write_checkpoint: Callable[[Path], Path]


def run_training(
    cfg: TrainConfig,
    model: PartwiseClassifier,
    feature_extractor,
    train_table: ClipTable,
    val_table: ClipTable | None,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    resume_from: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict[str, float], Callable[[Path], Path]], None] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> TrainOutcome:
    """Train for ``cfg.epochs`` (or until early stopping); leave the best weights in ``model``.

    ``on_epoch_end(metrics, write_checkpoint)`` runs after every epoch on every rank;
    ``write_checkpoint(dir)`` saves the full training state there. With ``resume_from`` (a
    checkpoint folder) training continues exactly where that checkpoint left off.
    """
    device = torch.device(device)
    num_classes = model.config.num_labels
    model.to(device)
    wrapped = wrap_model(model) if wrap_model is not None else model
    optimizer = build_optimizer(model, cfg)
    batches_per_epoch = len(
        length_grouped_batches(
            train_table.lengths,
            cfg.batch_size,
            seed=cfg.seed,
            epoch=0,
            rank=rank,
            world_size=world_size,
            group_factor=cfg.length_group_factor,
        )
    )
    total_steps = steps_per_epoch(batches_per_epoch, cfg.grad_accum_steps) * cfg.epochs
    scheduler = build_scheduler(
        optimizer,
        total_steps,
        cfg.warmup_frac,
        cfg.decay_start_frac,
        cfg.final_lr_scale,
        cfg.decay_shape,
    )
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state, best_weights = TrainState(), None
    if resume_from is not None:
        state, best_weights = load_checkpoint(
            resume_from,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            rank=rank,
        )
        log.info(
            "resumed at epoch %d, step %d (best epoch %d)",
            state.epoch,
            state.step,
            state.best_epoch,
        )
    writer = None
    if rank == 0 and log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir), purge_step=state.step or None)

    def log_step(step: int, values: dict[str, float]) -> None:
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, step)

    try:
        for epoch in range(state.epoch, cfg.epochs):
            if state.stopped_early:
                break
            batches = length_grouped_batches(
                train_table.lengths,
                cfg.batch_size,
                seed=cfg.seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                group_factor=cfg.length_group_factor,
            )
            state.step, train_metrics = train_one_epoch(
                wrapped,
                optimizer,
                scheduler,
                train_table,
                batches,
                cfg,
                epoch=epoch,
                step=state.step,
                device=device,
                amp_dtype=amp_dtype,
                scaler=scaler,
                on_step=log_step,
            )
            val_metrics: dict[str, float] = {}
            if val_table is not None and len(val_table):
                val_metrics, _ = evaluate(
                    model,
                    val_table,
                    batch_size=cfg.eval_batch_size,
                    device=device,
                    num_classes=num_classes,
                    amp_dtype=amp_dtype,
                )
            uar = val_metrics.get("val/uar", float(epoch))  # no validation: the last epoch wins
            uar = rank0_value(uar, world_size, device)  # one decision for every rank
            state.epoch = epoch + 1
            if uar > state.best_uar:
                state.best_uar, state.best_epoch, state.epochs_since_best = uar, epoch + 1, 0
                best_weights = {
                    k: v.detach().cpu().clone() for k, v in model.model.state_dict().items()
                }
            else:
                state.epochs_since_best += 1
            patience = cfg.early_stopping_patience
            if patience and state.epochs_since_best >= patience and state.epoch < cfg.epochs:
                state.stopped_early = True
                log.info(
                    "early stopping after epoch %d (best epoch %d)", state.epoch, state.best_epoch
                )
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
            if writer is not None:
                for key, value in {
                    **val_metrics,
                    "train/epoch_loss": metrics["train/loss"],
                }.items():
                    writer.add_scalar(key, value, state.step)
                writer.flush()
            log.info(
                "epoch %d/%d step %d: %s",
                state.epoch,
                cfg.epochs,
                state.step,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k),
            )
            if on_epoch_end is not None:
                on_epoch_end(
                    metrics,
                    functools.partial(
                        write_checkpoint,
                        model=model,
                        feature_extractor=feature_extractor,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        scaler=scaler,
                        state=copy.deepcopy(state),
                        best_weights=best_weights,
                        rank=rank,
                    ),
                )
    finally:
        if writer is not None:
            writer.close()
    if best_weights is not None:
        model.model.load_state_dict(best_weights)

    def write_final(out_dir: Path) -> Path:
        return write_checkpoint(
            out_dir,
            model=model,
            feature_extractor=feature_extractor,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            state=state,
            best_weights=best_weights,
            rank=rank,
        )

    return TrainOutcome(state=state, best_weights=best_weights, write_checkpoint=write_final)


def predictions_frame(
    table: ClipTable,
    probs: np.ndarray,
    class_names: Sequence[str],
    fold: int | None,
    model_name: str = MODEL_NAME,
) -> pd.DataFrame:
    """Per-clip rows in the predictions.csv format (probability columns sum to 1)."""
    names = list(class_names)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "path": table.paths,
            "actor": table.actors.astype(int),
            "fold": fold,
            "true_label": [names[i] for i in table.labels],
            "pred_label": [names[i] for i in probs.argmax(axis=1)],
            "model": model_name,
        }
    )
    for i, name in enumerate(names):
        frame[f"prob_{name}"] = probs[:, i]
    return frame


# ----------------------------------------------------------------------------------------
# 3. Ray touch-points
# ----------------------------------------------------------------------------------------
def read_split(
    source_dir: str | os.PathLike, actors: Sequence[int], columns: Sequence[str] | None = None
) -> pa.Table:
    """The rows of ``actors`` from a features or feature-cache Parquet folder (local or URI).

    Each worker reads its fold's clips itself (predicate pushdown on ``actor``), so no Ray Data
    tasks compete for CPUs with the training workers of concurrent folds.
    """
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    source = str(source_dir)
    if "://" in source:
        fs, path = pafs.FileSystem.from_uri(source)
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(source).resolve())
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    return dataset.to_table(
        columns=list(columns) if columns else None,
        filter=pads.field("actor").isin([int(a) for a in actors]),
    )


def train_fold_per_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: train on ``train``, select on ``val``, score ``test``.

    ``config``: every :class:`TrainConfig` field (missing ones take their defaults) plus
    ``source`` (features or feature-cache Parquet folder, local or URI; each worker reads its
    fold's actors from it with :func:`read_split`), ``fold`` (int), ``scheme`` (fold scheme),
    ``input_kind`` ("waveform" | "cnn" | "pooled"; the source's kind),
    ``feature_cache_key`` (with a cache: checked against the model), ``log_dir``
    (TensorBoard folder or None). Reports ``train/*``, ``val/*`` each epoch with a
    checkpoint, then ``test/accuracy``, ``test/uar``, ``test/macro_f1``, ``best_epoch`` with
    the final checkpoint (``best_model/`` and ``predictions.csv``). Resumes from
    ``ray.train.get_checkpoint()``.
    """
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config)
    context = ray.train.get_context()  # RAY
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # RAY
    kind = config.get("input_kind", "waveform")
    fold = config.get("fold")
    class_names = ravdess.class_names(cfg.merge_calm)
    seed_everything(cfg.seed, rank)
    model, fe = build_model(cfg, class_names)
    if kind != "waveform":
        from ser_ray.feature_cache import cache_key

        expected = config.get("feature_cache_key")
        have = cache_key(model, fe, kind)
        if expected is not None and expected != have:
            raise ValueError(
                f"the feature cache ({expected}) was not made by this model's frozen part "
                f"({have}); rebuild it or turn use_feature_cache off"
            )
    test_actors, fit_actors, val_actors = fold_split(
        fold, config.get("scheme", "contiguous"), cfg.n_val_actors
    )
    columns = ["path", "actor", "emotion", "waveform"] if kind == "waveform" else None
    tables = {
        name: table_from_arrow(
            read_split(config["source"], actors, columns), kind, class_names, cfg.merge_calm, fe
        )
        if actors
        else None
        for name, actors in (("train", fit_actors), ("val", val_actors), ("test", test_actors))
    }
    if tables["train"] is None or not len(tables["train"]):
        raise ValueError(f"fold {fold}: no training clips in {config['source']}")

    def wrap(m: nn.Module) -> nn.Module:
        if world_size == 1:
            return m
        return ray.train.torch.prepare_model(  # RAY: DDP
            m,
            move_to_device=False,
            # some parameters sit out some steps (frozen transformer during
            # freeze_encoder_steps, the SpecAugment mask embedding when no span is drawn)
            parallel_strategy_kwargs={"find_unused_parameters": True},
        )

    def report(metrics: dict[str, float], write: Callable[[Path], Path] | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if write is not None:  # every rank: Ray merges the ranks' files into one folder
                write(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # RAY

    resume_dir = None
    checkpoint = ray.train.get_checkpoint()  # RAY: resume after a failure or a restart
    with contextlib.ExitStack() as stack:
        if checkpoint is not None:
            resume_dir = Path(stack.enter_context(checkpoint.as_directory()))
            log.info("resuming from %s", resume_dir)
        outcome = run_training(
            cfg,
            model,
            fe,
            tables["train"],
            tables["val"],
            device=device,
            rank=rank,
            world_size=world_size,
            wrap_model=wrap,
            resume_from=resume_dir,
            on_epoch_end=report,
            log_dir=config.get("log_dir") if rank == 0 else None,
        )
    amp_dtype = resolve_amp(cfg.amp, device)
    final: dict[str, Any] = {
        "epoch": outcome.state.epoch,
        "best_epoch": outcome.state.best_epoch,
        "done": True,
    }
    trained_on = tables["train"]
    if cfg.refit and tables["val"] is not None and len(tables["val"]):
        model, trained_on = refit(
            cfg,
            outcome.state.best_epoch,
            tables["train"],
            tables["val"],
            device=device,
            rank=rank,
            world_size=world_size,
            wrap_model=wrap,
        )
        final["refit_epochs"] = outcome.state.best_epoch
    if outcome.state.best_uar > -math.inf and tables["val"] is not None and len(tables["val"]):
        final["best/val_uar"] = outcome.state.best_uar
    frame = None
    if tables["test"] is not None and len(tables["test"]):
        test_metrics, probs = evaluate(
            model,
            tables["test"],
            batch_size=cfg.eval_batch_size,
            device=device,
            num_classes=len(class_names),
            amp_dtype=amp_dtype,
            prefix="test",
        )
        final.update(test_metrics)
        frame = predictions_frame(tables["test"], probs, class_names, fold)

    def write_final(out: Path) -> Path:
        outcome.write_checkpoint(out)  # a restart after the end resumes to here
        if rank != 0:
            return out
        save_model(model.model, fe, out / BEST_MODEL_DIR)  # best-epoch (or refit) weights
        if frame is not None:
            frame.to_csv(out / PREDICTIONS_FILE, index=False)
        (out / "result.json").write_text(
            json.dumps(
                {
                    "metrics": final,
                    "history": outcome.state.history,
                    "train_config": cfg.to_dict(),
                    "fold": fold,
                    "trained_on_actors": sorted({int(a) for a in trained_on.actors}),
                    "input_kind": kind,
                    "class_names": class_names,
                },
                indent=2,
                default=float,
            )
        )
        return out

    report(final, write_final)


def merge_tables(a: ClipTable, b: ClipTable) -> ClipTable:
    """The clips of both tables (same kind), sorted by path like every :class:`ClipTable`."""
    if a.kind != b.kind:
        raise ValueError(f"cannot merge {a.kind} clips with {b.kind} clips")
    paths = a.paths + b.paths
    order = np.argsort(np.array(paths, dtype=object), kind="stable")
    emotions, inputs = a.emotions + b.emotions, a.inputs + b.inputs
    return ClipTable(
        kind=a.kind,
        paths=[paths[i] for i in order],
        actors=np.concatenate([a.actors, b.actors])[order],
        emotions=[emotions[i] for i in order],
        labels=np.concatenate([a.labels, b.labels])[order],
        inputs=[inputs[i] for i in order],
    )


def refit(
    cfg: TrainConfig,
    epochs: int,
    fit_table: ClipTable,
    val_table: ClipTable,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[PartwiseClassifier, ClipTable]:
    """A fresh model trained on the fit and validation clips for ``epochs`` epochs (the best
    epoch count found with the validation actors held out), its schedule spread over them.

    Returns the model (last-epoch weights: there is nothing left to select on) and the clips
    it trained on. No checkpoints: a restart repeats the refit, seeded, to the same weights.
    """
    refit_cfg = dataclasses.replace(cfg, epochs=max(1, epochs), early_stopping_patience=None)
    seed_everything(cfg.seed, rank)
    model, fe = build_model(refit_cfg, ravdess.class_names(cfg.merge_calm))
    table = merge_tables(fit_table, val_table)
    run_training(
        refit_cfg, model, fe, table, None, device=device, rank=rank, world_size=world_size,
        wrap_model=wrap_model,
    )  # fmt: skip
    log.info(
        "refit on %d clips of actors %s for %d epochs",
        len(table),
        sorted(set(table.actors.tolist())),
        refit_cfg.epochs,
    )
    return model, table


def build_model(cfg: TrainConfig, class_names: Sequence[str]) -> tuple[PartwiseClassifier, Any]:
    """The classifier (a standard HF audio classifier, run in parts) and feature extractor
    a run of ``cfg`` trains (seeded head)."""
    overrides = {}
    if cfg.mask_time_prob is not None:
        overrides["mask_time_prob"] = cfg.mask_time_prob
    model, fe = load_model(
        cfg.model,
        class_names,
        use_weighted_layer_sum=cfg.use_weighted_layer_sum,
        freeze_feature_encoder=cfg.freeze_feature_encoder or cfg.probe,
        seed=cfg.seed,
        **overrides,
    )
    runner = PartwiseClassifier(model, fe.return_attention_mask, cfg.head_dropout)
    if cfg.probe:
        runner.freeze_encoder()
    return runner, fe


def fold_split(
    fold: int, scheme: str = "contiguous", n_val_actors: int = 4
) -> tuple[list[int], list[int], list[int]]:
    """(test actors, training actors without validation, validation actors) of one fold."""
    test_actors, train_actors = folds.test_and_train_actors(fold, scheme)
    val_actors = folds.validation_actors(train_actors, n_val_actors) if n_val_actors else []
    fit_actors = [a for a in train_actors if a not in val_actors]
    folds.check_no_leakage(fit_actors + val_actors, test_actors)
    return test_actors, fit_actors, val_actors


def build_trainer(
    train_loop_config: dict[str, Any],
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | os.PathLike | None = None,
    name: str | None = None,
    max_failures: int = 0,
    resources_per_worker: dict[str, float] | None = None,
    callbacks: list | None = None,
):
    """A ``TorchTrainer`` running :func:`train_fold_per_worker` (Ray Train V2).

    ``callbacks``: Ray Train callbacks, e.g. ``TuneReportCallback()`` inside a Tune trial."""
    from ser_ray.ray_train_edge import build_torch_trainer

    return build_torch_trainer(  # RAY
        train_fold_per_worker,
        train_loop_config,
        num_workers=num_workers,
        use_gpu=use_gpu,
        storage_path=storage_path,
        name=name,
        max_failures=max_failures,
        resources_per_worker=resources_per_worker,
        callbacks=callbacks,
    )


@dataclasses.dataclass
class FoldResult:
    """Outcome of one outer fold."""

    fold: int
    scheme: str
    test_actors: list[int]
    val_actors: list[int]
    n_test: int
    metrics: dict[str, float]  # test/accuracy, test/uar, test/macro_f1, best_epoch, ...
    best_epoch: int
    history: list[dict[str, float]]
    predictions: pd.DataFrame
    model_dir: Path  # best-epoch model (HF checkpoint)
    run_dir: Path


def fit_fold(
    features_dir: str | os.PathLike,
    fold: int,
    scheme: str = "contiguous",
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike = "runs/wav2vec2",
    num_workers: int = 1,
    use_gpu: bool = False,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_failures: int = 0,
    log_dir: str | os.PathLike | None = None,
) -> FoldResult:
    """Train and score one outer fold with a ``TorchTrainer``; outputs under ``out_dir``.

    ``out_dir/fold_<k>/``: ``model/`` (best-epoch HF checkpoint), ``predictions.csv``,
    ``result.json``; Ray's run folder (checkpoints) under ``out_dir/ray/``; TensorBoard
    under ``log_dir`` (default ``out_dir/tensorboard/fold_<k>``). Re-running with the same
    ``out_dir`` resumes from the latest checkpoint. With ``use_feature_cache`` the frozen
    part's outputs come from (or go to) ``cache_dir`` (default: next to ``features_dir``).
    """
    cfg = train_config or TrainConfig()
    out = Path(out_dir).resolve()
    fold_dir = out / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    test_actors, _, val_actors = fold_split(fold, scheme, cfg.n_val_actors)
    config: dict[str, Any] = {
        **cfg.to_dict(),
        "fold": fold,
        "scheme": scheme,
        "input_kind": "waveform",
        "log_dir": str(log_dir or out / "tensorboard" / f"fold_{fold}"),
    }
    config["source"] = str(Path(features_dir).resolve())
    if cfg.use_feature_cache:
        from ser_ray.feature_cache import build_feature_cache

        cache = build_feature_cache(
            features_dir,
            cache_root=cache_dir or Path(features_dir).resolve().parent / "feature_cache",
            train_config=cfg,
        )
        config.update(source=str(cache.path), input_kind=cache.kind, feature_cache_key=cache.key)
    trainer = build_trainer(
        config,
        num_workers=num_workers,
        use_gpu=use_gpu,
        storage_path=out / "ray",
        name=f"fold_{fold}",
        max_failures=max_failures,
    )
    result = trainer.fit()  # RAY
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"fold {fold}: the run left no checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        if (fold_dir / "model").exists():
            shutil.rmtree(fold_dir / "model")
        shutil.copytree(ckpt / BEST_MODEL_DIR, fold_dir / "model")
        for name in (PREDICTIONS_FILE, "result.json"):
            if (ckpt / name).exists():
                shutil.copy2(ckpt / name, fold_dir / name)
    summary = json.loads((fold_dir / "result.json").read_text())
    predictions = pd.read_csv(fold_dir / PREDICTIONS_FILE)
    metrics = summary["metrics"]
    return FoldResult(
        fold=fold,
        scheme=scheme,
        test_actors=test_actors,
        val_actors=val_actors,
        n_test=len(predictions),
        metrics=metrics,
        best_epoch=int(metrics["best_epoch"]),
        history=summary["history"],
        predictions=predictions,
        model_dir=fold_dir / "model",
        run_dir=fold_dir,
    )
