"""Benchmark `scale`: how each stage's time and memory grow with the corpus, side by side.

A new user with a large corpus runs the same stages as on RAVDESS; this measures them at 2-4
sizes of synthetic clip manifests (:mod:`benchmarks.scale_corpus`; default 1,440 / 5,760 /
23,040 clips, 24 / 96 / 384 speakers, 8 emotions, 16 kHz, 3-5 s; cached under ``--work``) or on
a given ``--manifest``:

- featurizing: ``jobs/prepare.py --no-egemaps`` as a whole process (Ray's start included),
  its process tree's peak memory sampled;
- each SVM variant (default ``svm`` and ``svm+spknorm``): the nested cross-validation of the
  study (:func:`ser_ray.sweeps.svm.run_nested_svm`) over 6 speaker-k-fold folds with the
  study's default solver choice (``--svm-solver``), in this process on a local Ray instance
  started after featurizing, with this process tree's peak memory (PSS: Ray's object store
  and shared libraries counted once).

For every stage: seconds, clips/s, and the growth exponent between consecutive sizes,
``log(t2 / t1) / log(n2 / n1)`` (1: linear; the exact SVC's is ~1.8). Figures in
docs/benchmarks.md.

``python jobs/benchmark.py scale [--sizes 1440 5760 23040] [--manifest clips.csv]
[--work DIR] [--variants svm,svm+spknorm] [--svm-solver auto] [--smoke-test]``
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.preprocess import run_tree
from benchmarks.process_tree import TreePeak
from benchmarks.scale_corpus import write_scale_corpus
from ser_ray.common import storage

SIZES = (1440, 5760, 23040)
CLIPS_PER_SPEAKER = 60
SMOKE_SIZES = (96, 192)  # 12 and 24 speakers of 8 short clips
SMOKE_CLIPS_PER_SPEAKER = 8
PREPARE = str(Path(__file__).resolve().parents[1] / "jobs" / "prepare.py")


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    """The scale benchmark's own flags (the caller adds --out, --smoke-test, --address, ...)."""
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES),
        help=f"corpus sizes in clips, {CLIPS_PER_SPEAKER} per speaker (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--manifest", help="measure this clip manifest instead of --sizes")
    parser.add_argument(
        "--work",
        default=None,
        help="where the synthetic corpora are cached (default: $SER_RAY_CACHE/scale_corpora)",
    )
    parser.add_argument("--variants", default="svm,svm+spknorm", help="SVM variants timed")
    parser.add_argument("--num-folds", type=int, default=6, help="speaker folds")
    parser.add_argument(
        "--svm-solver", default="auto", choices=["auto", "exact", "approx"],
        help="solver of every SVM variant (default: %(default)s, as the study)",
    )  # fmt: skip


