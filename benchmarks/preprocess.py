"""Benchmark `preprocess`: `jobs/prepare.py` against the plain serial librosa recipe.

Both run as whole processes, as a new user runs them (imports and Ray's start-up included),
on a small corpus (one clip per actor) and on ``--clips`` clips, one after the other in one
run. The start-up figure is ``jobs/prepare.py`` with its default flags on the small corpus
(featurized in-process: too few clips to pay for starting Ray). Ray's own fixed cost is the
small corpus forced onto Ray (``--runner ray``); the difference between it and the large run
is the marginal cost, reported as clips per second:

    marginal clips/s = (clips - small clips) / (seconds(clips) - seconds(small))

Each timed command runs ``--repeats`` times, interleaved, and the fastest run counts.
Memory comes from one more run of each, in which the process tree (Ray's GCS, raylet and
workers included) is sampled for its resident memory; ``--rss-scale K`` also runs the
pipeline on K links to every clip to show whether peak memory stays flat as the corpus grows.
The largest difference between the two sets of MFCC statistics shows the speed is not bought
by doing less.

The serial recipe computes MFCCs only, so the timed pipeline runs are ``--no-egemaps`` (same
work); one more run of the large corpus with the default eGeMAPS functionals (openSMILE)
shows what they cost on top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.process_tree import TreePeak

SMALL_CLIPS = 24  # one clip per actor: the fixed cost

# The recipe the pipeline replaces: librosa.load + librosa.feature.mfcc per file.
SERIAL_RECIPE = """
import json, sys
import librosa, numpy as np
paths = json.load(open(sys.argv[1]))
feats = {}
for path in paths:
    y, sr = librosa.load(path, sr=16_000)
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=40)
    feats[path] = np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]).tolist()
