"""SVM baseline: the scikit-learn core of the nested cross-validation (no Ray).

The model is a :class:`~sklearn.pipeline.Pipeline` of a ``StandardScaler`` and an ``SVC`` on
a feature set of the features table (:data:`FEATURE_SETS`: MFCC statistics, eGeMAPS, both,
or a frozen SSL encoder's pooled layers), optionally speaker-normalised first
(:func:`feature_set_matrix`). Hyperparameters are chosen by the UA (unweighted average
recall) of an inner, speaker-grouped cross-validation on the training speakers only: the
inner folds are the outer folds of the same scheme that remain once the test fold is set
aside. The chosen model is refit on all the training speakers and wrapped in a sigmoid
calibration, whose own splits are the same inner speaker folds, so that every prediction
comes with class probabilities that sum to 1.
The reported label is the SVC's own decision (``SVC.predict``), the rule the inner CV scored:
selection and reporting use one decision rule.

The Ray Tune edge (trials, searchers, the outer loop) lives in :mod:`ser_ray.sweeps.svm`.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = np.concatenate([rng.normal(0, 1, (20, 4)), rng.normal(4, 1, (20, 4))])
>>> y = np.repeat([0, 1], 20)
>>> model = make_svm_pipeline(kernel="rbf", C=1.0).fit(X, y)
>>> float((model.predict(X) == y).mean())
1.0
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ser_ray.common.metrics import classification_metrics
from ser_ray.corpus.protocol import Protocol
from ser_ray.features.speaker_norm import normalisation_groups, speaker_normalize
from ser_ray.models.svm_approx import N_COMPONENTS, ApproxKernelClassifier

log = logging.getLogger(__name__)

#: Features column the SVM reads by default (concatenated MFCC means and standard deviations).
FEATURE_COLUMN = "mfcc_stats"
#: Column of a frozen SSL encoder's mean-pooled hidden layers, concatenated ((layers + 1) x
#: hidden values); not in the features Parquet: computed from the encoder
#: (:func:`ser_ray.models.ssl.pooled_layer_features`, or the study's feature cache).
SSL_COLUMN = "ssl_layers"
#: The SVM's feature sets and the columns each concatenates (80 MFCC statistics, 88 eGeMAPSv02
#: functionals, the encoder's pooled layers).
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "mfcc": (FEATURE_COLUMN,),
    "egemaps": ("egemaps",),
    "mfcc+egemaps": (FEATURE_COLUMN, "egemaps"),
    "ssl": (SSL_COLUMN,),
}
#: The untuned reference the tuned SVM must beat: StandardScaler + SVC(C=10), RBF, gamma scale.
REFERENCE_PARAMS: dict[str, Any] = {"kernel": "rbf", "C": 10.0, "gamma": "scale"}
#: Caps libsvm's iterations so a badly conditioned poly config cannot stall a trial.
MAX_ITER = 1_000_000

# The fixed grid (the earlier attempt's method): C on a log scale per kernel; gamma only
# where the kernel uses it ("scale" = 1 / (n_features * X.var()), i.e. 1/80 on standardized
# MFCC statistics); each with and without class balancing.
_GRID_C = {
    "rbf": (0.1, 1.0, 10.0, 100.0, 1000.0),
    "linear": (0.01, 0.1, 1.0),
    "poly": (0.1, 1.0, 10.0),
}
_GRID_GAMMA = {"rbf": ("scale", 0.001, 0.01), "linear": ("scale",), "poly": ("scale",)}
_SMOKE_GRID_C = {"rbf": (1.0, 10.0), "linear": (0.1,)}
_SMOKE_GRID_GAMMA = {"rbf": ("scale",), "linear": ("scale",)}
CLASS_WEIGHTS: tuple[str | None, ...] = (None, "balanced")

# Ranges of the Bayesian search (log-uniform). A linear SVC needs no large C on standardized
# MFCC statistics (its inner UA plateaus from C ~ 1) and libsvm takes minutes to converge
# there, so the linear kernel has its own, lower range (searched as "C_linear").
C_RANGE = (1e-2, 1e3)
LINEAR_C_RANGE = (1e-3, 1e1)
GAMMA_RANGE = (1e-4, 1e-1)
KERNELS = ("rbf", "linear", "poly")


def make_svm_pipeline(
    kernel: str = "rbf",
    C: float = 1.0,  # noqa: N803 - scikit-learn's name
    gamma: str | float = "scale",
    class_weight: str | None = None,
    degree: int = 3,
) -> Pipeline:
    """StandardScaler + SVC with the given hyperparameters (an unfitted estimator).

    The SVC is deterministic (no probability estimates here: see :func:`make_calibrated_svm`).
    """
    svc = SVC(
        kernel=kernel,
        C=float(C),
        gamma=gamma,
        class_weight=class_weight,
        degree=int(degree),
        max_iter=MAX_ITER,
    )
    return Pipeline([("scale", StandardScaler()), ("svc", svc)])


def make_model(
    params: Mapping[str, Any], solver: str = "exact", n_components: int = N_COMPONENTS
) -> Pipeline | ApproxKernelClassifier:
    """The unfitted classifier of one config: the SVC pipeline (``exact``), or the kernel
    approximation with a linear classifier (``approx``, :mod:`ser_ray.models.svm_approx`)."""
    if solver == "exact":
        return make_svm_pipeline(**svm_params(params))
    if solver == "approx":
        return ApproxKernelClassifier(**svm_params(params), n_components=n_components)
    raise ValueError(f"unknown SVM solver {solver!r}; choose exact or approx")


def make_calibrated_svm(
    params: Mapping[str, Any],
    cv: Sequence[tuple[np.ndarray, np.ndarray]] | int = 5,
    solver: str = "exact",
    n_components: int = N_COMPONENTS,
) -> CalibratedClassifierCV:
    """The SVM pipeline with sigmoid (Platt) calibration for class probabilities.

    ``ensemble=False``: one SVM fit on all rows predicts; the ``cv`` splits only fit the
    sigmoid on out-of-split decision values. Pass speaker-grouped splits (e.g.
    :func:`inner_splits`) so the calibration never sees a speaker's own clips.
    Its ``predict`` is the argmax of ``predict_proba`` (not the rule the inner CV scores;
    :func:`fit_predict` reports ``SVC.predict``); rows of ``predict_proba`` sum to 1.
    Deterministic: nothing in it draws random numbers (the approximation's landmarks are
    seeded). ``solver`` and ``n_components``: :func:`make_model`.
    """
    return CalibratedClassifierCV(
        make_model(params, solver, n_components), method="sigmoid", cv=cv, ensemble=False
    )


def svm_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The SVC hyperparameters from a Tune/Optuna config, in canonical form.

    Accepts the Bayesian search's ``gamma_mode`` ("scale" or "value") and ``C_linear`` (its
    name for C of the linear kernel); drops ``gamma`` and ``degree`` where the kernel ignores
    them, so equal models have equal dicts.
    """
    kernel = str(config.get("kernel", "rbf"))
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    gamma: str | float = config.get("gamma", "scale")
    if config.get("gamma_mode", "value") == "scale" or gamma is None:
        gamma = "scale"
    params: dict[str, Any] = {
        "kernel": kernel,
        "C": float(config["C"] if "C" in config else config.get("C_linear", 1.0)),
        "class_weight": config.get("class_weight"),
    }
    if kernel != "linear":
        params["gamma"] = gamma if gamma == "scale" else float(gamma)
    if kernel == "poly":
        params["degree"] = int(config.get("degree", 3))
    return params


