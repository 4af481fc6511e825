"""Benchmark `folds`: the resource plan's choice vs six folds at once vs one after another.

Same features, model, settings and feature cache (built once, before the clock starts); the
only difference is how many folds the Tune run trains at once and each worker's CPUs:
``plan`` (:func:`ser_ray.distributed.resources.plan_folds`, the job's default), ``six`` (all
folds at once sharing the CPUs, the default before the plan: one CPU kept free, the rest split)
and ``sequential`` (one fold at a time on whole CPUs). All must give the same per-fold test
metrics wherever the workers' torch threads are the same: the work is the same. Each mode's
peak memory (PSS summed over the driver's process tree, which holds the local Ray instance)
and most ``ray::`` processes alive at once are sampled every two seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import ray

from benchmarks.process_tree import TreePeak
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.distributed import prepare
from ser_ray.distributed.demo_encoder import resolve_model
from ser_ray.distributed.feature_cache import build_feature_cache
from ser_ray.distributed.resources import plan_folds
from ser_ray.distributed.ssl_folds import run_ssl_folds
from ser_ray.features.featurize import FeatureConfig
from ser_ray.study.config import KFoldConfig, study_train_config
from ser_ray.study.params import train_config_for


def add_folds_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", help="prepared features folder (default: demo corpus)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fold")
    parser.add_argument("--model", default="demo", help="hub id, local folder or 'demo'")


def run_folds_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve() / "folds"
    features_dir = args.features or prepare.prepare_demo(
        out / "prepared", smoke_test=args.smoke_test, config=FeatureConfig(egemaps=False)
    )
    model = resolve_model(args.model, args.smoke_test)  # "demo": built once, then cached
    cfg = KFoldConfig(
        variants=("wav2vec2",),
        train=study_train_config(model=model, epochs=args.epochs),
        out=str(out),
    )
    train_cfg = train_config_for(cfg)
    train_cfgs = dict.fromkeys(range(1, 7), train_cfg)
    if train_cfg.use_feature_cache:
        build_feature_cache(features_dir, out / "feature_cache", train_config=train_cfg)
    seconds, metrics, peaks = {}, {}, {}
    n_cpus = ray.cluster_resources().get("CPU", 1)
    six_share = max(0.05, int(100 * max(n_cpus - 1, n_cpus / 2) / 6) / 100)
    modes = {
        "plan": {},
        "six": {"concurrent_folds": 6, "cpus_per_worker": six_share},
        "sequential": {"concurrent_folds": 1},
    }
    for mode, changes in modes.items():
        start = time.perf_counter()
        with TreePeak(os.getpid(), interval_s=2.0) as peaks[mode]:
            outcomes = run_ssl_folds(
                "wav2vec2",
                features_dir,
                dataclasses.replace(cfg, **changes),
                ravdess_protocol(),
                train_cfgs,
                str(out),
                str(out / f"ray_{mode}"),
            )
            seconds[mode] = time.perf_counter() - start
        metrics[mode] = {o.fold: o.metrics["test/uar"] for o in outcomes}
    plan = plan_folds(cfg, 6)
    return {
        "benchmark": "folds",
        "folds": len(metrics["plan"]),
        "epochs_per_fold": args.epochs,
        "plan": plan.line(),
        "plan_s": seconds["plan"],
        "six_at_once_s": seconds["six"],
        "sequential_s": seconds["sequential"],
        **{f"{mode}_peak_pss_gb": peak.pss / 2**30 for mode, peak in peaks.items()},
        **{f"{mode}_peak_ray_processes": peak.ray_workers for mode, peak in peaks.items()},
        "plan_vs_six_at_once": seconds["plan"] / seconds["six"],
        "plan_vs_sequential": seconds["plan"] / seconds["sequential"],
        "same_test_uar_per_fold": metrics["plan"] == metrics["six"] == metrics["sequential"],
    }
