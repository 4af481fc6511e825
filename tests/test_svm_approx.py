"""The SVM's large-corpus solver (no Ray): the choice by size, the kernel approximation's
probabilities and accuracy, the successive-halving search, and the settings that reach the
runs and the summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ser_ray.common.errors import SettingsError
from ser_ray.common.metrics import classification_metrics
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.models import svm, svm_approx
from ser_ray.study import summary
from ser_ray.study.config import KFoldConfig
from ser_ray.study.variants import parse_variant
from ser_ray.sweeps.svm import _uar_scorer

RAVDESS = ravdess_protocol()
FOLD_MAP = RAVDESS.fold_of_speaker()
RBF = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": None}


def separable(n_per_class: int = 10, noise: float = 1.0, seed: int = 0):
    """24 speakers x 8 classes x ``n_per_class`` clips: one cluster per class plus a speaker
    offset, 80 dimensions; (X, y, speakers)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (8, 80))
    X, y, speakers = [], [], []
    for speaker in range(1, 25):
        offset = rng.normal(0.0, 0.3, 80)
        for label in range(8):
            X.append(centers[label] + offset + rng.normal(0, noise, (n_per_class, 80)))
            y += [label] * n_per_class
            speakers += [speaker] * n_per_class
    return np.concatenate(X), np.array(y), np.array(speakers)


@pytest.mark.parametrize(
    ("setting", "clips", "threshold", "chosen"),
    [
        ("auto", 1_200, 4_000, "exact"),  # RAVDESS's 20 training actors: today's solver
        ("auto", 4_000, 4_000, "exact"),  # the threshold itself is still exact
        ("auto", 4_001, 4_000, "approx"),
        ("auto", 19_200, 4_000, "approx"),
        ("auto", 500, 100, "approx"),
        ("exact", 19_200, 4_000, "exact"),
        ("approx", 100, 4_000, "approx"),
    ],
)
def test_the_solver_is_chosen_by_training_clips(setting, clips, threshold, chosen):
    assert svm_approx.choose_solver(setting, clips, threshold) == chosen


def test_an_unknown_solver_is_refused_as_a_setting():
    with pytest.raises(ValueError, match="unknown SVM solver"):
        svm_approx.choose_solver("fast", 10)
    with pytest.raises(SettingsError, match="svm_solver"):
        KFoldConfig(svm_solver="fast")
    with pytest.raises(SettingsError, match="min-clips"):
        KFoldConfig(svm_approx_min_clips=-1)