def svm_grid(smoke_test: bool = False) -> list[dict[str, Any]]:
    """The fixed grid as a list of canonical configs (42 configs; 6 with ``smoke_test``)."""
    c_values, gammas = (_SMOKE_GRID_C, _SMOKE_GRID_GAMMA) if smoke_test else (_GRID_C, _GRID_GAMMA)
    grid = []
    for kernel, cs in c_values.items():
        for c, gamma, weight in itertools.product(cs, gammas[kernel], CLASS_WEIGHTS):
            grid.append(
                svm_params({"kernel": kernel, "C": c, "gamma": gamma, "class_weight": weight})
            )
    return grid


def feature_matrix(df: pd.DataFrame, column: str = FEATURE_COLUMN) -> np.ndarray:
    """``df[column]`` (one list per row) stacked into a float64 matrix (rows, features)."""
    if column not in df.columns:
        raise KeyError(f"features table has no {column!r} column (columns: {list(df.columns)})")
    X = np.stack([np.asarray(v, dtype=np.float64) for v in df[column]])
    if not np.isfinite(X).all():
        raise ValueError(f"{column} holds NaN or infinite values")
    return X


def feature_set_matrix(
    df: pd.DataFrame, feature_set: str = "mfcc", speaker_normalise: bool = False
) -> np.ndarray:
    """The columns of ``feature_set`` (see :data:`FEATURE_SETS`) side by side, float64.

    With ``speaker_normalise`` each row is z-normalised over the rows of its ``actor``
    (:func:`ser_ray.features.speaker_norm.speaker_normalize`; a clip of an unknown speaker
    over the unknown-speaker clips of its side: ``normalisation_groups``): reads features,
    ``actor``, ``path`` and, where present, ``speaker`` and the side columns, never a label.
    A speaker's statistics use only its own rows, so normalising the
    whole table once equals normalising inside every outer and inner fold.
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; choose one of {list(FEATURE_SETS)}")
    X = np.hstack([feature_matrix(df, column) for column in FEATURE_SETS[feature_set]])
    if speaker_normalise:
        X = speaker_normalize(X, normalisation_groups(df), df["path"].tolist())
    return X


def label_vector(df: pd.DataFrame, protocol: Protocol) -> np.ndarray:
    """Class indices of ``df["emotion"]`` under the protocol's label map and classes."""
    return np.array(protocol.class_indices(df["emotion"]), dtype=np.int64)