json.dump(feats, open(sys.argv[2], "w"))
"""


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clips", type=int, default=1440, help="clips of the large run (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each timed command, interleaved; the fastest counts (other processes on "
        "the machine only ever add time) (default: %(default)s)",
    )
    parser.add_argument(
        "--rss-scale",
        type=int,
        default=0,
        help="also run the pipeline on this many links to every clip (e.g. 4) to check that "
        "peak memory stays flat (default: off)",
    )


def run_tree(command: list[str], sample_memory: bool = True) -> tuple[float, float, float]:
    """Run ``command``; (wall seconds, peak summed RSS of its process tree in bytes, peak
    summed PSS: shared pages such as libraries and Ray's object store counted once).

    Sampling reads every process's page tables ten times a second, which takes CPU from the
    command (more with more processes, so more from Ray than from a single process): timed
    runs pass ``sample_memory=False`` and get NaN for the memory figures."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not sample_memory:
        _, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{command[:3]} failed:\n{stderr.decode()[-3000:]}")
        return time.perf_counter() - start, float("nan"), float("nan")
    with TreePeak(proc.pid) as peak:
        _, stderr = proc.communicate()
        seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{command[:3]} failed:\n{stderr.decode()[-3000:]}")
    return seconds, peak.rss, peak.pss


def _link_corpus(paths: list[str], folder: Path, copies: int = 1) -> Path:
    """A RAVDESS-layout folder of symlinks to ``paths`` (``copies`` times, one subfolder each)."""
    for copy in range(copies):
        for path in paths:
            link = folder / f"copy{copy}" / Path(path).parent.name / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return folder


def _serial(paths: list[str], result: Path, sample_memory: bool) -> tuple[float, float, float]:
    listing = result.with_suffix(".in.json")
    listing.write_text(json.dumps(paths))
    command = [sys.executable, "-c", SERIAL_RECIPE, str(listing), str(result)]
    return run_tree(command, sample_memory)


def _serial_features(result: Path) -> dict[str, np.ndarray]:
    return {p: np.asarray(v, np.float32) for p, v in json.loads(result.read_text()).items()}


def _pipeline(
    corpus: Path, out: Path, *flags: str, sample_memory: bool = True
) -> tuple[float, float, float]:
    job = Path(__file__).resolve().parents[2] / "jobs" / "prepare.py"
    command = [sys.executable, str(job), "--data-dir", str(corpus), "--out", str(out)]
    return run_tree(command + list(flags), sample_memory)


def _marginal_clips_per_s(n_small: int, s_small: float, n_large: int, s_large: float) -> float:
    """NaN when the large run was not slower than the small one (a machine too busy to
    measure on)."""
    return (n_large - n_small) / (s_large - s_small) if s_large > s_small else float("nan")


def run_preprocess_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from ser_ray.corpus.demo_corpus import demo_corpus_dir, write_demo_corpus
    from ser_ray.corpus.ravdess import build_manifest
    from ser_ray.features.featurize import load_features

    n_actors = 24
    per_actor = max(1, min(60, -(-args.clips // n_actors)))
    corpus = write_demo_corpus(demo_corpus_dir(f"bench{per_actor}"), n_actors, per_actor)
    clips = [c.path for c in build_manifest(str(corpus)).clips][: args.clips]
    small = [clips[i * len(clips) // SMALL_CLIPS] for i in range(SMALL_CLIPS)]
    num_cpus = args.num_cpus or 2
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    runs = {
        "small": _link_corpus(small, work / "small"),
        "large": _link_corpus(clips, work / "large"),
    }
    on_ray = ["--num-cpus", str(num_cpus), "--runner", "ray"]
    startup_s, startup_rss, _ = _pipeline(runs["small"], work / "out_startup")
    startup_mfcc_s, _, _ = _pipeline(runs["small"], work / "out_startup_mfcc", "--no-egemaps")
    mfcc_on_ray = [*on_ray, "--no-egemaps"]
    timed: dict[str, list[float]] = {
        name: [] for name in ("serial", "ray", "serial_small", "ray_small")
    }
    for i in range(args.repeats):  # interleaved, so that a busy spell hits every command
        timed["serial_small"].append(_serial(small, work / f"serial_small_{i}.json", False)[0])
        timed["ray_small"].append(
            _pipeline(runs["small"], work / f"out_small_{i}", *mfcc_on_ray, sample_memory=False)[0]
        )
        timed["serial"].append(_serial(clips, work / f"serial_large_{i}.json", False)[0])
        timed["ray"].append(
            _pipeline(runs["large"], work / f"out_large_{i}", *mfcc_on_ray, sample_memory=False)[0]
        )
    serial_small_s, ray_small_s = min(timed["serial_small"]), min(timed["ray_small"])
    serial_large_s, ray_large_s = min(timed["serial"]), min(timed["ray"])
    # memory: one more run of each, sampled
    _, serial_rss, _ = _serial(clips, work / "serial_large_memory.json", True)
    _, ray_small_rss, _ = _pipeline(runs["small"], work / "out_small_memory", *mfcc_on_ray)
    _, ray_large_rss, ray_large_pss = _pipeline(
        runs["large"], work / "out_large_memory", *mfcc_on_ray
    )
    serial_feats = _serial_features(work / "serial_large_0.json")
    egemaps_s, egemaps_rss, egemaps_pss = _pipeline(runs["large"], work / "out_egemaps", *on_ray)
    df = load_features(work / "out_large_0" / "features", ["path", "mfcc_stats"])
    ray_feats = {
        str(Path(p).resolve()): np.asarray(v) for p, v in zip(df.path, df.mfcc_stats, strict=True)
    }
    assert set(ray_feats) == set(serial_feats), "both paths must see the same clips"
    max_diff = max(float(np.max(np.abs(ray_feats[p] - serial_feats[p]))) for p in serial_feats)
    n = len(clips)
    serial_marginal = _marginal_clips_per_s(SMALL_CLIPS, serial_small_s, n, serial_large_s)
    ray_marginal = _marginal_clips_per_s(SMALL_CLIPS, ray_small_s, n, ray_large_s)
    figures: dict[str, Any] = {
        "benchmark": "preprocess",
        "clips": n,
        "num_cpus": num_cpus,
        "repeats": args.repeats,
        "startup_s": startup_s,
        "startup_no_egemaps_s": startup_mfcc_s,
        "startup_peak_rss_mb": startup_rss / 2**20,
        "serial_fixed_s": serial_small_s,
        "ray_fixed_s": ray_small_s,
        "serial_s": serial_large_s,
        "ray_s": ray_large_s,
        "serial_marginal_clips_per_s": serial_marginal,
        "ray_marginal_clips_per_s": ray_marginal,
        "marginal_speedup": ray_marginal / serial_marginal,
        "speedup": serial_large_s / ray_large_s,
        "serial_peak_rss_mb": serial_rss / 2**20,
        "ray_small_peak_rss_mb": ray_small_rss / 2**20,
        "ray_peak_rss_mb": ray_large_rss / 2**20,
        "ray_peak_pss_mb": ray_large_pss / 2**20,
        "ray_with_egemaps_s": egemaps_s,
        "ray_with_egemaps_peak_rss_mb": egemaps_rss / 2**20,
        "ray_with_egemaps_peak_pss_mb": egemaps_pss / 2**20,
        "max_abs_mfcc_stat_diff": max_diff,
    }
    if args.rss_scale:
        scaled = _link_corpus(clips, work / "scaled", args.rss_scale)
        scaled_s, scaled_rss, scaled_pss = _pipeline(scaled, work / "out_scaled", *mfcc_on_ray)
        figures.update(
            {
                f"ray_x{args.rss_scale}_clips": n * args.rss_scale,
                f"ray_x{args.rss_scale}_s": scaled_s,
                f"ray_x{args.rss_scale}_peak_rss_mb": scaled_rss / 2**20,
                f"ray_x{args.rss_scale}_peak_pss_mb": scaled_pss / 2**20,
            }
        )
    return figures
