"""The main job: features -> SVM variants' nested CV -> wav2vec2 on the folds concurrently ->
one table with the variants side by side (paired per-fold differences against the first).

Examples:
  python jobs/kfold.py                                  # svm, svm+spknorm, wav2vec2 on the demo
  python jobs/kfold.py --variants svm+egemaps,svm+mfcc+egemaps+spknorm   # SVM variants only
  python jobs/kfold.py --data-dir ~/data/ravdess --model facebook/wav2vec2-base --epochs 10
  python jobs/kfold.py --manifest clips.csv --num-folds 5 --label-map calm=-   # your corpus
  python jobs/kfold.py --data-dir ~/data/ravdess --test-data-dir ~/data/CREMA-D/AudioWAV \
      --label-map calm=-,surprised=-                    # cross-corpus, 6 shared classes
  ray job submit --working-dir . -- python jobs/kfold.py --smoke-test
  python jobs/tune_adamw.py --nested --out runs/adamw   # per-fold AdamW settings, then:
  python jobs/kfold.py --params runs/adamw/best.json
  python jobs/kfold.py --out runs/kfold --resume        # continue an interrupted run
"""

from __future__ import annotations

import argparse
import sys

from ser_ray import cli
from ser_ray.corpus.protocol import ProtocolSettings
from ser_ray.study.config import KFoldConfig, study_train_config
from ser_ray.study.kfold import run_kfold
from ser_ray.study.params import read_params
from ser_ray.study.summary import format_table
from ser_ray.training.config import TrainConfig

#: The TrainConfig fields the study takes as flags (--lr is lr_encoder's flag).
TRAIN_FLAGS = (
    "model",
    "epochs",
    "batch_size",
    "lr_encoder",
    "lr_head",
    "merge_calm",
    "refit",
    "seed",
    "class_weight",
    "progress_every_s",
)


def build_parser() -> argparse.ArgumentParser:
    """Flags of KFoldConfig and of the study's TrainConfig fields, with their help and the
    study's defaults (:func:`ser_ray.cli.add_dataclass_args`), then the shared ones."""
    d = KFoldConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_dataclass_args(p, KFoldConfig, exclude=("out", "smoke_test"), defaults=d)
    cli.add_dataclass_args(p, TrainConfig, only=TRAIN_FLAGS, defaults=d.train)
    cli.add_protocol_args(p, defaults=d.protocol)
    cli.add_common_args(p, default_out=d.out)
    return p


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    train = cli.dataclass_from_args(args, TrainConfig, study_train_config())
    protocol = cli.dataclass_from_args(args, ProtocolSettings)
    cfg = cli.dataclass_from_args(args, KFoldConfig, train=train, protocol=protocol)
    params = read_params(cfg)  # refuses leaky tuned settings before anything starts
    cli.init_ray(args.address, args.num_cpus, args.dashboard)
    summary = run_kfold(cfg, params)
    print(format_table(summary))
    print(
        f"\nrun folder: {cfg.out} (summary.md, summary.json, predictions.csv, plots, tensorboard)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