def inner_splits(
    speakers: Iterable[int], fold_map: Mapping[int, int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Speaker-grouped inner splits of the training rows: leave one remaining outer fold out.

    ``speakers`` is the speaker of each training row (the test fold's must be absent),
    ``fold_map`` each speaker's outer fold (:meth:`Protocol.fold_of_speaker`). Returns
    ``(train_idx, val_idx)`` row indices, one split per fold present, in fold order.
    """
    speakers = np.asarray(list(speakers), dtype=np.int64)
    unknown = sorted(set(speakers.tolist()) - set(fold_map))
    if unknown:
        raise ValueError(f"speakers {unknown} are in no fold of the protocol")
    groups = np.array([fold_map[a] for a in speakers.tolist()], dtype=np.int64)
    present = sorted(set(groups.tolist()))
    if len(present) < 2:
        raise ValueError(
            f"inner cross-validation needs speakers of two folds at least, got {present}"
        )
    return [(np.flatnonzero(groups != k), np.flatnonzero(groups == k)) for k in present]


def inner_cv_score(
    params: Mapping[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    solver: str = "exact",
    n_components: int = N_COMPONENTS,
) -> dict[str, float]:
    """Mean (and std) over the inner splits of UA, accuracy and macro-F1 of one config
    (``solver``, ``n_components``: :func:`make_model`)."""
    per_split = []
    for train_idx, val_idx in splits:
        model = make_model(params, solver, n_components).fit(X[train_idx], y[train_idx])
        per_split.append(classification_metrics(y[val_idx], model.predict(X[val_idx]), num_classes))
    scores = {k: float(np.mean([m[k] for m in per_split])) for k in per_split[0]}
    scores["uar_std"] = float(np.std([m["uar"] for m in per_split]))
    return scores


def fit_predict(
    params: Mapping[str, Any],
    X_train: np.ndarray,
    y_train: np.ndarray,
    speakers_train: Sequence[int],
    X_test: np.ndarray,
    num_classes: int,
    fold_map: Mapping[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Refit the chosen config on all training rows; (labels, class probabilities) of the
    test rows.

    The labels are the SVC's own decision (``SVC.predict`` of the pipeline refit on all
    training rows), the rule :func:`inner_cv_score` selected the config by; the probabilities
    (rows sum to 1; a class absent from the training rows gets 0) come from the sigmoid
    calibration around that same fitted SVC, and their argmax may differ on a few clips.
    """
    model = fit_calibrated_svm(params, X_train, y_train, speakers_train, fold_map)
    return predict_labels(model, X_test), class_probabilities(model, X_test, num_classes)


def fit_calibrated_svm(
    params: Mapping[str, Any],
    X_train: np.ndarray,
    y_train: np.ndarray,
    speakers_train: Sequence[int],
    fold_map: Mapping[int, int],
    solver: str = "exact",
    n_components: int = N_COMPONENTS,
) -> CalibratedClassifierCV:
    """The chosen config fit on all training rows, calibrated on the inner speaker folds
    (``solver``, ``n_components``: :func:`make_model`)."""
    splits = inner_splits(speakers_train, fold_map)
    model = make_calibrated_svm(params, cv=splits, solver=solver, n_components=n_components)
    return model.fit(X_train, y_train)


def predict_labels(model: CalibratedClassifierCV, X: np.ndarray) -> np.ndarray:
    """The SVC's own decision (``SVC.predict`` of the pipeline fit on all training rows, the
    rule :func:`inner_cv_score` selects by; the approximation's ``predict`` likewise), not the
    argmax of the calibrated probabilities."""
    svc = model.calibrated_classifiers_[0].estimator  # ensemble=False: fit on all rows
    return svc.predict(X).astype(np.int64)


def class_probabilities(
    model: CalibratedClassifierCV, X: np.ndarray, num_classes: int
) -> np.ndarray:
    """(rows, ``num_classes``) probabilities of a fitted model; a class it never saw gets 0."""
    proba = np.zeros((len(X), num_classes), dtype=np.float64)
    proba[:, model.classes_] = model.predict_proba(X)
    return proba / proba.sum(axis=1, keepdims=True)


def best_config(rows: Iterable[tuple[Mapping[str, Any], float]]) -> tuple[dict[str, Any], float]:
    """The config of highest inner UA; ties go to the first in canonical (sorted-key) order."""
    ranked = sorted(
        ((svm_params(c), float(s)) for c, s in rows),
        key=lambda cs: (-round(cs[1], 12), repr(sorted(cs[0].items(), key=str))),
    )
    if not ranked:
        raise ValueError("no finished trials to choose a config from")
    return ranked[0]
