"""Corpus -> clip table -> Ray Data features (Parquet) + rejected.csv + config.json.

Examples:
  python jobs/prepare.py                                  # the embedded demo corpus
  python jobs/prepare.py --data-dir ~/data/ravdess --out runs/features
  python jobs/prepare.py --download --out runs/features   # fetch RAVDESS from Zenodo first
  python jobs/prepare.py --data-dir few_clips --runner ray  # Ray even for a tiny corpus
  python jobs/prepare.py --data-dir clips.csv --out runs/mine   # a clip manifest (CSV/JSONL)
"""

from __future__ import annotations

import argparse
import sys

from ser_ray import cli
from ser_ray.common import storage
from ser_ray.corpus import demo_corpus, ravdess
from ser_ray.distributed import prepare
from ser_ray.features import featurize
from ser_ray.study.config import KFoldConfig

#: How the corpus is read, as the study reads it (a manifest's unknown-speaker value, an
#: EmoBox file's speaker pattern), so features prepared here are those the study would make.
CORPUS_FLAGS = ("speaker_regex", "unknown_speaker")

#: The FeatureConfig fields the job takes as flags (--no-egemaps, --all-modalities: see their
#: metadata).
FEATURE_FLAGS = (
    "n_mfcc", "mfcc_deltas", "egemaps", "trim_silence", "max_duration_s", "speech_only",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        help="the corpus: a RAVDESS-layout folder (Actor_XX/*.wav or flat; local or s3://…), "
        "a CREMA-D-named folder, a clip manifest (CSV/JSONL: path, speaker, emotion, ...), "
        "or a copy saved with datasets' save_to_disk. Default: the embedded demo corpus",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download Audio_Speech_Actors_01-24.zip from Zenodo (record 1188976) into "
        "--download-dir, check its md5 and use it",
    )
    parser.add_argument("--download-dir", default="data", help="default: %(default)s")
    cli.add_dataclass_args(parser, featurize.FeatureConfig, only=FEATURE_FLAGS)
    cli.add_dataclass_args(parser, KFoldConfig, only=CORPUS_FLAGS)
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


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    config = cli.dataclass_from_args(args, featurize.FeatureConfig)
    data_dir = args.data_dir
    if args.download:
        data_dir = str(ravdess.download(args.download_dir))
    if data_dir is None:
        data_dir = str(demo_corpus.demo_source(smoke_test=args.smoke_test))
    inputs = prepare.read_corpus_inputs(data_dir, config, args.speaker_regex, args.unknown_speaker)
    result = prepare.prepare_features(
        data_dir,
        args.out,
        config,
        connect=lambda: _connect(args, data_dir),
        runner=args.runner,
        inputs=inputs,
    )
    state = "reused (input and config unchanged)" if result.reused else f"by {result.runner}"
    print(
        f"{result.n_input} input files: {result.n_ok} with features, {result.n_rejected} "
        f"rejected ({state})\n  features: {result.features_dir}\n  rejected: "
        f"{result.rejected_csv}\n  config:   {storage.join(result.out_dir, 'config.json')}"
    )
    return 0


def _connect(args: argparse.Namespace, data_dir: str) -> None:
    """Join or start Ray (only when Ray does the work), then refuse a run location or corpus
    some node of a cluster cannot see."""
    cli.init_ray(args.address, args.num_cpus, args.dashboard)
    storage.make_dirs(args.out)
    cli.check_where_files_live(args.out, data_dir)


if __name__ == "__main__":
    sys.exit(main())
