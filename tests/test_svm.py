"""The scikit-learn core of the SVM baseline (no Ray): metrics, splits, model, grid."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, make_scorer
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut

from ser_ray.common.metrics import classification_metrics
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.corpus.ravdess import EMOTIONS, class_names
from ser_ray.models import svm
from ser_ray.study import summary

RAVDESS = ravdess_protocol()
FOLD_MAP = RAVDESS.fold_of_speaker()


def synthetic_features(n_per_emotion: int = 2, seed: int = 0, noise: float = 1.5) -> pd.DataFrame:
    """24 speakers x 8 emotions x ``n_per_emotion`` clips; one cluster per emotion plus a
    speaker offset, in 80 dimensions (like 40 MFCC means + 40 stds)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (8, 80))
    rows = []
    for speaker in range(1, 25):
        offset = rng.normal(0.0, 0.5, 80)
        for code, emotion in EMOTIONS.items():
            for rep in range(n_per_emotion):
                x = centers[code - 1] + offset + rng.normal(0.0, noise, 80)
                name = f"03-01-{code:02d}-01-01-{rep + 1:02d}-{speaker:02d}.wav"
                rows.append(
                    {
                        "path": f"/demo/Actor_{speaker:02d}/{name}",
                        "actor": speaker,
                        "emotion": emotion,
                        "mfcc_stats": x.astype(np.float32).tolist(),
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 8, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 8, 200))
    m = classification_metrics(y_true, y_pred, num_classes=8)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["uar"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_metrics_known_arrays():
    # neutral (0) half as frequent, as in RAVDESS; UA weighs each class equally
    y_true = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 1, 1, 2, 2, 0, 0]
    m = classification_metrics(y_true, y_pred, num_classes=3)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["uar"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["uar"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


@pytest.mark.parametrize("scheme", ["contiguous", "emobox"])
@pytest.mark.parametrize("fold", range(1, 7))
def test_inner_splits_never_hold_test_speakers(scheme, fold):
    test_speakers, train_speakers = ravdess_protocol(scheme).test_and_train(fold)
    speakers = np.repeat(train_speakers, 3)
    splits = svm.inner_splits(speakers, ravdess_protocol(scheme).fold_of_speaker())
    assert len(splits) == 5
    val_seen = []
    for train_idx, val_idx in splits:
        train_a, val_a = set(speakers[train_idx]), set(speakers[val_idx])
        assert not train_a & val_a
        assert not (train_a | val_a) & set(test_speakers)
        assert len(val_a) == 4 and len(train_a) == 16
        # each inner validation fold is one of the remaining outer folds
        assert len({ravdess_protocol(scheme).fold_of_speaker()[a] for a in val_a}) == 1
        val_seen.extend(val_idx.tolist())
    assert sorted(val_seen) == list(range(len(speakers)))  # a partition of the training rows


def test_inner_splits_reject_unknown_speakers():
    fold_map = ravdess_protocol().fold_of_speaker()
    with pytest.raises(ValueError, match=r"speakers \[99\] are in no fold"):
        svm.inner_splits([1, 2, 99], fold_map)
    with pytest.raises(ValueError, match="two folds"):
        svm.inner_splits([1, 2, 3, 4], fold_map)


def test_svm_params_are_canonical():
    assert svm.svm_params({"kernel": "linear", "C": 1, "gamma": 0.1, "class_weight": None}) == {
        "kernel": "linear",
        "C": 1.0,
        "class_weight": None,
    }
    bayes = {"kernel": "rbf", "C": 2.0, "class_weight": "balanced", "gamma_mode": "scale"}
    assert svm.svm_params(bayes)["gamma"] == "scale"
    assert svm.svm_params({**bayes, "gamma_mode": "value", "gamma": 0.01})["gamma"] == 0.01
    assert svm.svm_params({"kernel": "poly", "C": 1.0})["degree"] == 3
    assert svm.svm_params({"kernel": "linear", "C_linear": 0.5})["C"] == 0.5
    with pytest.raises(ValueError, match="kernel"):
        svm.svm_params({"kernel": "sigmoidal"})


def test_grid_covers_the_space_once():
    grid = svm.svm_grid()
    keys = [repr(sorted(c.items(), key=str)) for c in grid]
    assert len(grid) == 42 and len(set(keys)) == 42
    assert {c["kernel"] for c in grid} == {"rbf", "linear", "poly"}
    assert {c["class_weight"] for c in grid} == {None, "balanced"}
    assert {c.get("gamma") for c in grid if c["kernel"] == "rbf"} == {"scale", 0.001, 0.01}
    assert len(svm.svm_grid(smoke_test=True)) == 6


def test_best_config_breaks_ties_deterministically():
    a = {"kernel": "rbf", "C": 10.0, "gamma": "scale", "class_weight": None}
    b = {"kernel": "linear", "C": 0.1, "class_weight": None}
    c = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": None}
    assert svm.best_config([(a, 0.5), (b, 0.7), (c, 0.7)]) == svm.best_config(
        [(c, 0.7), (a, 0.5), (b, 0.7)]
    )
    assert svm.best_config([(a, 0.5), (b, 0.4)]) == (a, 0.5)


def test_inner_score_equals_grid_search_cv():
    df = synthetic_features(noise=3.0)
    test_speakers, train_speakers = RAVDESS.test_and_train(1)
    train = df[df.actor.isin(train_speakers)].reset_index(drop=True)
    X, y, speakers = (
        svm.feature_matrix(train),
        svm.label_vector(train, RAVDESS),
        train.actor.to_numpy(),
    )
    splits = svm.inner_splits(speakers, FOLD_MAP)
    configs = [
        {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": None},
        {"kernel": "linear", "C": 0.01, "class_weight": "balanced"},
    ]
    ours = [svm.inner_cv_score(c, X, y, splits, 8)["uar"] for c in configs]
    groups = np.array([FOLD_MAP[a] for a in speakers])
    search = GridSearchCV(
        svm.make_svm_pipeline(),
        [{f"svc__{k}": [v] for k, v in c.items()} for c in configs],
        scoring=make_scorer(balanced_accuracy_score),
        cv=LeaveOneGroupOut().split(X, y, groups),
        n_jobs=1,
        refit=False,
    ).fit(X, y)
    np.testing.assert_allclose(ours, search.cv_results_["mean_test_score"], rtol=1e-12)
    assert 1 / 8 < min(ours) < 1.0


def test_calibrated_probabilities_sum_to_one_and_repeat():
    df = synthetic_features(noise=3.0)
    test_speakers, train_speakers = RAVDESS.test_and_train(2)
    train, test = df[df.actor.isin(train_speakers)], df[df.actor.isin(test_speakers)]
    params = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": "balanced"}
    args = (svm.feature_matrix(train), svm.label_vector(train, RAVDESS), train.actor.to_numpy())
    labels, proba = svm.fit_predict(params, *args, svm.feature_matrix(test), 8, FOLD_MAP)
    again = svm.fit_predict(params, *args, svm.feature_matrix(test), 8, FOLD_MAP)
    assert proba.shape == (len(test), 8)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert (proba >= 0).all()
    np.testing.assert_array_equal(proba, again[1])
    np.testing.assert_array_equal(labels, again[0])
    ua = classification_metrics(svm.label_vector(test, RAVDESS), labels, 8)["uar"]
    assert ua > 0.5  # noisy but separable clusters, unseen speakers


def test_reported_labels_follow_the_rule_the_inner_cv_selected_on():
    """Selection (inner CV) scores SVC.predict; the reported labels must be SVC.predict too,
    not the argmax of the calibrated probabilities (they differ on overlapping classes)."""
    df = synthetic_features(noise=6.0)
    test_speakers, train_speakers = RAVDESS.test_and_train(3)
    train, test = df[df.actor.isin(train_speakers)], df[df.actor.isin(test_speakers)]
    params = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": None}
    X, y = svm.feature_matrix(train), svm.label_vector(train, RAVDESS)
    X_test = svm.feature_matrix(test)
    labels, proba = svm.fit_predict(params, X, y, train.actor.to_numpy(), X_test, 8, FOLD_MAP)
    svc_rule = svm.make_svm_pipeline(**svm.svm_params(params)).fit(X, y).predict(X_test)
    np.testing.assert_array_equal(labels, svc_rule)
    assert (proba.argmax(axis=1) != svc_rule).any()  # the two rules do differ here


def test_probabilities_with_merged_calm_have_seven_columns():
    df = synthetic_features(n_per_emotion=1)
    _, train_speakers = RAVDESS.test_and_train(1)
    train = df[df.actor.isin(train_speakers)]
    y = svm.label_vector(train, ravdess_protocol(merge_calm=True))
    assert set(y.tolist()) == set(range(7)) and len(class_names(True)) == 7
    _, proba = svm.fit_predict(
        {"kernel": "linear", "C": 0.1},
        svm.feature_matrix(train),
        y,
        train.actor.to_numpy(),
        svm.feature_matrix(train.head(5)),
        7,
        FOLD_MAP,
    )
    assert proba.shape == (5, 7)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)


def test_feature_matrix_checks_its_input():
    df = synthetic_features(n_per_emotion=1).head(3)
    assert svm.feature_matrix(df).shape == (3, 80)
    with pytest.raises(KeyError, match="mfcc_stats"):
        svm.feature_matrix(df.drop(columns="mfcc_stats"))
    bad = df.copy()
    bad.at[0, "mfcc_stats"] = [math.nan] * 80
    with pytest.raises(ValueError, match="NaN"):
        svm.feature_matrix(bad)


def test_fold_table_and_summary():
    folds = [
        {
            "fold": k,
            "test_actors": [4 * k - 3, 4 * k - 2, 4 * k - 1, 4 * k],
            "n_test": 64,
            "svm": {"accuracy": 0.5 + 0.1 * k, "uar": 0.4 + 0.1 * k, "macro_f1": 0.3},
            "svm_params": {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": None},
            "svm_search_s": 2.0,
        }
        for k in (1, 2)
    ]
    mean, std = summary.fold_mean_std(folds)
    assert mean["svm"]["uar"] == pytest.approx(0.55)
    assert std["svm"]["uar"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    columns = {
        "search s": lambda f: f"{f['svm_search_s']:.1f}",
        "params": lambda f: summary.format_params(f["svm_params"]),
    }
    table = summary.format_table({"folds": folds, "mean": mean, "std": std}, columns)
    # the same figures as the SVM's own table had, in the summary's percent format
    assert "| 1 | 1,2,3,4 | 64 | 50.0 | 60.0 | 30.0 | 2.0 | kernel=rbf C=1" in table
    assert "| mean ± std |  | 128 | 55.0 ± 7.1 |" in table
