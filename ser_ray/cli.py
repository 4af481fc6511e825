"""What every job shares: common flags, logging, connecting to Ray, saving the config."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ser_ray.distributed import console
from ser_ray.study.variants import Variant


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--out", default=default_out, help="output folder of this run (default: %(default)s)"
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny and fast: small demo corpus, few steps (for CI)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS as set by `ray job submit`, "
        "else start a local Ray instance)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for a local Ray instance (default: all cores)",
    )
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray's dashboard with a local Ray instance (about 1 GB of memory and a few "
        "seconds of start-up; a cluster joined with --address keeps its own)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's own progress (Tune trial tables, Ray Data and Ray Train lines)",
    )


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` or ``--features`` (neither: the demo corpus); see features_for_job."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-dir",
        help="RAVDESS-layout folder: prepare its features into OUT/prepared first. "
        "Default (neither flag): the embedded demo corpus",
    )
    source.add_argument(
        "--features", help="a prepared features folder (the Parquet dataset of jobs/prepare.py)"
    )


def add_svm_feature_args(parser: argparse.ArgumentParser) -> None:
    """``--svm-features`` and ``--speaker-norm``: what the SVM is trained on."""
    parser.add_argument(
        "--svm-features",
        choices=["mfcc", "egemaps", "mfcc+egemaps"],
        default="mfcc",
        help="SVM input: 80 MFCC statistics, 88 eGeMAPSv02 functionals (openSMILE), or both "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--speaker-norm",
        action="store_true",
        help="z-normalise each clip's features over its own actor's clips (unlabelled; "
        "transductive for the test actors, as in Pepino et al. 2021)",
    )


def svm_variant_name(args: argparse.Namespace) -> str:
    """The variant name (``svm``, ``svm+egemaps+spknorm``, …) of the SVM flags."""
    return Variant("svm", feature_set=args.svm_features, speaker_norm=args.speaker_norm).name


def setup_logging(verbose: bool = False) -> None:
    """Our log lines to stderr; how much Ray prints (see :mod:`ser_ray.distributed.console`)."""
    console.configure(verbose)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def init_ray(
    address: str | None = None, num_cpus: int | None = None, dashboard: bool = False
) -> None:
    """Join ``address`` or ``$RAY_ADDRESS``; otherwise start a fresh local instance (never a
    stale cluster named in /tmp/ray), with Ray's dashboard only when ``dashboard``."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console.ray_init_kwargs())
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            **console.ray_init_kwargs(),
        )
    console.quiet_ray_data()
