"""MFCC + SVM baseline with nested cross-validation on Ray Tune (grid or Bayesian search).

For each outer fold (its test speakers), Ray Tune searches SVC hyperparameters on the other
folds' speakers only, scored by inner speaker-grouped cross-validation (UA); the best config is
refit on the training speakers and scored once on the test fold.

Writes to --out: svm_folds.json (per fold + mean ± std), predictions_svm.csv (out-of-fold,
one row per clip, class probabilities), config.json, svm_models/fold_<k>.joblib (each fold's
model, for jobs/predict.py --svm-models), tune/ (Tune results, one experiment per fold, for the
dashboard / TensorBoard) and prepared/ (features, unless --features is given). --out may be
a URI (s3://, gs://) that every node of the cluster reaches.

Examples:
  python jobs/tune_svm.py                                  # embedded demo corpus, grid search
  python jobs/tune_svm.py --search bayes --num-samples 40 --out runs/svm_bayes
  python jobs/tune_svm.py --features runs/prepare/features --folds emobox
  python jobs/tune_svm.py --data-dir ~/data/ravdess --merge-calm
  python jobs/tune_svm.py --speaker-norm --svm-features egemaps   # speaker-normalised eGeMAPS
  python jobs/tune_svm.py --search reference      # untuned SVC(C=10), same features and folds
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ser_ray import cli
from ser_ray.common import config_file, storage
from ser_ray.corpus.protocol import ProtocolSettings
from ser_ray.distributed import prepare
from ser_ray.features import featurize
from ser_ray.models import svm
from ser_ray.study.summary import fold_mean_std, format_params, format_table
from ser_ray.sweeps.svm import SEARCHES, NestedSvmConfig, run_nested_svm

#: Columns the SVM needs besides its features (the waveforms stay on disk).
META_COLUMNS = ["path", "actor", "emotion"]
SMOKE_NUM_SAMPLES = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_source_args(parser)
    parser.add_argument(
        "--search",
        choices=[*SEARCHES, "reference"],
        default="grid",
        help="grid, bayes (Optuna TPE), or reference: no search, the untuned "
        "StandardScaler + SVC(C=10) (default: %(default)s)",
    )
    cli.add_svm_feature_args(parser)
    parser.add_argument(
        "--num-samples",
        type=int,
        default=30,
        help="trials per outer fold for --search bayes (grid runs its whole fixed grid); "
        f"default: %(default)s, {SMOKE_NUM_SAMPLES} with --smoke-test",
    )
    cli.add_protocol_args(parser)
    parser.add_argument(
        "--outer-folds",
        default=None,
        help="comma-separated subset of outer folds to run, e.g. 1,2 (default: all six)",
    )
    parser.add_argument("--merge-calm", action="store_true", help="7 classes: calm -> neutral")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Bayesian searcher")
    parser.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="trials at once (default: the cluster's CPUs; one CPU per trial)",
    )
    cli.add_common_args(parser, default_out="runs/tune_svm")
    return parser


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    cli.init_ray(args.address, args.num_cpus, args.dashboard)
    out = args.out
    storage.make_dirs(out)
    cli.check_where_files_live(out, args.features or args.data_dir)
    features_dir, protocol = prepare.features_for_job(
        args.features,
        args.data_dir,
        args.out,
        args.smoke_test,
        cli.dataclass_from_args(args, ProtocolSettings, n_val_speakers=0),
    )
    columns = META_COLUMNS + list(svm.FEATURE_SETS[args.svm_features])
    df = featurize.load_features(features_dir, columns=columns)
    df = df[df["emotion"].isin(protocol.kept_labels)]  # the label map may drop some
    num_samples = min(args.num_samples, SMOKE_NUM_SAMPLES) if args.smoke_test else args.num_samples
    outer = [int(k) for k in args.outer_folds.split(",")] if args.outer_folds else None

    variant = cli.svm_variant_name(args)
    reference = args.search == "reference"
    result = run_nested_svm(
        df,
        NestedSvmConfig(
            search="grid" if reference else args.search,
            grid=[svm.REFERENCE_PARAMS] if reference else None,
            num_samples=num_samples,
            seed=args.seed,
            outer_folds=outer,
            smoke_test=args.smoke_test,
            max_concurrent_trials=args.max_concurrent_trials,
            feature_set=args.svm_features,
            speaker_normalise=args.speaker_norm,
            variant=variant,
        ),
        protocol,
        storage_path=storage.join(out, "tune"),
        models_dir=storage.join(out, "svm_models"),
    )

    mean, std = fold_mean_std(result.folds)
    folds_json = storage.join(out, "svm_folds.json")
    storage.write_text(
        folds_json,
        json.dumps(
            config_file.to_jsonable(
                {
                    "folds": result.folds,
                    "mean": mean[variant],
                    "std": std[variant],
                    "std_note": "sample std over folds (ddof=1)",
                }
            ),
            indent=2,
        ),
    )
    predictions_csv = storage.join(out, "predictions_svm.csv")
    storage.write_text(predictions_csv, result.predictions.to_csv(index=False))
    config_json = config_file.save_config(
        out,
        {
            **result.config,
            "features_dir": str(features_dir),
            "args": vars(args),
            "n_clips": len(df),
        },
    )

    print(
        f"\n{variant}: {args.svm_features} features, normalisation: "
        f"{result.config['normalisation']}\nnested CV ({args.search} search, {protocol.scheme} "
        f"folds, {len(df)} clips)"
    )
    search_columns = {
        "search s": lambda f: f"{f.get(f'{variant}_search_s', math.nan):.1f}",
        "params": lambda f: format_params(f.get(f"{variant}_params", {})),
    }
    print(format_table({"folds": result.folds, "mean": mean, "std": std}, search_columns))
    print(
        f"\n  folds:       {folds_json}\n  predictions: {predictions_csv}\n  config:      "
        f"{config_json}\n  tune runs:   {storage.join(out, 'tune')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
