"""The main job: features -> SVM variants' nested CV -> wav2vec2 on six folds concurrently ->
one table with the variants side by side (paired per-fold differences against the first).

Examples:
  python jobs/kfold.py                                  # svm, svm+spknorm, wav2vec2 on the demo
  python jobs/kfold.py --variants svm+egemaps,svm+mfcc+egemaps+spknorm   # SVM variants only
  python jobs/kfold.py --data-dir ~/data/ravdess --model facebook/wav2vec2-base --epochs 10
  ray job submit --working-dir . -- python jobs/kfold.py --smoke-test
  python jobs/tune_adamw.py --nested --out runs/adamw   # per-fold AdamW settings, then:
  python jobs/kfold.py --params runs/adamw/best.json
  python jobs/kfold.py --out runs/kfold --resume        # continue an interrupted run
"""

from __future__ import annotations

import argparse
import sys

from ser_ray import cli
from ser_ray.study.kfold import KFoldConfig, params_provenance, run_kfold, study_train_config
from ser_ray.study.summary import format_table


def build_parser() -> argparse.ArgumentParser:
    d = KFoldConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", help="RAVDESS folder or URI (default: the demo corpus)")
    p.add_argument(
        "--model",
        help="hub id or local folder (from_pretrained) of a wav2vec2, HuBERT, WavLM or "
        "data2vec-audio encoder (a jobs/pretrain.py output too), 'demo' (the demo-size "
        "encoder pre-trained on the package's unlabeled pool, built and cached on first use) "
        "or 'demo-random' (the same, random weights). Default: demo without --data-dir, "
        "facebook/wav2vec2-base with it",
    )
    p.add_argument("--epochs", type=int, default=d.train.epochs, help="default: %(default)s")
    p.add_argument(
        "--batch-size", type=int, default=d.train.batch_size, help="default: %(default)s"
    )
    p.add_argument("--lr", type=float, help="peak encoder learning rate")
    p.add_argument("--lr-head", type=float, help="peak head learning rate")
    p.add_argument(
        "--params",
        help="best.json of jobs/tune_adamw.py --nested (per-fold AdamW settings); a single-fold "
        "sweep's file is refused: its settings saw the other folds' test actors",
    )
    p.add_argument(
        "--allow-leaky-params",
        action="store_true",
        help="accept a single-fold sweep's settings for every fold anyway (summary.md says so "
        "in bold)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="retrain each wav2vec2 fold model on fit + validation actors for the best epoch "
        "count before testing (as the SVM refits on all training actors)",
    )
    p.add_argument(
        "--tapt-epochs",
        type=int,
        default=d.tapt_epochs,
        help="task-adaptive pre-training: before fine-tuning, continue each fold's "
        "self-supervised pre-training for N epochs on its training actors' audio (cached); "
        "0 = off (default)",
    )
    p.add_argument("--folds", choices=["contiguous", "emobox"], default=d.folds)
    p.add_argument("--merge-calm", action="store_true", help="7 classes: calm -> neutral")
    p.add_argument(
        "--variants",
        "--models",
        default=",".join(d.variants),
        help="comma-separated named variants, compared with the first: a family (svm, wav2vec2) "
        "then +options; svm takes +spknorm (speaker normalisation), +egemaps, +mfcc+egemaps "
        "(feature sets; default MFCC). Default: %(default)s",
    )
    p.add_argument("--workers-per-fold", type=int, default=d.workers_per_fold)
    p.add_argument("--concurrent-folds", type=int, help="folds trained at once (default: all six)")
    p.add_argument(
        "--gpus-per-fold",
        type=float,
        help="GPUs per fold, fractions allowed (0.16: six folds share one GPU). "
        "Default: the cluster's GPUs shared over the folds, 0 without GPUs",
    )
    p.add_argument("--cpus-per-worker", type=float, help="default: a fair share of the CPUs")
    p.add_argument("--max-failures", type=int, default=d.max_failures)
    p.add_argument("--svm-search", choices=["grid", "bayes"], default=d.svm_search)
    p.add_argument("--svm-num-samples", type=int, default=d.svm_num_samples)
    p.add_argument("--storage-path", help="Tune/Train storage, local or s3:// (default OUT/ray)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=d.train.seed)
    cli.add_common_args(p, default_out=d.out)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    cfg = KFoldConfig(
        data_dir=args.data_dir,
        train=study_train_config(
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            merge_calm=args.merge_calm,
            seed=args.seed,
            refit=args.refit,
            **{
                k: v
                for k, v in (("lr_encoder", args.lr), ("lr_head", args.lr_head))
                if v is not None
            },
        ),
        folds=args.folds,
        variants=tuple(args.variants.split(",")),
        params=args.params,
        allow_leaky_params=args.allow_leaky_params,
        tapt_epochs=args.tapt_epochs,
        workers_per_fold=args.workers_per_fold,
        concurrent_folds=args.concurrent_folds,
        gpus_per_fold=args.gpus_per_fold,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        svm_search=args.svm_search,
        svm_num_samples=args.svm_num_samples,
        storage_path=args.storage_path,
        resume=args.resume,
        out=args.out,
        smoke_test=args.smoke_test,
    )
    try:
        params_provenance(cfg)  # refuse leaky tuned settings before starting anything
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cli.init_ray(args.address, args.num_cpus, args.dashboard)
    summary = run_kfold(cfg)
    print(format_table(summary))
    print(
        f"\nrun folder: {cfg.out} (summary.md, summary.json, predictions.csv, plots, tensorboard)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
