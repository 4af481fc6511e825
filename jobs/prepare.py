"""Corpus -> manifest -> Ray Data features (Parquet) + rejected.csv + config.json.

Examples:
  python jobs/prepare.py                                  # the embedded demo corpus
  python jobs/prepare.py --data-dir ~/data/ravdess --out runs/features
  python jobs/prepare.py --download --out runs/features   # fetch RAVDESS from Zenodo first
  python jobs/prepare.py --data-dir few_clips --runner ray  # Ray even for a tiny corpus
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ser_ray import cli
from ser_ray.corpus import demo_corpus, ravdess
from ser_ray.distributed import prepare
from ser_ray.features import featurize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        help="RAVDESS-layout folder (Actor_XX/*.wav or flat; local or s3://…), or a copy "
        "saved with datasets' save_to_disk. Default: the embedded demo corpus",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download Audio_Speech_Actors_01-24.zip from Zenodo (record 1188976) into "
        "--download-dir, check its md5 and use it",
    )
    parser.add_argument("--download-dir", default="data", help="default: %(default)s")
    parser.add_argument("--folds", choices=["contiguous", "emobox"], default="contiguous")
    parser.add_argument("--n-mfcc", type=int, default=40)
    parser.add_argument("--mfcc-deltas", action="store_true", help="add delta statistics")
    parser.add_argument(
        "--no-egemaps",
        action="store_true",
        help="skip the eGeMAPSv02 functionals (openSMILE); the SVM can then use MFCC only",
    )
    parser.add_argument("--trim-silence", action="store_true", help="cut silent ends first")
    parser.add_argument("--max-duration-s", type=float, default=60.0)
    parser.add_argument(
        "--all-modalities",
        action="store_true",
        help="keep song/video names too (default: audio-only speech 03-01)",
    )
    parser.add_argument(
        "--runner",
        choices=prepare.RUNNERS,
        default="auto",
        help="where clips are featurized: Ray Data tasks, or this process one batch after the "
        f"other; auto: in-process up to {prepare.IN_PROCESS_MAX_CLIPS} clips, where starting "
        "Ray costs more than the work (default: %(default)s)",
    )
    cli.add_common_args(parser, default_out="runs/prepare")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    config = featurize.FeatureConfig(
        n_mfcc=args.n_mfcc,
        mfcc_deltas=args.mfcc_deltas,
        egemaps=not args.no_egemaps,
        trim_silence=args.trim_silence,
        max_duration_s=args.max_duration_s,
        folds=args.folds,
        speech_only=not args.all_modalities,
    )
    data_dir = args.data_dir
    if args.download:
        data_dir = str(ravdess.download(args.download_dir))
    if data_dir is None:
        data_dir = str(demo_corpus.demo_source(smoke_test=args.smoke_test))
    result = prepare.prepare_features(
        data_dir,
        args.out,
        config,
        connect=lambda: cli.init_ray(args.address, args.num_cpus, args.dashboard),
        runner=args.runner,
    )
    state = "reused (input and config unchanged)" if result.reused else f"by {result.runner}"
    print(
        f"{result.n_input} input files: {result.n_ok} with features, {result.n_rejected} "
        f"rejected ({state})\n  features: {result.features_dir}\n  rejected: "
        f"{result.rejected_csv}\n  config:   {Path(args.out) / 'config.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
