"""Benchmark: our training loop against Hugging Face ``Trainer``, and with vs without the
frozen-CNN feature cache.

Same model (same init), same batch size, same clips (the training speakers of one outer fold,
waveforms already normalised the same way), same AdamW, no gradient clipping, no
evaluation; both group batches by length. Figures are training clips per second over
whole epochs (after one warm-up epoch each), measured in one process one after the other.

Run it as ``python jobs/benchmark.py train [--features DIR] [--smoke-test]``.
The HF ``Trainer`` needs ``accelerate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ser_ray import cli
from ser_ray.corpus import ravdess
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.distributed import console, prepare
from ser_ray.features import featurize
from ser_ray.models.ssl import frozen_encoder_outputs
from ser_ray.training.clip_data import ClipArrays, table_from_arrow
from ser_ray.training.config import TrainConfig, build_model
from ser_ray.training.finetune import run_training

log = logging.getLogger(__name__)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The training benchmark's own flags (the caller adds --out, --smoke-test, …)."""
    parser.add_argument(
        "--features",
        default=None,
        help="prepared features folder (default: the demo corpus, prepared into OUT/prepared)",
    )
    parser.add_argument("--fold", type=int, default=1, help="outer fold (default: %(default)s)")
    parser.add_argument(
        "--model", default="demo-random", help="hub id, local folder or 'demo-random'"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop")
    parser.add_argument(
        "--clips", type=int, default=256, help="training clips used (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per loop (best kept)")


def _training_clips(args: argparse.Namespace, fe) -> ClipArrays:
    features_dir = args.features
    if features_dir is None:
        cli.init_ray(getattr(args, "address", None), getattr(args, "num_cpus", None))
        out = Path(args.out or "runs/benchmark") / "prepared"
        features_dir = prepare.prepare_demo(out, smoke_test=args.smoke_test)
    _, fit_speakers, _ = ravdess_protocol().split(args.fold)
    frame = featurize.load_features(features_dir, ["path", "actor", "emotion", "waveform"])
    frame = frame[frame["actor"].isin(fit_speakers)].sort_values("path")
    frame = frame.iloc[np.random.default_rng(0).permutation(len(frame))[: args.clips]]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return table_from_arrow(table, "waveform", ravdess_protocol().label_index(), fe)


def _time_ours(cfg: TrainConfig, table: ClipArrays, repeats: int) -> float:
    """Best clips/s of our loop over ``cfg.epochs`` epochs (plus one warm-up epoch)."""
    best = 0.0
    for _ in range(repeats):
        torch.manual_seed(cfg.seed)
        model, fe = build_model(cfg, ravdess.class_names())
        warm = dataclasses.replace(cfg, epochs=1)
        run_training(warm, model, fe, table, None)
        torch.manual_seed(cfg.seed)
        model, fe = build_model(cfg, ravdess.class_names())
        t0 = time.perf_counter()
        run_training(cfg, model, fe, table, None)
        best = max(best, cfg.epochs * len(table) / (time.perf_counter() - t0))
    return best


class _ClipDataset(torch.utils.data.Dataset):
    def __init__(self, table: ClipArrays):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_values": self.table.inputs[i], "labels": int(self.table.labels[i])}


def _pad_collator(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    from ser_ray.models.ssl import pad_waveforms

    values, _ = pad_waveforms([it["input_values"] for it in items])
    labels = torch.tensor([it["labels"] for it in items], dtype=torch.long)
    return {"input_values": values, "labels": labels}


def _time_hf_trainer(cfg: TrainConfig, table: ClipArrays, repeats: int, out: Path) -> float:
    """Best clips/s of ``transformers.Trainer`` on the same model, batch size and clips."""
    from transformers import Trainer, TrainingArguments

    def run(epochs: int) -> float:
        torch.manual_seed(cfg.seed)
        model, fe = build_model(cfg, ravdess.class_names())
        args = TrainingArguments(
            output_dir=str(out / "hf_trainer"),
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=epochs,
            learning_rate=cfg.lr_encoder,
            weight_decay=cfg.weight_decay,
            optim="adamw_torch",
            max_grad_norm=0.0,  # no clipping, like our default
            lr_scheduler_type="linear",
            train_sampling_strategy="group_by_length",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=cfg.seed,
        )
        trainer = Trainer(
            model=model.model,  # the standard HF class, as a Trainer user runs it
            args=args,
            train_dataset=_ClipDataset(table),
            data_collator=_pad_collator,
            processing_class=fe,  # its input name (input_values) gives the lengths
        )
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0

    best = 0.0
    for _ in range(repeats):
        run(1)  # warm-up
        best = max(best, cfg.epochs * len(table) / run(cfg.epochs))
    return best


def run_train_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Clips/s of our loop vs HF Trainer, and our loop with vs without the feature cache."""
    console.quiet_transformers(errors_only=True)
    epochs = 1 if args.smoke_test else args.epochs
    clips = min(args.clips, 32) if args.smoke_test else args.clips
    repeats = 1 if args.smoke_test else args.repeats
    args.clips = clips
    cfg = TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        epochs=epochs,
        use_feature_cache=False,
        early_stopping_patience=None,
    )
    _, fe = build_model(cfg, ravdess.class_names())
    table = _training_clips(args, fe)
    out = Path(args.out or "runs/benchmark")
    # the cache: per-clip CNN outputs computed once (timed as a one-off cost)
    model, fe = build_model(cfg, ravdess.class_names())
    t0 = time.perf_counter()
    cached_inputs = [frozen_encoder_outputs(model, fe, x, "cnn") for x in table.inputs]
    cache_build_s = time.perf_counter() - t0
    cached = dataclasses.replace(table, kind="cnn", inputs=cached_inputs)
    # interleaved repeats (best of each), so that a busy moment does not favour one loop
    ours = hf = ours_cached = 0.0
    for _ in range(repeats):
        ours = max(ours, _time_ours(cfg, table, 1))
        hf = max(hf, _time_hf_trainer(cfg, table, 1, out))
        ours_cached = max(ours_cached, _time_ours(cfg, cached, 1))
    figures = {
        "model": args.model,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "clips": len(table),
        "batch_size": cfg.batch_size,
        "epochs_timed": epochs,
        "ours_clips_per_s": ours,
        "hf_trainer_clips_per_s": hf,
        "ours_vs_trainer": ours / hf,
        "ours_cached_vs_trainer": ours_cached / hf,
        "ours_cached_clips_per_s": ours_cached,
        "cached_epoch_vs_uncached": ours / ours_cached,  # epoch time ratio (target <= 0.8)
        "cache_build_s": cache_build_s,
        "uncached_epoch_s": len(table) / ours,
        "cached_epoch_s": len(table) / ours_cached,
    }
    return figures