def _corpora(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(clips, manifest) of each corpus measured, smallest first."""
    if args.manifest:
        import pandas as pd

        return [(len(pd.read_csv(args.manifest)), str(args.manifest))]
    smoke = bool(getattr(args, "smoke_test", False))
    sizes = SMOKE_SIZES if smoke else sorted(args.sizes)
    per_speaker = SMOKE_CLIPS_PER_SPEAKER if smoke else CLIPS_PER_SPEAKER
    work = Path(args.work) if args.work else storage.node_cache_dir() / "scale_corpora"
    corpora = []
    for n in sizes:
        folder = work / (f"clips{n}_per{per_speaker}" + ("_short" if smoke else ""))
        scale = 0.5 if smoke else 1.0
        manifest = write_scale_corpus(folder, n // per_speaker, per_speaker, scale)
        corpora.append((n // per_speaker * per_speaker, str(manifest)))
    return corpora


def _featurize(manifest: str, out: Path, smoke: bool) -> dict[str, float]:
    """``jobs/prepare.py --no-egemaps`` on ``manifest`` from scratch: seconds, peak GB. The
    smoke test's tiny corpora are featurized without Ray (its start-up would be the figure)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, PREPARE, "--data-dir", manifest, "--no-egemaps", "--out", str(out)]
    if smoke:
        command += ["--runner", "in-process"]
    seconds, _, pss = run_tree(command)
    return {"seconds": seconds, "peak_gb": pss / 1e9}


def _svm_stages(
    manifest: str, features_dir: str, out: Path, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Every SVM variant's nested CV on the features: seconds, peak GB, solver, mean UA."""
    from ser_ray.corpus.protocol import ProtocolSettings, check_protocol, resolve_protocol
    from ser_ray.corpus.sources import read_corpus
    from ser_ray.features.featurize import load_features
    from ser_ray.models import svm
    from ser_ray.study.variants import parse_variants
    from ser_ray.sweeps.svm import NestedSvmConfig, run_nested_svm

    settings = ProtocolSettings(folds="speaker-kfold", num_folds=args.num_folds)
    protocol = resolve_protocol(read_corpus(manifest), settings)
    variants = parse_variants(args.variants)
    columns = sorted({c for v in variants for c in svm.FEATURE_SETS[v.feature_set]})
    df = load_features(features_dir, ["path", "actor", "emotion", *columns])
    check_protocol(protocol, df)
    stages = {}
    for v in variants:
        cfg = NestedSvmConfig(
            smoke_test=bool(getattr(args, "smoke_test", False)), feature_set=v.feature_set,
            speaker_normalise=v.speaker_norm, variant=v.name, solver=args.svm_solver,
        )  # fmt: skip
        with TreePeak(os.getpid(), interval_s=1.0) as peak:
            start = time.perf_counter()
            result = run_nested_svm(df, cfg, protocol, storage_path=str(out / "tune"))
            seconds = time.perf_counter() - start
        uar = [fold[v.name]["uar"] for fold in result.folds]
        stages[v.name] = {
            "seconds": seconds, "peak_gb": peak.pss / 1e9, "solver": result.config["solver"],
            "mean_uar": sum(uar) / len(uar),
        }  # fmt: skip
    return stages


def run_scale_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Featurize every corpus (no Ray in this process yet), then time the SVM variants on
    each (a local Ray instance, or ``--address``); the figures per size and the growth
    exponents."""
    from ser_ray import cli

    out = Path(getattr(args, "out", None) or "runs/benchmark") / "scale"
    smoke = bool(getattr(args, "smoke_test", False))
    corpora = _corpora(args)
    rows = []
    for n, manifest in corpora:
        featurizing = _featurize(manifest, out / f"prepared_{n}", smoke)
        rows.append({"clips": n, "manifest": manifest, "featurize": featurizing})
    cli.init_ray(getattr(args, "address", None), getattr(args, "num_cpus", None))
    for row in rows:
        features_dir = str(out / f"prepared_{row['clips']}" / "features")
        row.update(_svm_stages(row["manifest"], features_dir, out / f"svm_{row['clips']}", args))
    stages = ["featurize", *(name.strip() for name in args.variants.split(","))]
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "stages": stages,
        "rows": rows,
        "growth": growth_exponents(rows, stages),
    }


def growth_exponents(rows: list[dict[str, Any]], stages: list[str]) -> list[dict[str, float]]:
    """Per pair of consecutive sizes, each stage's ``log(t2 / t1) / log(n2 / n1)``.

    >>> rows = [{"clips": 100, "a": {"seconds": 2.0}}, {"clips": 400, "a": {"seconds": 32.0}}]
    >>> growth_exponents(rows, ["a"])
    [{'from': 100, 'to': 400, 'a': 2.0}]
    """
    pairs = []
    for small, large in zip(rows, rows[1:], strict=False):
        ratio = math.log(large["clips"] / small["clips"])
        pair = {"from": small["clips"], "to": large["clips"]}
        for stage in stages:
            pair[stage] = math.log(large[stage]["seconds"] / small[stage]["seconds"]) / ratio
        pairs.append(pair)
    return pairs


def format_scale_benchmark(r: dict[str, Any]) -> str:
    """One row per size: each stage's seconds, clips/s and growth exponent from the size
    before, and its peak memory; the SVM variants' solver and mean UA."""
    stages = r["stages"]
    head = ["clips"]
    for stage in stages:
        head += [f"{stage} s", f"{stage} clips/s", f"{stage} exp", f"{stage} peak GB"]
    head += [f"{s} solver, UA" for s in stages[1:]]
    lines = [
        f"Scale benchmark on {r['cpus']} CPUs (exp: growth exponent from the size above, "
        "log(t2/t1)/log(n2/n1); 1 = linear)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    exponents = {pair["to"]: pair for pair in r["growth"]}
    for row in r["rows"]:
        cells = [f"{row['clips']:,}"]
        for stage in stages:
            seconds = row[stage]["seconds"]
            exponent = exponents.get(row["clips"], {}).get(stage)
            cells += [
                f"{seconds:.1f}", f"{row['clips'] / seconds:.0f}",
                "" if exponent is None else f"{exponent:.2f}", f"{row[stage]['peak_gb']:.2f}",
            ]  # fmt: skip
        cells += [f"{row[s]['solver']}, {100 * row[s]['mean_uar']:.1f}" for s in stages[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
