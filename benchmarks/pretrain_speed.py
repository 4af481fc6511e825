"""Benchmark: our pre-training loop against Hugging Face ``Trainer`` on the same work.

Same model (``Wav2Vec2ForPreTraining``, same init), same clips (the package's unlabeled demo
pool, only clips at least ``--crop-s`` long, so every batch is ``batch_size`` crops of exactly
``crop_s``: both loops do identical work per step), same masks and negatives
(:func:`ser_ray.training.pretrain.mask_and_negatives` in HF's data collator), same AdamW and
gradient clipping. Figures: pre-training clips per second over whole epochs, after one warm-up epoch
each, measured in one process one after the other. ``Trainer`` needs ``accelerate``.

Used by ``jobs/benchmark.py pretrain``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ser_ray.features.unlabeled import UnlabeledClips, read_pool, write_demo_pool
from ser_ray.models.ssl import prepare_waveform
from ser_ray.training.pretrain import (
    PretrainConfig,
    build_pretraining_model,
    crop_batch,
    mask_and_negatives,
    run_pretraining,
)


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    """The pre-training benchmark's own flags (the caller adds --out, --smoke-test, …)."""
    parser.add_argument("--clips", type=int, default=64, help="pool clips used")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-s", type=float, default=2.0, help="crop length, seconds")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per loop")


def _clips(args: argparse.Namespace) -> UnlabeledClips:
    speakers = 4 if args.smoke_test else 16
    pool = write_demo_pool(Path(args.out) / f"pool_{speakers}", speakers, 8)
    clips = read_pool(pool)
    min_samples = int(args.crop_s * 16_000)
    keep = [i for i, w in enumerate(clips.waveforms) if len(w) >= min_samples]
    keep = keep[: 16 if args.smoke_test else args.clips]
    if len(keep) < args.batch_size:
        raise ValueError(f"only {len(keep)} pool clips are at least {args.crop_s} s long")
    return UnlabeledClips([clips.paths[i] for i in keep], [clips.waveforms[i] for i in keep])


def _time_ours(cfg: PretrainConfig, clips: UnlabeledClips) -> float:
    torch.manual_seed(cfg.seed)
    model, fe = build_pretraining_model(cfg)
    run_pretraining(dataclasses.replace(cfg, epochs=1), model, fe, clips)  # warm-up
    torch.manual_seed(cfg.seed)
    model, fe = build_pretraining_model(cfg)
    t0 = time.perf_counter()
    run_pretraining(cfg, model, fe, clips)
    return cfg.epochs * len(clips) / (time.perf_counter() - t0)


def _time_hf_trainer(cfg: PretrainConfig, clips: UnlabeledClips, out: Path) -> float:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(cfg.seed)
    model, fe = build_pretraining_model(cfg)
    prepared = [prepare_waveform(w, fe) for w in clips.waveforms]
    rng = np.random.default_rng(cfg.seed)
    max_samples = int(round(cfg.crop_s * fe.sampling_rate))

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        values = crop_batch([it["waveform"] for it in items], max_samples, rng)
        mask, negatives = mask_and_negatives(model, *values.shape, cfg)
        return {
            "input_values": values,
            "mask_time_indices": mask,
            "sampled_negative_indices": negatives,
        }

    def run(epochs: int) -> float:
        args = TrainingArguments(
            output_dir=str(out / "hf_trainer_pretrain"),
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=epochs,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.betas[0],
            adam_beta2=cfg.betas[1],
            adam_epsilon=cfg.eps,
            max_grad_norm=cfg.grad_clip_norm or 0.0,
            optim="adamw_torch",
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        data = [{"waveform": w} for w in prepared]
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        t0 = time.perf_counter()
        trainer.train()
        return epochs * len(clips) / (time.perf_counter() - t0)

    run(1)  # warm-up
    return run(cfg.epochs)


def run_pretrain_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Clips/s of our loop and of HF ``Trainer`` (one run each) and their ratio."""
    clips = _clips(args)
    cfg = PretrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, crop_s=args.crop_s, amp="off"
    )
    ours = _time_ours(cfg, clips)
    trainer = _time_hf_trainer(cfg, clips, Path(args.out))
    return {
        "clips": len(clips),
        "batch_size": cfg.batch_size,
        "crop_s": cfg.crop_s,
        "epochs": cfg.epochs,
        "ours_clips_per_s": ours,
        "hf_trainer_clips_per_s": trainer,
        "ours_vs_trainer": ours / trainer,
    }
