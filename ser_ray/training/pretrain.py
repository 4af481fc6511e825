"""Self-supervised wav2vec 2.0 pre-training (contrastive + diversity loss): the loop, no Ray.

The objective is Hugging Face's ``Wav2Vec2ForPreTraining`` (Baevski et al. 2020): spans of
the CNN's output frames are masked (:func:`mask_and_negatives`: ``mask_prob`` 0.65, span 10),
the transformer predicts each masked frame's quantized CNN output among ``num_negatives``
distractors drawn from the other masked frames of the same clip (contrastive loss), and a
diversity loss keeps the codebook in use; the quantizer's Gumbel-softmax temperature is
annealed from 2 to 0.5 (:func:`ser_ray.training.schedule.gumbel_temperature`). Losses are summed
over masked frames by the model and divided here by the number of masked frames of the step.

Read top to bottom: :class:`PretrainConfig`; :func:`build_pretraining_model`
(from scratch from a config, or continued from a checkpoint: TAPT), :func:`crop_batch` (random
crops, all to the shortest clip of the batch, so no padding), :func:`epoch_batches` (an
epoch's micro-batches, window by window), :func:`pretrain_one_epoch` (one pass of optimizer
steps on :class:`ser_ray.training.engine.Engine`: Gumbel temperature, crops and masks, losses
per masked frame), :func:`record_epoch` (history and log line), :func:`run_pretraining` (epochs,
TensorBoard, checkpoints and exact resume). The Ray edge (the pool streamed in through Ray Data,
a ``TorchTrainer`` per run) is :mod:`ser_ray.distributed.pretrain_trainer`.

The result is a standard HF checkpoint (``Wav2Vec2ForPreTraining`` safetensors + config +
feature extractor) in ``<out>/model``; every job's ``--model`` loads it (the classifier takes
the ``wav2vec2.*`` encoder weights and drops the quantizer and projections).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    _compute_mask_indices,
    _sample_negative_indices,
)

from ser_ray.common import storage
from ser_ray.features.unlabeled import UnlabeledClips
from ser_ray.models.ssl import (
    DEMO_ENCODER_SEED,
    RANDOM_DEMO_MODEL,
    check_resolved,
    demo_config,
    demo_feature_extractor,
    prepare_waveform,
)
from ser_ray.training import engine as eng
from ser_ray.training import settings
from ser_ray.training.clip_data import Clips, batches_per_epoch, window_batches
from ser_ray.training.schedule import gumbel_temperature

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # the HF checkpoint (latest weights)
CLIPS_FILE = "clips.csv"  # the clips the run trained on (one path a line)
RESULT_FILE = "result.json"
#: The quantizer of the demo-size config: 2 groups of 64 codevectors (base: 2 x 320).
DEMO_QUANTIZER = {
    "num_codevector_groups": 2,
    "num_codevectors_per_group": 64,
    "codevector_dim": 64,
    "proj_codevector_dim": 64,
}


# ----------------------------------------------------------------------------------------
# 1. Settings
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class PretrainConfig(settings.LoopSettings):
    """Settings of one pre-training run. Defaults: the demo encoder's recipe.

    Weight decay, schedule, batches and runtime fields are the shared ones of
    :mod:`ser_ray.training.settings` (flat, as in ``TrainConfig``).
    """

    model: str = dataclasses.field(
        default=RANDOM_DEMO_MODEL,
        metadata={
            "help": "'demo-random' (demo-size config from scratch), a config.json (from "
            "scratch), or a checkpoint folder / hub id to continue (TAPT)"
        },
    )
    # objective
    mask_prob: float = dataclasses.field(
        default=0.65, metadata={"help": "share of frames that start a masked span"}
    )
    mask_length: int = dataclasses.field(default=10, metadata={"help": "frames per span"})
    num_negatives: int = dataclasses.field(
        default=50, metadata={"help": "distractors per masked frame (same clip)"}
    )
    diversity_loss_weight: float = dataclasses.field(
        default=0.1, metadata={"help": "weight of the codebook diversity loss"}
    )
    max_gumbel_temperature: float = dataclasses.field(default=2.0, metadata={"help": "at step 0"})
    min_gumbel_temperature: float = dataclasses.field(
        default=0.5, metadata={"help": "at the last step"}
    )
    freeze_feature_encoder: bool = dataclasses.field(
        default=False, metadata={"help": "keep the CNN fixed (TAPT: the folds share its cache)"}
    )
    # optimizer (AdamW) and schedule (the rest: ser_ray.training.settings, shared defaults)
    lr: float = dataclasses.field(
        default=1e-3, metadata={"help": "peak learning rate of the encoder"}
    )
    betas: tuple[float, float] = settings.default(
        settings.OptimizerSettings, "betas", (0.9, 0.98), help="AdamW betas (wav2vec 2.0)"
    )
    eps: float = settings.default(settings.OptimizerSettings, "eps", 1e-6)
    grad_clip_norm: float | None = settings.default(
        settings.OptimizerSettings, "grad_clip_norm", 1.0
    )
    # data
    crop_s: float = dataclasses.field(
        default=2.0, metadata={"help": "longest random crop; a batch crops to its shortest clip"}
    )
    window_clips: int = settings.default(
        settings.BatchSettings,
        "window_clips",
        2048,
        help="clips a Ray Train worker holds at once while it streams the pool (batches "
        "are length-grouped and shuffled within a window); at least the pool's size (demo "
        "pool: 320, a RAVDESS fold's training actors: 1200) gives the same batches as "
        "holding the whole pool",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mask_prob < 1 or self.mask_length < 1 or self.num_negatives < 1:
            raise ValueError("need 0 < mask_prob < 1, mask_length >= 1, num_negatives >= 1")


# ----------------------------------------------------------------------------------------
# 2. Ray-free pieces
# ----------------------------------------------------------------------------------------
def build_pretraining_model(
    cfg: PretrainConfig,
) -> tuple[Wav2Vec2ForPreTraining, Wav2Vec2FeatureExtractor]:
    """The model to pre-train and its feature extractor.

    ``demo-random``: the demo-size config (:func:`ser_ray.models.ssl.demo_config`) with a
    2 x 64 quantizer, initialised with the demo encoder's seed; a ``config.json`` file: that
    config from scratch (demo feature extractor settings); else ``from_pretrained`` (TAPT;
    ``demo``, the pre-trained demo encoder, must be resolved to its folder first).
    """
    objective = {"diversity_loss_weight": cfg.diversity_loss_weight}
    name = str(cfg.model)
    check_resolved(name)
    if name == RANDOM_DEMO_MODEL or name.endswith(".json"):
        if name == RANDOM_DEMO_MODEL:
            config = demo_config(**DEMO_QUANTIZER, **objective)
        else:
            config = Wav2Vec2Config.from_json_file(name)
            config.update(objective)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_ENCODER_SEED)
            model = Wav2Vec2ForPreTraining(config)
        fe = demo_feature_extractor()
    else:
        name = storage.node_local(name)  # a model published to the run location: this node's copy
        config = Wav2Vec2Config.from_pretrained(name)
        config.update(objective)
        model = Wav2Vec2ForPreTraining.from_pretrained(name, config=config)
        fe = Wav2Vec2FeatureExtractor.from_pretrained(name)
        if "Wav2Vec2ForPreTraining" not in (config.architectures or []):
            log.warning("%s has no pre-training head: its quantizer starts from random", name)
    model.config.architectures = ["Wav2Vec2ForPreTraining"]
    if cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model, fe


def crop_batch(
    waveforms: list[np.ndarray], max_samples: int, rng: np.random.Generator
) -> torch.Tensor:
    """(B, S) random crops of the clips, S = min(max_samples, shortest clip): no padding,
    so a group-norm CNN sees every clip exactly as it is."""
    length = min(max_samples, min(len(w) for w in waveforms))
    crops = []
    for w in waveforms:
        start = int(rng.integers(0, len(w) - length + 1))
        crops.append(w[start : start + length])
    return torch.from_numpy(np.stack(crops))


def mask_and_negatives(
    model: Wav2Vec2ForPreTraining, batch_size: int, num_samples: int, cfg: PretrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's span masks (B, T) and negative indices (B, T, K) for unpadded clips; drawn from
    NumPy's global RNG (saved and restored with every checkpoint)."""
    frames = int(model._get_feat_extract_output_lengths(num_samples))
    if frames < 2 * cfg.mask_length:
        raise ValueError(
            f"crops of {num_samples} samples give {frames} frames, fewer than two mask spans "
            f"of {cfg.mask_length}; use longer clips or crop_s, or a shorter mask_length"
        )
    mask = _compute_mask_indices((batch_size, frames), cfg.mask_prob, cfg.mask_length, min_masks=2)
    negatives = _sample_negative_indices((batch_size, frames), cfg.num_negatives, mask)
    return torch.from_numpy(mask), torch.from_numpy(negatives.astype(np.int64))