def test_approx_probabilities_sum_to_one_and_beat_chance_on_unseen_speakers():
    X, y, speakers = separable(noise=2.5)
    test_speakers, _ = RAVDESS.test_and_train(3)
    test = np.isin(speakers, test_speakers)
    model = svm.fit_calibrated_svm(
        RBF, X[~test], y[~test], speakers[~test], FOLD_MAP, solver="approx", n_components=100
    )
    assert isinstance(model.calibrated_classifiers_[0].estimator, svm_approx.ApproxKernelClassifier)
    proba = svm.class_probabilities(model, X[test], 8)
    labels = svm.predict_labels(model, X[test])
    assert proba.shape == (test.sum(), 8) and (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert classification_metrics(y[test], labels, 8)["uar"] > 0.6  # chance: 0.125
    again = svm.fit_calibrated_svm(
        RBF, X[~test], y[~test], speakers[~test], FOLD_MAP, solver="approx", n_components=100
    )
    np.testing.assert_array_equal(svm.class_probabilities(again, X[test], 8), proba)


@pytest.mark.parametrize("kernel", ["rbf", "poly", "linear"])
def test_the_approximation_takes_every_kernel_of_the_grid(kernel):
    X, y, _ = separable(n_per_class=2, noise=0.5)
    params = svm.svm_params({"kernel": kernel, "C": 1.0, "gamma": 0.01})
    model = svm.make_model(params, "approx", n_components=50).fit(X, y)
    assert (model.predict(X) == y).mean() > 0.9
    assert model.decision_function(X).shape == (len(y), 8)
    steps = dict(model.pipeline_.steps)
    assert ("nystroem" in steps) == (kernel != "linear")
    if kernel == "rbf":
        assert steps["nystroem"].gamma == 0.01


def test_gamma_scale_means_what_it_means_for_the_svc():
    X, y, _ = separable(n_per_class=2)
    model = svm.make_model(RBF, "approx", n_components=20).fit(X, y)
    assert model.pipeline_.named_steps["nystroem"].gamma == pytest.approx(1 / 80)


def test_halving_prunes_configs_and_keeps_a_good_one():
    X, y, speakers = separable(n_per_class=6, noise=2.0)
    _, train_speakers = RAVDESS.test_and_train(1)
    train = np.isin(speakers, train_speakers)
    splits = svm.inner_splits(speakers[train], FOLD_MAP)
    grid = svm.svm_grid(smoke_test=True)  # 6 configs
    survivors, n_pruned = svm_approx.halving_search(
        grid, X[train], y[train], splits, _uar_scorer(8), n_components=80
    )
    assert n_pruned > 0 and len(survivors) + n_pruned == len(grid)
    assert all(svm.svm_params(params) in grid for params, _, _ in survivors)
    best = max(uar for _, uar, _ in survivors)
    assert best > 0.5
    # the last round scores on all clips of every split (in another order, so other Nystroem
    # landmarks): the full inner CV of the same config gives about the same UA
    params, uar, _ = max(survivors, key=lambda row: row[1])
    full = svm.inner_cv_score(params, X[train], y[train], splits, 8, "approx", 80)
    assert full["uar"] == pytest.approx(uar, abs=0.03)


def test_the_study_settings_reach_the_nested_cv(monkeypatch, tmp_path):
    from ser_ray.study import svm_runs
    from ser_ray.sweeps import svm as sweeps_svm

    seen = {}

    def fake_nested_svm(df, cfg, protocol, **kwargs):
        seen["cfg"] = cfg
        return sweeps_svm.SvmResult(folds=[], predictions=pd.DataFrame(), config={})

    monkeypatch.setattr(sweeps_svm, "run_nested_svm", fake_nested_svm)
    cfg = KFoldConfig(svm_solver="auto", svm_approx_min_clips=123, svm_approx_components=77)
    svm_runs.svm_results(pd.DataFrame(), cfg, RAVDESS, str(tmp_path), parse_variant("svm"), "")
    nested = seen["cfg"]
    assert (nested.solver, nested.approx_min_clips, nested.approx_components) == ("auto", 123, 77)


def test_the_flags_set_the_solver_settings():
    import importlib.util
    from pathlib import Path

    from ser_ray import cli

    path = Path(__file__).resolve().parents[1] / "jobs" / "kfold.py"
    spec = importlib.util.spec_from_file_location("kfold_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.build_parser().parse_args(
        ["--svm-solver", "approx", "--svm-approx-min-clips", "8000"]
    )
    cfg = cli.dataclass_from_args(args, KFoldConfig)
    assert (cfg.svm_solver, cfg.svm_approx_min_clips) == ("approx", 8000)


def test_the_summary_names_the_solver_of_each_svm_variant():
    folds = [
        {"fold": k, "test_actors": [k], "n_test": 1,
         "svm": {"accuracy": 1.0, "uar": 1.0, "macro_f1": 1.0}}
        for k in (1, 2)
    ]  # fmt: skip
    predictions = pd.DataFrame(
        {"path": ["a", "b"], "actor": [1, 2], "fold": [1, 2], "true_label": ["x", "y"],
         "pred_label": ["x", "y"], "model": "svm", "prob_x": [1.0, 0.0], "prob_y": [0.0, 1.0]}
    )  # fmt: skip
    about = {
        "features": "mfcc",
        "normalisation": "none",
        "solver": "approx",
        "solver_description": svm_approx.describe("approx", 500),
    }
    built = summary.build_summary(
        folds, predictions, ["x", "y"], summary.RunInfo(variants={"svm": about})
    )
    assert built["variants"]["svm"]["solver"] == "approx"
    text = summary.format_markdown(built)
    assert "- svm: mfcc features, normalisation: none; solver: Nystroem kernel approximation " in (
        text
    )
    assert "(500 components)" in text


def test_classes_are_told_apart_pairwise_as_by_the_svc():
    """Three classes in a row on one axis: no single line cuts the middle one from both of the
    others (one classifier per class, one-vs-rest, misses it), but a line between each pair
    does, as SVC's one-vs-one rule finds; the approximation decides by the same pairs."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 0.3, (60, 1)) for c in (-3.0, 0.0, 3.0)])
    y = np.repeat([0, 1, 2], 60)
    model = svm_approx.ApproxKernelClassifier(kernel="linear", C=10.0).fit(X, y)
    recall = [(model.predict(X[y == k]) == k).mean() for k in range(3)]
    assert min(recall) > 0.95, recall
    assert model.decision_function(X).shape == (180, 3)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
@pytest.mark.parametrize("n_classes", [2, 5])
def test_pairwise_ridge_equals_scikit_learns_one_vs_one_ridge(class_weight, n_classes):
    """The per-class Gram matrices give each pair the same ridge fit as scikit-learn's
    one-vs-one wrapper fitting that pair's clips (uneven classes, so weights matter)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.multiclass import OneVsOneClassifier

    rng = np.random.default_rng(1)
    sizes = [40, 25, 60, 10, 33][:n_classes]
    X = np.concatenate([rng.normal(k * 0.7, 1.0, (n, 12)) for k, n in enumerate(sizes)])
    y = np.repeat(np.array(["a", "b", "c", "d", "e"][:n_classes]), sizes)
    ours = svm_approx.PairwiseRidgeClassifier(alpha=0.3, class_weight=class_weight).fit(X, y)
    theirs = OneVsOneClassifier(RidgeClassifier(alpha=0.3, class_weight=class_weight)).fit(X, y)
    for k, estimator in enumerate(theirs.estimators_):
        np.testing.assert_allclose(ours.coef_[k], estimator.coef_.ravel(), atol=1e-8)
        np.testing.assert_allclose(ours.intercept_[k], estimator.intercept_, atol=1e-8)
    test = rng.normal(1.0, 1.5, (50, 12))
    if n_classes > 2:
        np.testing.assert_allclose(
            ours.decision_function(test), theirs.decision_function(test), atol=1e-8
        )
    np.testing.assert_array_equal(ours.predict(test), theirs.predict(test))
