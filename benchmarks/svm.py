"""Benchmark: the Ray Tune grid sweep against scikit-learn's GridSearchCV on every core.

Same grid, same inner splits (leave one remaining outer fold out = speaker-grouped, 5 x 4
speakers), same score (UA) on the training speakers of one outer fold. Prints the wall time of
each, their ratio, and the best inner score each found (they must be equal). Then the test
UA of the tuned config against the untuned reference (StandardScaler + SVC(C=10)) on the
same features and the same outer fold: the tuned one must not be worse.

Used by jobs/benchmark.py as ``svm`` (``add_svm_args`` + ``run_svm_benchmark``):
``python jobs/benchmark.py svm [--features DIR] [--fold 1] [--speaker-norm] [--smoke-test]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV

from ser_ray import cli
from ser_ray.common.metrics import classification_metrics
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.distributed import prepare
from ser_ray.features import featurize
from ser_ray.models import svm
from ser_ray.sweeps.svm import tune_fold

log = logging.getLogger(__name__)


def add_svm_args(parser: argparse.ArgumentParser) -> None:
    """The SVM benchmark's own flags (the caller adds --out, --smoke-test, --address, …)."""
    parser.add_argument(
        "--features",
        default=None,
        help="prepared features folder (default: the demo corpus, prepared into OUT/prepared)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=1,
        help="outer fold whose training speakers are searched (default: %(default)s)",
    )
    parser.add_argument("--folds", choices=["contiguous", "emobox"], default="contiguous")
    parser.add_argument("--merge-calm", action="store_true", help="7 classes: calm -> neutral")
    cli.add_svm_feature_args(parser)
    parser.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="Tune trials at once (default: the cluster's CPUs)",
    )