def epoch_batches(
    clips: Clips[UnlabeledClips],
    cfg: PretrainConfig,
    feature_extractor: Wav2Vec2FeatureExtractor,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[list[np.ndarray]]:
    """This rank's micro-batches of ``epoch``, window by window: prepared waveforms of
    similar lengths (:func:`ser_ray.training.clip_data.window_batches`)."""

    def prepared(window: UnlabeledClips, indices: list[int]) -> list[np.ndarray]:
        return [prepare_waveform(window.waveforms[i], feature_extractor) for i in indices]

    return window_batches(
        clips, prepared, cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank,
        world_size=world_size,
    )  # fmt: skip


def _pretraining_loss(model: torch.nn.Module, batch: dict[str, Any]):
    out = model(
        batch["input_values"],
        mask_time_indices=batch["mask_time_indices"],
        sampled_negative_indices=batch["sampled_negative_indices"],
    )
    n = batch["num_masked"]
    values = {
        "pretrain/loss": out.loss.item() / n,
        "pretrain/contrastive": out.contrastive_loss.item() / n,
        "pretrain/diversity": out.diversity_loss.item() / n,
        "pretrain/codevector_perplexity": out.codevector_perplexity.item(),
    }
    return out.loss / batch["group_masked"], values


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms, codevectors."""
    return eng.build_adamw(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        no_decay=lambda name, p: eng.no_weight_decay(name, p) or "codevectors" in name,
    )


def save_pretrained_model(
    model: Wav2Vec2ForPreTraining, fe: Wav2Vec2FeatureExtractor, out_dir: str | os.PathLike
) -> Path:
    """An HF checkpoint: safetensors weights, config, feature extractor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eng.unwrap(model).save_pretrained(out, safe_serialization=True)
    fe.save_pretrained(out)
    return out


def set_gumbel_temperature(
    model: Wav2Vec2ForPreTraining, step: int, total_steps: int, cfg: PretrainConfig
) -> float:
    """Anneal the quantizer's Gumbel-softmax temperature to its value at ``step``; returns it
    (:func:`ser_ray.training.schedule.gumbel_temperature`)."""
    temperature = gumbel_temperature(
        step, total_steps, cfg.max_gumbel_temperature, cfg.min_gumbel_temperature
    )
    model.set_gumbel_temperature(temperature)
    return temperature


def masked_micro_batches(
    model: Wav2Vec2ForPreTraining,
    micro_batches: list[list[np.ndarray]],
    cfg: PretrainConfig,
    *,
    max_samples: int,
    rng: np.random.Generator,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One optimizer step's micro-batches as model inputs: random crops (:func:`crop_batch`),
    span masks and negatives (:func:`mask_and_negatives`), and the masked-frame counts the
    loss is divided by (the micro-batch's own and the whole group's)."""
    group = []
    for waveforms in micro_batches:
        values = crop_batch(waveforms, max_samples, rng)
        mask, negatives = mask_and_negatives(model, *values.shape, cfg)
        group.append(
            {
                "input_values": values.to(device),
                "mask_time_indices": mask.to(device),
                "sampled_negative_indices": negatives.to(device),
                "num_masked": max(int(mask.sum()), 1),
            }
        )
    group_masked = sum(b["num_masked"] for b in group)
    for b in group:
        b["group_masked"] = group_masked
    return group


def step_values(group: list[dict[str, Any]], logs: list[dict[str, float]]) -> dict[str, float]:
    """The step's logged values: its micro-batches' values weighted by their masked frames."""
    shares = [b["num_masked"] / b["group_masked"] for b in group]
    return {
        k: sum(share * values[k] for share, values in zip(shares, logs, strict=True))
        for k in logs[0]
    }


def pretrain_one_epoch(
    engine: eng.Engine,
    batches: Iterable[list[np.ndarray]],
    cfg: PretrainConfig,
    *,
    epoch: int,
    step: int,
    max_samples: int,
    rng: np.random.Generator,
    world_size: int = 1,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[int, dict[str, float]]:
    """One pass over ``batches`` (this rank's micro-batches, e.g. by :func:`epoch_batches`);
    returns (steps done so far, {pretrain/loss, ...: mean per step, clips/s, seconds}).

    Each optimizer step: the Gumbel temperature of the step, ``cfg.grad_accum_steps``
    micro-batches cropped (with ``rng``) and masked, one :meth:`Engine.step`;
    ``on_step(step, values)`` after it.
    """
    model = engine.model
    model.train()
    sums: dict[str, float] = {}
    n_steps, n_clips, t0 = 0, 0, time.perf_counter()
    batches = iter(batches)
    while micro_batches := list(itertools.islice(batches, cfg.grad_accum_steps)):
        temperature = set_gumbel_temperature(model, step, engine.total_steps, cfg)
        group = masked_micro_batches(
            model, micro_batches, cfg, max_samples=max_samples, rng=rng, device=engine.device
        )
        lr = engine.learning_rates()["decay"]
        logs = engine.step(group, _pretraining_loss, where=f"at epoch {epoch + 1}, step {step + 1}")
        step += 1
        values = step_values(group, logs)
        values.update({"pretrain/lr": lr, "pretrain/gumbel_temperature": temperature})
        if on_step is not None:
            on_step(step, values)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += 1
        n_clips += sum(len(waveforms) for waveforms in micro_batches)
    seconds = time.perf_counter() - t0
    return step, {
        **{k: v / max(n_steps, 1) for k, v in sums.items()},
        "pretrain/clips_per_s": n_clips * world_size / seconds if seconds > 0 else 0.0,
        "pretrain/epoch_s": seconds,
    }


def record_epoch(
    progress: dict[str, Any], epoch: int, cfg: PretrainConfig, epoch_metrics: dict[str, float]
) -> dict[str, float]:
    """Count ``epoch`` (0-based) as done in ``progress``: its metrics (with epoch and step)
    in the history and the log. Returns the metrics."""
    metrics = {"epoch": epoch + 1, "step": progress["step"], **epoch_metrics}
    progress["epoch"] = epoch + 1
    progress["history"].append(metrics)
    log.debug(  # the job's progress line says it (ser_ray.distributed.console)
        "pre-training epoch %d/%d: loss %.4f, perplexity %.1f, %.1f clips/s",
        epoch + 1,
        cfg.epochs,
        metrics["pretrain/loss"],
        metrics["pretrain/codevector_perplexity"],
        metrics["pretrain/clips_per_s"],
    )
    return metrics


def write_pretraining_checkpoint(
    out_dir: Path,
    progress: dict[str, Any],
    *,
    model: Wav2Vec2ForPreTraining,
    feature_extractor: Wav2Vec2FeatureExtractor,
    engine: eng.Engine,
    cfg: PretrainConfig,
) -> Path:
    """The run's state in ``out_dir``: the HF model, the train state (optimizer, schedule,
    RNGs, ``progress``) and the result (history, settings)."""
    save_pretrained_model(model, feature_extractor, out_dir / MODEL_DIR)
    eng.write_train_state(out_dir, engine, progress)
    (out_dir / RESULT_FILE).write_text(
        json.dumps({"history": progress["history"], "config": cfg.to_dict()}, indent=2)
    )
    return out_dir


@dataclasses.dataclass
class PretrainOutcome:
    history: list[dict[str, float]]
    step: int
    #: writes the final state (HF model, train state, result) into a folder
    write_checkpoint: Callable[[Path], Path]


def run_pretraining(
    cfg: PretrainConfig,
    model: Wav2Vec2ForPreTraining,
    feature_extractor: Wav2Vec2FeatureExtractor,
    clips: Clips[UnlabeledClips],
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    resume_from: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict[str, float], Callable[[Path], Path]], None] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> PretrainOutcome:
    """Pre-train ``model`` on ``clips`` (held whole or streamed window by window) for
    ``cfg.epochs``; resume exactly from a checkpoint.

    ``on_epoch_end(metrics, write_checkpoint)`` runs after every epoch on every rank.
    """
    if not len(clips):
        raise ValueError("no clips to pre-train on")
    device = torch.device(device)
    max_samples = int(round(cfg.crop_s * feature_extractor.sampling_rate))
    model.to(device)
    wrapped = wrap_model(model) if wrap_model is not None else model

    num_batches = batches_per_epoch(clips, cfg.batch_size, world_size=world_size)
    total_steps = eng.steps_per_epoch(num_batches, cfg.grad_accum_steps) * cfg.epochs
    engine = eng.build_engine(
        model, build_optimizer(model, cfg), cfg, total_steps=total_steps, device=device,
        wrapped=wrapped,
    )  # fmt: skip
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    if resume_from is not None:
        eng.load_weights(model, Path(resume_from) / MODEL_DIR)
        progress = eng.load_train_state(resume_from, engine)
        log.info("pre-training resumed at epoch %d, step %d", progress["epoch"], progress["step"])
    scalars = eng.ScalarLog(log_dir, rank, resume_step=progress["step"])
    write_checkpoint = functools.partial(
        write_pretraining_checkpoint, model=model, feature_extractor=feature_extractor,
        engine=engine, cfg=cfg,
    )  # fmt: skip

    try:
        for epoch in range(progress["epoch"], cfg.epochs):
            progress["step"], epoch_metrics = pretrain_one_epoch(
                engine,
                epoch_batches(clips, cfg, feature_extractor, epoch, rank, world_size),
                cfg,
                epoch=epoch,
                step=progress["step"],
                max_samples=max_samples,
                rng=np.random.default_rng([cfg.seed, epoch, rank]),  # crops
                world_size=world_size,
                on_step=lambda step, values: scalars.add(values, step),
            )
            metrics = record_epoch(progress, epoch, cfg, epoch_metrics)
            scalars.flush()
            if on_epoch_end is not None:
                snapshot = copy.deepcopy(progress)
                on_epoch_end(metrics, lambda out, p=snapshot: write_checkpoint(out, p))
    finally:
        scalars.close()
    return PretrainOutcome(
        history=progress["history"],
        step=progress["step"],
        write_checkpoint=lambda out: write_checkpoint(out, progress),
    )
