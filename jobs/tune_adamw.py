"""Bayesian AdamW sweep for the wav2vec2 loop on Ray Tune (Optuna TPE, seeded + ASHA).

Searches the encoder and head peak LRs (log-uniform), weight decay (log-uniform), AdamW
beta2, the warm-up fraction, the decay-start fraction and gradient clipping (off, or on at
a log-uniform norm). Encoder LR range: 1e-5..1e-3 for the tiny random 'demo' model;
1e-5..1e-4 (the published wav2vec2 fine-tuning range) for real models (--lr-encoder-range).

Objective: validation UA (val/uar, max) on the validation speakers taken from the TRAINING
side of an outer fold; the fold's test speakers are never read. ASHA stops weak trials, but
not before a third of the epochs nor before the longest searched warm-up is over.
Each trial trains with our loop (ser_ray.training.finetune) on the feature cache, built once.

Default: tune on the training side of ONE outer fold (--fold, default 1). Only that fold's
test score is untouched by the search, so jobs/kfold.py refuses such a file for all the folds
(unless --allow-leaky-params). --nested runs one search per outer fold (each on its own
training speakers) and writes per-fold params: the file for jobs/kfold.py --params.

Writes to --out: best.json ({"params", "val_uar", "fold", "search"}; nested:
{"per_fold": {"1": {"params", "val_uar", "search"}, ...}}), trials_fold<k>.csv, config.json,
tune/ (Tune results with TensorBoard event files), feature_cache/ and prepared/ (unless
--features is given). --out may be a URI (s3://, gs://) that every node of the cluster reaches.

Examples:
  python jobs/tune_adamw.py --smoke-test --out /tmp/ta
  python jobs/tune_adamw.py --num-samples 30 --epochs 8 --out runs/adamw    # fold 1 only
  python jobs/tune_adamw.py --nested --out runs/adamw_nested
  python jobs/kfold.py --params runs/adamw_nested/best.json   # per-fold settings, no leak
  python jobs/tune_adamw.py --data-dir ~/data/ravdess --model facebook/wav2vec2-base --nested
  tensorboard --logdir runs/adamw/tune
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ser_ray import cli
from ser_ray.common import config_file, storage
from ser_ray.corpus.protocol import ProtocolSettings
from ser_ray.distributed import prepare
from ser_ray.distributed.demo_encoder import resolve_model
from ser_ray.distributed.published import published_model
from ser_ray.models.ssl import DEMO_MODEL
from ser_ray.sweeps.adamw import SearchSpace, SweepConfig, run_sweep, sweep_train_config
from ser_ray.training.config import TrainConfig

SMOKE_NUM_SAMPLES = 4  # --smoke-test: at most this many trials per fold
SMOKE_EPOCHS = 2  # --smoke-test: at most this many epochs per trial
#: The TrainConfig fields a sweep takes as flags (the searched ones are drawn per trial).
TRAIN_FLAGS = ("model", "epochs", "batch_size", "merge_calm", "seed", "class_weight")


def build_parser() -> argparse.ArgumentParser:
    d = SweepConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_source_args(p)
    p.add_argument(
        "--fold",
        type=int,
        default=1,
        help="outer fold whose training speakers are tuned on (default: %(default)s); only "
        "this fold's test score stays untouched by the search",
    )
    p.add_argument(
        "--nested", action="store_true", help="one search per outer fold (per-fold params)"
    )
    p.add_argument(
        "--outer-folds",
        help="with --nested: comma-separated subset of outer folds, e.g. 1,2 (default: all)",
    )
    # --model demo (the pre-trained demo encoder, resolved in main) by default, as before
    job_train = dataclasses.replace(d.train, model=DEMO_MODEL)
    cli.add_dataclass_args(p, TrainConfig, only=TRAIN_FLAGS, defaults=job_train)
    cli.add_dataclass_args(p, SweepConfig, exclude=("grace_period", "space"), defaults=d)
    cli.add_protocol_args(p)
    p.add_argument(
        "--lr-encoder-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="encoder peak LR range (log-uniform). Default: 1e-5 1e-3 for demo, 1e-5 1e-4 "
        "(published wav2vec2 fine-tuning range) otherwise",
    )
    cli.add_common_args(p, default_out="runs/tune_adamw")
    return p


def format_trials(trials, top: int = 5) -> str:
    columns = [
        "val_uar", "epochs_run", "lr_encoder", "lr_head", "weight_decay", "betas",
        "warmup_frac", "decay_start_frac", "grad_clip_norm",
    ]  # fmt: skip
    table = trials.head(top)[columns].copy()
    table["betas"] = [f"{b[1]:.4f}" for b in table["betas"]]
    table["grad_clip_norm"] = [
        "off" if v is None or v != v else f"{v:.3g}" for v in table["grad_clip_norm"]
    ]
    table = table.rename(columns={"betas": "beta2"})
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    train = cli.dataclass_from_args(args, TrainConfig, sweep_train_config())
    if args.smoke_test:
        train = dataclasses.replace(train, epochs=min(train.epochs, SMOKE_EPOCHS))
    cfg = cli.dataclass_from_args(
        args,
        SweepConfig,
        train=train,
        num_samples=min(args.num_samples, SMOKE_NUM_SAMPLES)
        if args.smoke_test
        else args.num_samples,
        space=SearchSpace.for_model(args.model, lr_encoder=args.lr_encoder_range),
    )
    cli.init_ray(args.address, args.num_cpus, args.dashboard)
    out = args.out
    storage.make_dirs(out)
    cli.check_where_files_live(out, args.features or args.data_dir)
    cfg.train.model = published_model(resolve_model(args.model, args.smoke_test), out)
    features_dir, protocol = prepare.features_for_job(
        args.features,
        args.data_dir,
        args.out,
        args.smoke_test,
        cli.dataclass_from_args(args, ProtocolSettings, n_val_speakers=train.n_val_speakers),
    )
    config_json = config_file.save_config(
        out,
        {
            "job": "tune_adamw",
            "sweep": cfg,
            "fold": None if args.nested else args.fold,
            "nested": args.nested,
            "features_dir": str(features_dir),
            "args": vars(args),
        },
    )
    outer = [int(k) for k in args.outer_folds.split(",")] if args.outer_folds else None
    result = run_sweep(
        features_dir, cfg, out, protocol, fold=args.fold, nested=args.nested, outer_folds=outer
    )

    per_fold = result.best.get("per_fold") or {str(args.fold): result.best}
    for k, found in per_fold.items():
        trials = result.trials[int(k)]
        search = found["search"]
        print(
            f"\nfold {k}: best val UA {found['val_uar']:.4f} ({search['n_trials']} trials, "
            f"{search['n_stopped_early']} stopped early by ASHA, {search['search_s']:.0f} s; "
            f"validation speakers {search['val_actors']}, test speakers {search['test_actors']} "
            "never seen)"
        )
        scheduler = search["scheduler"]
        print(
            f"ASHA grace period {scheduler['grace_period']} of {scheduler['max_t']} epochs: "
            f"{scheduler['grace_rule']}"
        )
        print("best params:", found["params"])
        print(f"top trials:\n{format_trials(trials)}")
    if args.nested:
        print(f"\nnote: {result.best['note']}")
        use = f"python jobs/kfold.py --params {storage.join(out, 'best.json')}"
    else:
        print(f"\nnote: {result.best['search']['note']}")
        use = "one fold's settings: jobs/kfold.py --params refuses them for all folds; use --nested"
    print(
        f"\n  best:   {storage.join(out, 'best.json')}  ({use})"
        f"\n  config: {config_json}\n  tune:   {storage.join(out, 'tune')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