def _scorer(num_classes: int):
    def uar(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return classification_metrics(y_true, y_pred, num_classes)["uar"]

    return make_scorer(uar)


def run_svm_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Time the Tune grid sweep and GridSearchCV (n_jobs=-1: every core of this machine) on
    one outer fold; return figures.

    The Tune sweep runs twice (``tune_cold_s``: first Tuner, starts the trial workers;
    ``tune_s``: the second); the ratio uses the second.

    Reads ``args.features``, ``args.fold``, ``args.folds``, ``args.merge_calm`` and, when
    present, ``args.out``, ``args.smoke_test`` (small grid and demo corpus) and
    ``args.max_concurrent_trials``. Needs a running Ray instance.
    """
    import ray

    smoke_test = bool(getattr(args, "smoke_test", False))
    out = Path(getattr(args, "out", None) or "runs/benchmark")
    scheme = args.folds
    protocol = ravdess_protocol(scheme, args.merge_calm)
    num_classes, fold_map = len(protocol.classes), protocol.fold_of_speaker()
    if args.features:
        features_dir = Path(args.features)
    else:
        egemaps = "egemaps" in svm.FEATURE_SETS[args.svm_features]  # only when searched on
        config = featurize.FeatureConfig(egemaps=egemaps)
        features_dir = prepare.prepare_demo(out / "prepared", smoke_test=smoke_test, config=config)
    columns = ["path", "actor", "emotion", *svm.FEATURE_SETS[args.svm_features]]
    df = featurize.load_features(features_dir, columns=columns)
    test_speakers, train_speakers = protocol.test_and_train(args.fold)
    X_all = svm.feature_set_matrix(df, args.svm_features, args.speaker_norm)
    y_all = svm.label_vector(df, protocol)
    train_mask = df["actor"].isin(train_speakers).to_numpy()
    test_mask = df["actor"].isin(test_speakers).to_numpy()
    train = df[train_mask].reset_index(drop=True)
    X, y = X_all[train_mask], y_all[train_mask]
    speakers = train["actor"].to_numpy()
    grid = svm.svm_grid(smoke_test)
    splits = svm.inner_splits(speakers, fold_map)

    # Twice: the first Tuner on a fresh cluster also starts the trial workers (cold).
    tune_runs_s = []
    for run in ("cold", "warm"):
        start_s = time.perf_counter()
        found = tune_fold(
            X, y, speakers,
            search="grid", num_samples=1, fold_map=fold_map, num_classes=num_classes, seed=0,
            storage_path=out / "tune", name=f"bench_svm_grid_fold{args.fold}_{run}", grid=grid,
            max_concurrent_trials=getattr(args, "max_concurrent_trials", None),
        )  # fmt: skip
        tune_runs_s.append(time.perf_counter() - start_s)
    tune_cold_s, tune_s = tune_runs_s

    search = GridSearchCV(
        svm.make_svm_pipeline(),
        [{f"svc__{k}": [v] for k, v in c.items()} for c in grid],
        scoring=_scorer(num_classes),
        cv=splits,
        n_jobs=-1,
        refit=False,
    )
    start_s = time.perf_counter()
    search.fit(X, y)
    sklearn_s = time.perf_counter() - start_s
    best = int(np.argmax(search.cv_results_["mean_test_score"]))  # first of the best, as sklearn
    sklearn_params = svm.svm_params(
        {k.removeprefix("svc__"): v for k, v in search.cv_results_["params"][best].items()}
    )
    sklearn_score = float(search.cv_results_["mean_test_score"][best])

    def test_uar(params: dict[str, Any]) -> float:
        labels, _ = svm.fit_predict(params, X, y, speakers, X_all[test_mask], num_classes, fold_map)
        return classification_metrics(y_all[test_mask], labels, num_classes)["uar"]

    tuned_test_uar, reference_test_uar = test_uar(found["params"]), test_uar(svm.REFERENCE_PARAMS)
    return {
        "fold": args.fold,
        "scheme": scheme,
        "n_train_clips": len(train),
        "n_configs": len(grid),
        "n_inner_splits": len(splits),
        "cluster_cpus": int(ray.cluster_resources().get("CPU", 0)),
        "tune_s": tune_s,
        "tune_cold_s": tune_cold_s,
        "sklearn_s": sklearn_s,
        "speedup_sklearn_over_tune": sklearn_s / tune_s,
        "tune_best_params": found["params"],
        "tune_best_inner_uar": found["inner_uar"],
        "sklearn_best_params": sklearn_params,
        "sklearn_best_inner_uar": sklearn_score,
        "equal_best_score": bool(abs(found["inner_uar"] - sklearn_score) < 1e-9),
        "svm_features": args.svm_features,
        "speaker_norm": bool(args.speaker_norm),
        "n_test_clips": int(test_mask.sum()),
        "tuned_test_uar": tuned_test_uar,
        "reference_params": svm.svm_params(svm.REFERENCE_PARAMS),
        "reference_test_uar": reference_test_uar,
        "tuned_over_reference_uar": tuned_test_uar / reference_test_uar,
    }


def format_svm_benchmark(r: dict[str, Any]) -> str:
    """The figures side by side."""
    return "\n".join(
        [
            f"SVM grid search, fold {r['fold']} ({r['scheme']}) training speakers: "
            f"{r['n_train_clips']} clips, {r['n_configs']} configs x {r['n_inner_splits']} "
            f"inner splits, {r['cluster_cpus']} CPUs",
            "| search | wall s | best inner UA | best config |",
            "|---|---|---|---|",
            f"| Ray Tune grid (first Tuner, cold) | {r['tune_cold_s']:.1f} | | |",
            f"| Ray Tune grid (warm) | {r['tune_s']:.1f} | {r['tune_best_inner_uar']:.4f} "
            f"| {r['tune_best_params']} |",
            f"| sklearn GridSearchCV n_jobs=-1 | {r['sklearn_s']:.1f} "
            f"| {r['sklearn_best_inner_uar']:.4f} | {r['sklearn_best_params']} |",
            f"sklearn / Tune (warm) wall time = {r['speedup_sklearn_over_tune']:.2f} "
            f"(>1: Tune faster); equal best inner UA: {r['equal_best_score']}",
            "",
            f"Test UA on fold {r['fold']}'s {r['n_test_clips']} clips, {r['svm_features']} "
            f"features, speaker norm {'on' if r['speaker_norm'] else 'off'}:",
            "| model | test UA |",
            "|---|---|",
            f"| tuned ({r['tune_best_params']}) | {r['tuned_test_uar']:.4f} |",
            f"| reference StandardScaler + SVC(C=10) | {r['reference_test_uar']:.4f} |",
            f"tuned / reference UA = {r['tuned_over_reference_uar']:.3f} (>= 1: tuning pays)",
        ]
    )
