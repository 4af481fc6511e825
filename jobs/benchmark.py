"""Side-by-side speed figures (ratios in one run), never timed tests.

python jobs/benchmark.py preprocess [--clips 1440]   # Ray Data pipeline vs serial librosa
python jobs/benchmark.py svm [--fold 1]              # Tune grid sweep vs GridSearchCV
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_preprocess import add_preprocess_args, run_preprocess_benchmark  # noqa: E402
from _bench_svm import add_svm_args, format_svm_benchmark, run_svm_benchmark  # noqa: E402

from ser_ray import cli  # noqa: E402


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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, *_) in BENCHMARKS.items():
        p = sub.add_parser(name)
        add_args(p)
        cli.add_common_args(p, default_out="runs/benchmark")
    args = parser.parse_args(argv)
    cli.setup_logging()
    _, run, needs_ray, format_figures = BENCHMARKS[args.benchmark]
    if needs_ray:
        cli.init_ray(args.address, args.num_cpus)
    figures = run(args)
    print(format_figures(figures))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"benchmark_{args.benchmark}.json").write_text(
        json.dumps(figures, indent=2, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
