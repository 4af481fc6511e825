"""Side-by-side speed figures (ratios in one run), never timed tests.

python jobs/benchmark.py preprocess [--clips 1440]   # Ray Data pipeline vs serial librosa
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_preprocess import add_preprocess_args, run_preprocess_benchmark  # noqa: E402

BENCHMARKS = {
    "preprocess": (add_preprocess_args, run_preprocess_benchmark),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, _) in BENCHMARKS.items():
        p = sub.add_parser(name)
        add_args(p)
        p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    figures = BENCHMARKS[args.benchmark][1](args)
    width = max(map(len, figures))
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"benchmark_{args.benchmark}.json").write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
