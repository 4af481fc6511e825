"""Benchmark `preprocess`: the Ray Data pipeline vs the plain serial librosa recipe.

Both run on the same N clips in fresh child processes (Ray's start-up is not timed: a cluster
is up before a job runs); each child's process tree (Ray's raylet
and workers included) is sampled for its resident memory. The largest difference between the
two sets of MFCC statistics shows the speed is not bought by doing less.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clips", type=int, default=1440, help="clips to process (default: %(default)s)"
    )


def _serial(paths: list[str]) -> dict[str, np.ndarray]:
    """The recipe the pipeline replaces: librosa.load + librosa.feature.mfcc per file."""
    import librosa

    out = {}
    for path in paths:
        y, sr = librosa.load(path, sr=16_000)
        mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=40)
        out[path] = np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)])
    return out


def _ray_pipeline(corpus: str, num_cpus: int) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds of the pipeline (Ray already started) and its features."""
    import ray

    from ser_ray.features import load_features, prepare_features

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = prepare_features(corpus, out)
            seconds = time.perf_counter() - start
            df = load_features(result.features_dir, ["path", "mfcc_stats"])
    finally:
        ray.shutdown()
    return seconds, {p: np.asarray(v) for p, v in zip(df.path, df.mfcc_stats, strict=True)}


def _child(kind: str, arg, num_cpus: int, queue) -> None:
    if kind == "serial":
        start = time.perf_counter()
        feats = _serial(arg)
        queue.put((time.perf_counter() - start, feats))
    else:
        queue.put(_ray_pipeline(arg, num_cpus))


def _measure(kind: str, arg, num_cpus: int) -> tuple[float, float, dict]:
    """(seconds, peak RSS of the process tree in bytes, features)."""
    import psutil

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, arg, num_cpus, queue))
    proc.start()
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds, feats = queue.get()
    done.set()
    proc.join()
    sampler.join()
    return seconds, peak, feats


def run_preprocess_benchmark(args: argparse.Namespace) -> dict:
    from ser_ray.demo_corpus import write_demo_corpus
    from ser_ray.features import demo_corpus_dir
    from ser_ray.ravdess import build_manifest

    n_actors = 24
    per_actor = max(1, min(60, -(-args.clips // n_actors)))
    corpus = write_demo_corpus(demo_corpus_dir(f"bench{per_actor}"), n_actors, per_actor)
    paths = [c.path for c in build_manifest(str(corpus)).clips]
    subset = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    for path in paths[: args.clips]:  # the pipeline takes a folder: link the same N clips
        link = subset / Path(path).parent.name / Path(path).name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(path)
    linked = sorted(str(p) for p in subset.rglob("*.wav"))
    num_cpus = args.num_cpus or 2
    serial_s, serial_rss, serial_feats = _measure("serial", linked, num_cpus)
    ray_s, ray_rss, ray_feats = _measure("ray", str(subset), num_cpus)
    assert set(ray_feats) == set(serial_feats), "both paths must see the same clips"
    max_diff = max(float(np.max(np.abs(ray_feats[p] - serial_feats[p]))) for p in serial_feats)
    n = len(linked)
    return {
        "benchmark": "preprocess",
        "clips": n,
        "serial_clips_per_s": n / serial_s,
        "ray_clips_per_s": n / ray_s,
        "speedup": serial_s / ray_s,
        "serial_peak_rss_mb": serial_rss / 2**20,
        "ray_peak_rss_mb": ray_rss / 2**20,
        "max_abs_mfcc_stat_diff": max_diff,
        "num_cpus": num_cpus,
    }
