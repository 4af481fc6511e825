"""Benchmark `run`: the main job as a user runs it, the whole process tree, cold or warm cache.

Runs ``python jobs/kfold.py`` (its defaults, plus ``--kfold-args``) in a child process and reads
its console line by line; with ``--cold`` under a new, empty ``$SER_RAY_CACHE`` (the demo corpus
and the demo encoder are built as on a fresh clone), else with the cache as it is. Every
``--interval-s`` it samples the child's process tree (which holds the local Ray instance):
PSS summed over the tree, ``ray::`` processes alive, CPU seconds of each process.

Figures: wall time; when each stage ended (seconds from the start, from the console lines that
close them); peak PSS; most ``ray::`` processes at once; the training workers' share of the
tree's CPU time while the folds train (from the feature cache's line to the last fold's
``done``; the busiest kinds of process listed), the tree's use of the machine's cores over
the whole run and while the demo encoder is built (cold cache); how many raylet worker-count
warnings and ``core_worker.cc`` error lines reached the console; each variant's mean test UA
from ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.process_tree import TreeThread

#: the processes that train the folds: a fold's own Tune trial when it trains in it (one
#: worker per fold, the default), or its TorchTrainer's workers (DDP)
TRAINING_PROCESSES = ("ray::ImplicitFunc", "ray::RayTrainWorker")
#: stage -> the console line that ends it (the last such line, for stages of several lines)
STAGE_ENDS = {
    "demo_corpus": r"demo corpus: \d+ clips",
    "features": r"features \(\w+\): \d+ ok",
    "svm_sweeps": r"svm\S* fold \d+: test UA",
    "demo_encoder": r"demo encoder ready",
    "feature_cache": r"feature cache \S+: \d+ clips",
    "ssl_folds": r"fold \d+: done",
    "summary": r"summary written",
}
RAYLET_WARNING = re.compile(r"PYTHON worker processes have been started")
CORE_WORKER_ERROR = re.compile(r"core_worker\.cc")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cold", action="store_true", help="an empty $SER_RAY_CACHE (as on a fresh clone)"
    )
    parser.add_argument("--kfold-args", default="", help="extra kfold.py flags, one string")
    parser.add_argument("--interval-s", type=float, default=5.0, help="sampling period")


class TreeSampler(TreeThread):
    """Samples a process tree in a thread: ``samples`` = [(seconds since ``start``, pss
    bytes, ray:: processes, {pid: (name, cpu seconds)})]."""

    def __init__(self, pid: int, start: float, interval_s: float) -> None:
        super().__init__(pid, interval_s)
        self.start = start
        self.samples: list[tuple[float, int, int, dict[int, tuple[str, float]]]] = []

    def take(self, processes: list) -> None:
        import psutil

        pss, ray_processes, cpu = 0, 0, {}
        for process in processes:
            try:
                pss += process.memory_full_info().pss
                name = process.name()
                times = process.cpu_times()
            except psutil.Error:  # it just ended
                continue
            ray_processes += name.startswith("ray::")
            cpu[process.pid] = (name, times.user + times.system)
        self.samples.append((time.perf_counter() - self.start, pss, ray_processes, cpu))


def cpu_seconds(samples, since_s: float, until_s: float) -> dict[str, float]:
    """CPU seconds each kind of process (by name) used between two times: each process's
    total at its last sample in the window less its total at the last sample before it
    (zero for a process started inside the window)."""
    before: dict[int, tuple[str, float]] = {}
    last: dict[int, tuple[str, float]] = {}
    for t, _, _, cpu in samples:
        if t > until_s:
            break
        (before if t < since_s else last).update(cpu)
    used: dict[str, float] = {}
    for pid, (name, total) in last.items():
        used[name] = used.get(name, 0.0) + total - before.get(pid, (name, 0.0))[1]
    return used


def run_default_job(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve() / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = tempfile.mkdtemp(prefix="ser_ray_cold_") if args.cold else None
    if cache:
        env["SER_RAY_CACHE"] = cache
    job = Path(__file__).resolve().parents[1] / "jobs" / "kfold.py"
    command = [sys.executable, str(job), "--out", str(out), *shlex.split(args.kfold_args)]
    if args.smoke_test:
        command.append("--smoke-test")
    stage_end: dict[str, float] = {}
    warnings = errors = 0
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    with TreeSampler(child.pid, start, args.interval_s) as sampler:
        for line in child.stdout:
            now = time.perf_counter() - start
            print(f"[{now:7.1f}] {line}", end="", flush=True)
            for stage, pattern in STAGE_ENDS.items():
                if re.search(pattern, line):
                    stage_end[stage] = now
            warnings += bool(RAYLET_WARNING.search(line))
            errors += bool(CORE_WORKER_ERROR.search(line))
        child.wait()
    wall_s = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({child.returncode})")
    samples = sampler.samples
    folds_from = stage_end.get("feature_cache", stage_end.get("demo_encoder", 0.0))
    folds = cpu_seconds(samples, folds_from, stage_end.get("ssl_folds", wall_s))
    encoder_from, encoder_to = stage_end.get("svm_sweeps", 0.0), stage_end.get("demo_encoder")
    whole = cpu_seconds(samples, 0.0, wall_s)
    summary = json.loads((out / "summary.json").read_text())
    figures: dict[str, Any] = {
        "benchmark": "run",
        "command": shlex.join(command[1:]),
        "cache": "cold (empty)" if cache else "as it is",
        "cores": len(os.sched_getaffinity(0)),
        "wall_s": wall_s,
    }
    figures.update({f"{stage}_ended_s": t for stage, t in stage_end.items()})
    figures.update(
        {
            "peak_pss_gb": max(s[1] for s in samples) / 2**30,
            "peak_ray_processes": max(s[2] for s in samples),
            "train_workers_cpu_share_in_folds": sum(
                seconds for name, seconds in folds.items() if name.startswith(TRAINING_PROCESSES)
            )
            / max(sum(folds.values()), 1e-9),
            "tree_cpu_use_of_cores": sum(whole.values()) / (wall_s * figures["cores"]),
            # the demo encoder's pool and pre-training (cold cache only; nothing else runs)
            "demo_encoder_cpu_use_of_cores": sum(
                cpu_seconds(samples, encoder_from, encoder_to).values()
            )
            / ((encoder_to - encoder_from) * figures["cores"])
            if encoder_to
            else None,
            "raylet_worker_warnings": warnings,
            "core_worker_error_lines": errors,
        }
    )
    busiest = sorted(folds.items(), key=lambda item: -item[1])[:8]
    figures["folds_cpu_s_by_process"] = ", ".join(f"{name} {sec:.0f}" for name, sec in busiest)
    for variant, means in summary["mean"].items():
        figures[f"mean_uar_{variant}"] = means["uar"]
    return figures
