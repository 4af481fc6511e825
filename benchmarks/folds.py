"""Benchmark `folds`: the six wav2vec2 folds concurrently vs one after another.

Same features, model, settings and feature cache (built once, before the clock starts); the
only difference is how many folds the Tune run trains at once (and so each fold's share of the
CPUs). Both runs must give the same per-fold test metrics: the work is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from ser_ray.distributed import prepare
from ser_ray.distributed.feature_cache import build_feature_cache
from ser_ray.study.kfold import (
    KFoldConfig,
    run_wav2vec2_folds,
    study_train_config,
    train_config_for,
)


def add_folds_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", help="prepared features folder (default: demo corpus)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fold")
    parser.add_argument("--model", default="demo", help="hub id, local folder or 'demo'")


def run_folds_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve() / "folds"
    features_dir = args.features or prepare.prepare_demo(
        out / "prepared", smoke_test=args.smoke_test
    )
    cfg = KFoldConfig(
        variants=("wav2vec2",),
        train=study_train_config(model=args.model, epochs=args.epochs),
        out=str(out),
    )
    train_cfg = train_config_for(cfg)
    train_cfgs = dict.fromkeys(range(1, 7), train_cfg)
    if train_cfg.use_feature_cache:
        build_feature_cache(features_dir, out / "feature_cache", train_config=train_cfg)
    seconds, metrics = {}, {}
    for mode, concurrent in (("concurrent", None), ("sequential", 1)):
        start = time.perf_counter()
        outcomes = run_wav2vec2_folds(
            Path(features_dir),
            dataclasses.replace(cfg, concurrent_folds=concurrent),
            train_cfgs,
            out,
            storage=str(out / f"ray_{mode}"),
        )
        seconds[mode] = time.perf_counter() - start
        metrics[mode] = {o.fold: o.metrics["test/uar"] for o in outcomes}
    return {
        "benchmark": "folds",
        "folds": len(metrics["concurrent"]),
        "epochs_per_fold": args.epochs,
        "concurrent_s": seconds["concurrent"],
        "sequential_s": seconds["sequential"],
        "concurrent_vs_sequential": seconds["concurrent"] / seconds["sequential"],
        "same_test_uar_per_fold": metrics["concurrent"] == metrics["sequential"],
    }
