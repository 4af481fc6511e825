"""Side-by-side speed figures (ratios in one run), never timed tests.

  python jobs/benchmark.py preprocess [--clips 1440]  # Ray Data pipeline vs serial librosa
  python jobs/benchmark.py svm [--fold 1]             # Tune grid sweep vs GridSearchCV
  python jobs/benchmark.py train                      # our loop vs HF Trainer; feature cache
  python jobs/benchmark.py folds                      # resource plan vs six at once vs sequential
  python jobs/benchmark.py gpu                        # six folds sharing one GPU, bf16/fp16
  python jobs/benchmark.py pretrain                   # our pre-training loop vs HF Trainer
  python jobs/benchmark.py ingest [--copies 1 4]      # worker memory: in-memory vs streamed clips
  python jobs/benchmark.py run [--cold]               # the main job: stages, memory, processes, CPU
  python jobs/benchmark.py scale [--sizes 1440 5760]  # featurizing and SVMs vs corpus size
  python jobs/benchmark.py all                        # everything but scale, one Markdown table

Each writes OUT/benchmark_<name>.json; `all` also writes OUT/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# the benchmarks live beside jobs/, outside the installed package; Ray's workers get this path too
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.default_run import add_run_args, run_default_job
from benchmarks.folds import add_folds_args, run_folds_benchmark
from benchmarks.gpu import add_gpu_args, run_gpu_benchmark
from benchmarks.ingest import add_ingest_args, run_ingest_benchmark
from benchmarks.preprocess import add_preprocess_args, run_preprocess_benchmark
from benchmarks.pretrain_speed import add_pretrain_args, run_pretrain_benchmark
from benchmarks.scale import add_scale_args, format_scale_benchmark, run_scale_benchmark
from benchmarks.svm import add_svm_args, format_svm_benchmark, run_svm_benchmark
from benchmarks.train import add_train_args, run_train_benchmark
from ser_ray import cli


def _format_figures(figures: dict) -> str:
    width = max(map(len, figures))
    return "\n".join(
        f"{key:<{width}}  {f'{value:.4g}' if isinstance(value, float) else value}"
        for key, value in figures.items()
    )


# name -> (add its flags, run it, needs a Ray instance in this process, format its figures)
BENCHMARKS = {
    "preprocess": (add_preprocess_args, run_preprocess_benchmark, False, _format_figures),
    "svm": (add_svm_args, run_svm_benchmark, True, format_svm_benchmark),
    "train": (add_train_args, run_train_benchmark, True, _format_figures),
    "folds": (add_folds_args, run_folds_benchmark, True, _format_figures),
    "gpu": (add_gpu_args, run_gpu_benchmark, False, _format_figures),
    "pretrain": (add_pretrain_args, run_pretrain_benchmark, False, _format_figures),
    "ingest": (add_ingest_args, run_ingest_benchmark, True, _format_figures),
    "run": (add_run_args, run_default_job, False, _format_figures),
    # starts Ray itself, after featurizing in subprocesses (no second instance beside theirs)
    "scale": (add_scale_args, run_scale_benchmark, False, format_scale_benchmark),
}
#: Left out of `all`: its default sizes take most of an hour on 2 cores.
NOT_IN_ALL = ("scale",)
# the headline figures of each benchmark and their targets, for the `all` table
HEADLINES = {
    "preprocess": [
        ("startup_s", "prepare.py on 24 clips, whole process, seconds", "<= 6"),
        ("ray_fixed_s", "the same forced onto Ray (--runner ray --no-egemaps), seconds", "-"),
        ("marginal_speedup", "Ray Data vs serial librosa, marginal clips/s ratio", ">= 1.7"),
        ("ray_peak_rss_mb", "peak RSS of prepare.py's process tree, MB", "<= 1536"),
    ],
    "svm": [
        ("speedup_sklearn_over_tune", "GridSearchCV(n_jobs=-1) time / Tune time", ">= 1"),
    ],
    "train": [("ours_vs_trainer", "our loop vs HF Trainer, clips/s ratio (uncached)", ">= 1.3")],
    "folds": [
        ("plan_vs_six_at_once", "resource plan / six folds at once, wall time", "< 1"),
        ("plan_vs_sequential", "resource plan / one fold at a time, wall time", "<= 0.6"),
    ],
    "gpu": [("bf16_kfold_wall_s", "kfold.py, six folds on one GPU, bf16, seconds", "-")],
    "pretrain": [("ours_vs_trainer", "our pre-training loop vs HF Trainer, clips/s ratio", ">= 1")],
    "ingest": [
        ("stream_growth_x4_over_x1", "streamed worker peak memory, 4x corpus / 1x", "~1"),
        ("memory_growth_x4_over_x1", "in-memory worker peak memory, 4x corpus / 1x", "-"),
        ("pretrain_stream_growth_x4_over_x1", "streamed TAPT worker peak memory, 4x / 1x", "~1"),
        ("pretrain_memory_growth_x4_over_x1", "in-memory TAPT worker peak memory, 4x / 1x", "-"),
    ],
    "run": [
        ("wall_s", "python jobs/kfold.py, whole process, seconds", "<= 600 (cold cache)"),
        ("peak_pss_gb", "its process tree's peak PSS, GB", "<= 6"),
        ("peak_ray_processes", "most ray:: processes alive at once", "~12"),
        (
            "train_workers_cpu_share_in_folds",
            "training workers' CPU share, folds",
            ">= 0.8",
        ),
    ],
}


def _markdown(results: dict[str, dict]) -> str:
    import datetime
    import platform

    import torch

    lines = [
        f"# ser_ray benchmarks, {datetime.date.today()} on {platform.node()}",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "",
        "| benchmark | figure | value | target |",
        "|---|---|---|---|",
    ]
    for name, figures in results.items():
        for key, what, target in HEADLINES[name]:
            lines.append(f"| {name} | {what} | {figures[key]:.3g} | {target} |")
    for name, figures in results.items():
        lines += ["", f"## {name}", "", "```", _format_figures(figures), "```"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per benchmark, plus ``all``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, *_) in BENCHMARKS.items():
        p = sub.add_parser(name)
        add_args(p)
        cli.add_common_args(p, default_out="runs/benchmark")
    everything = sub.add_parser("all", help="every benchmark with its defaults")
    cli.add_common_args(everything, default_out="runs/benchmark")
    return parser


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.benchmark == "all":  # the GPU one only where there is a GPU
        import torch

        names = [
            n
            for n in BENCHMARKS
            if (n != "gpu" or torch.cuda.is_available()) and n not in NOT_IN_ALL
        ]
    else:
        names = [args.benchmark]
    results = {}
    for name in names:
        add_args, run, needs_ray, format_figures = BENCHMARKS[name]
        own = argparse.ArgumentParser()
        add_args(own)
        bench_args = own.parse_args([]) if args.benchmark == "all" else args
        for common in ("out", "smoke_test", "address", "num_cpus", "dashboard", "verbose"):
            setattr(bench_args, common, getattr(args, common))
        if needs_ray:
            cli.init_ray(args.address, args.num_cpus, args.dashboard)
        results[name] = run(bench_args)
        print(format_figures(results[name]), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"benchmark_{name}.json").write_text(
            json.dumps(results[name], indent=2, default=str)
        )
    if args.benchmark == "all":
        (Path(args.out) / "benchmarks.md").write_text(_markdown(results))
        print(f"\nwritten: {Path(args.out) / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
