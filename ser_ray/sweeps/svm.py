"""Nested cross-validation of the MFCC + SVM baseline on Ray Tune (the Ray edge of svm.py).

For each outer fold k, the training speakers (the other folds) go — and only they go — to
a Tune search. Each trial scores configs by the inner speaker-grouped cross-validation of
:func:`ser_ray.models.svm.inner_cv_score` (UA, mean over the remaining folds). The best
config is refit on all training speakers and scores fold k once. The trials run in parallel,
one CPU each.

Ray touch-points: the ``Tuner`` of :func:`tune_folds_grid` (the grid search: one Tune run
for every outer fold, its trials (fold, batch of the grid); Tune's start and its trial
processes are paid once, not once per fold) and of :func:`tune_fold` (the Bayesian search, one
run per fold: each fold has its own searcher); ``ray.put`` of each fold's training rows, which
a trial fetches for its own fold only (the test rows are never passed);
``tune.report`` in :func:`svm_trial`. Searchers: ``grid`` (``tune.grid_search`` over
:func:`ser_ray.models.svm.svm_grid`) and ``bayes`` (Optuna TPE, seeded, asked in batches of
``max_concurrent_trials`` so that a fixed seed gives the same trials on every run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ser_ray.common import storage
from ser_ray.common.metrics import classification_metrics
from ser_ray.common.predictions import predictions_frame
from ser_ray.corpus.folds import check_no_leakage
from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed import console
from ser_ray.distributed.resources import SVM_TRIAL_RESOURCES, svm_concurrent_trials
from ser_ray.features import speaker_norm
from ser_ray.models import svm, svm_approx, svm_model

log = logging.getLogger(__name__)

SEARCHES = ("grid", "bayes")
METRIC = "inner_uar"


@dataclasses.dataclass(frozen=True)
class NestedSvmConfig:
    """Settings of one nested SVM cross-validation: the search, the folds, the features and
    the variant name results are filed under. Where its output goes is given apart
    (``storage_path``, ``models_dir`` of :func:`run_nested_svm`: local folders or URIs)."""

    search: str = dataclasses.field(
        default="grid", metadata={"help": "grid (fixed grid) or bayes (Optuna TPE)"}
    )
    num_samples: int = dataclasses.field(
        default=20, metadata={"help": "trials per outer fold of the bayes search"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the Bayesian searcher"})
    outer_folds: Sequence[int] | None = dataclasses.field(
        default=None, metadata={"help": "outer folds to run; None: all of the protocol"}
    )
    smoke_test: bool = dataclasses.field(
        default=False, metadata={"help": "the small version of the fixed grid"}
    )
    grid: Sequence[dict[str, Any]] | None = dataclasses.field(
        default=None, metadata={"help": "configs replacing the fixed grid of the grid search"}
    )
    max_concurrent_trials: int | None = dataclasses.field(
        default=None, metadata={"help": "trials at once; None: the cluster's CPUs"}
    )
    feature_set: str = dataclasses.field(
        default="mfcc", metadata={"help": "feature columns (models.svm.FEATURE_SETS)"}
    )
    speaker_normalise: bool = dataclasses.field(
        default=False, metadata={"help": "z-normalise each clip's features over its speaker"}
    )
    variant: str = dataclasses.field(
        default="svm", metadata={"help": "name of results, predictions and Tune experiments"}
    )
    encoder: str | None = dataclasses.field(
        default=None,
        metadata={"help": "feature set ssl: the frozen encoder whose pooled layers df holds"},
    )
    solver: str = dataclasses.field(
        default="auto",
        metadata={"help": "auto (by training clips), exact (kernel SVC) or approx (Nystroem + "
                  "linear classifier, successive halving); models.svm_approx"},
    )  # fmt: skip
    approx_min_clips: int = dataclasses.field(
        default=svm_approx.APPROX_MIN_CLIPS,
        metadata={"help": "auto: the approximation when an outer fold trains on more clips"},
    )
    approx_components: int = dataclasses.field(
        default=svm_approx.N_COMPONENTS, metadata={"help": "Nystroem components of approx"}
    )


@dataclasses.dataclass
class SvmResult:
    """Per-fold results and out-of-fold predictions of the nested SVM cross-validation.

    ``folds``: one dict per outer fold: ``fold``, ``test_actors``, ``n_test``,
    ``svm`` ({"accuracy", "uar", "macro_f1"} on the test fold), ``svm_params`` (chosen
    config), ``svm_search_s`` (wall time of the Tune run that searched it: with the grid, one
    run searched every fold), ``svm_inner`` (best inner UA, number of configs scored, the
    speakers every trial received, the inner validation folds, the Tune run's folder and the
    fold's trials' folders).
    ``predictions``: one row per clip of the tested folds.
    ``config``: the resolved settings of the run. Mean and std over folds:
    :func:`ser_ray.study.summary.fold_mean_std` of ``folds``.
    """

    folds: list[dict[str, Any]]
    predictions: pd.DataFrame
    config: dict[str, Any]


def svm_trial(
    config: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    speakers: np.ndarray,
    fold_map: dict[int, int],
    num_classes: int,
    solver: str = "exact",
    n_components: int = svm_approx.N_COMPONENTS,
) -> None:
    """Tune trainable: each config of ``config["svm"]`` (one config, or a batch of the grid)
    scored by inner speaker-grouped CV on the training rows.

    With ``solver="approx"`` a batch of several configs is searched by successive halving
    (:func:`ser_ray.models.svm_approx.halving_search`): only the last round's survivors are
    scored on every clip, and reported (accuracy and macro-F1 null: halving scores UA only).

    Reports the batch's best inner UA (``inner_uar``), every config's scores (``scores``, a
    JSON list of ``[config, uar, uar_std, accuracy, macro_f1]``), configs pruned early
    (``n_pruned``) and, for auditing, the speakers it received (``actors_seen``) and the speakers
    of each inner validation split (``inner_val_actors``), as strings.
    """
    from ray import tune

    batch = config.get("svm", config)
    batch = batch if isinstance(batch, list) else [batch]
    splits = svm.inner_splits(speakers, fold_map)
    scores, n_pruned = [], 0
    if solver == "approx" and len(batch) > 1:
        survivors, n_pruned = svm_approx.halving_search(
            batch, X, y, splits, _uar_scorer(num_classes), n_components
        )
        scores = [[svm.svm_params(p), uar, std, None, None] for p, uar, std in survivors]
    else:
        for params in batch:
            s = svm.inner_cv_score(params, X, y, splits, num_classes, solver, n_components)
            scores.append([params, s["uar"], s["uar_std"], s["accuracy"], s["macro_f1"]])
    val_speakers = [sorted(set(speakers[val].tolist())) for _, val in splits]
    tune.report(
        {
            METRIC: max(row[1] for row in scores),
            "scores": json.dumps(scores),
            "n_pruned": int(n_pruned),
            "n_rows": int(len(y)),
            "actors_seen": " ".join(map(str, sorted(set(speakers.tolist())))),
            "inner_val_actors": "|".join(" ".join(map(str, a)) for a in val_speakers),
        }
    )


def _uar_scorer(num_classes: int) -> Any:
    """UA as a scikit-learn scorer (the inner CV's metric), every class counted."""
    from sklearn.metrics import make_scorer

    def uar(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return classification_metrics(y_true, y_pred, num_classes)["uar"]

    return make_scorer(uar)


def svm_fold_trial(
    config: dict[str, Any],
    fold_rows: dict[int, Any],
    fold_map: dict[int, int],
    num_classes: int,
    solver: str = "exact",
    n_components: int = svm_approx.N_COMPONENTS,
) -> None:
    """Tune trainable of :func:`tune_folds_grid`: :func:`svm_trial` on the training rows of
    outer fold ``config["fold"]``, fetched here from the object store (``fold_rows``: one
    reference per fold to its ``(X, y, speakers)``; no other fold's rows are fetched)."""
    import ray

    X, y, speakers = ray.get(fold_rows[int(config["fold"])])
    svm_trial(config, X, y, speakers, fold_map, num_classes, solver, n_components)


def grid_trials(solver: str, max_concurrent_trials: int) -> int:
    """Trials one grid search is dealt into: one per trial slot for the exact SVC; one for
    the approximation, whose successive halving needs the whole grid in one trial."""
    return 1 if solver == "approx" else max_concurrent_trials


def grid_batches(grid_points: Sequence[dict[str, Any]], n_batches: int) -> list[list[dict]]:
    """The grid dealt round-robin into at most ``n_batches`` trials (one per trial slot):
    a trial then carries seconds of work instead of Tune's per-trial overhead for ~0.5 s, and
    each batch mixes fast and slow kernels.

    >>> grid_batches([{"C": c} for c in range(5)], 2)
    [[{'C': 0}, {'C': 2}, {'C': 4}], [{'C': 1}, {'C': 3}]]
    """
    n = max(1, min(n_batches, len(grid_points)))
    return [list(grid_points[i::n]) for i in range(n)]


def _optuna_space(trial: Any) -> None:
    """Define-by-run space of the Bayesian search (gamma only where the kernel uses it)."""
    kernel = trial.suggest_categorical("kernel", list(svm.KERNELS))
    if kernel == "linear":
        trial.suggest_float("C_linear", *svm.LINEAR_C_RANGE, log=True)
    else:
        trial.suggest_float("C", *svm.C_RANGE, log=True)
    trial.suggest_categorical("class_weight", list(svm.CLASS_WEIGHTS))
    if (
        kernel != "linear"
        and trial.suggest_categorical("gamma_mode", ["scale", "value"]) == "value"
    ):
        trial.suggest_float("gamma", *svm.GAMMA_RANGE, log=True)


def tune_fold(
    X: np.ndarray,
    y: np.ndarray,
    speakers: np.ndarray,
    *,
    search: str,
    num_samples: int,
    fold_map: dict[int, int],
    num_classes: int,
    seed: int,
    storage_path: str | os.PathLike,
    name: str,
    smoke_test: bool = False,
    grid: Sequence[dict[str, Any]] | None = None,
    max_concurrent_trials: int | None = None,
    solver: str = "exact",
    n_components: int = svm_approx.N_COMPONENTS,
) -> dict[str, Any]:
    """Search SVM configs on one outer fold's training rows with Ray Tune.

    Returns ``{"params", "inner_uar", "search_s", "n_trials", "n_pruned", "actors_seen",
    "inner_val_actors", "experiment_path"}``. ``num_samples`` is the trial budget of
    ``bayes``; ``grid`` runs every point of ``grid`` once (default
    :func:`ser_ray.models.svm.svm_grid`); with ``solver="approx"`` the grid is one trial's
    successive halving.
    """
    import ray
    from ray import tune

    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {SEARCHES}")
    if not ray.is_initialized():
        raise RuntimeError("connect to a Ray cluster (ray.init) before the SVM search")
    if max_concurrent_trials is None:
        max_concurrent_trials = svm_concurrent_trials()

    trainable = tune.with_resources(
        tune.with_parameters(
            svm_trial,
            X=X,
            y=y,
            speakers=np.asarray(speakers),
            fold_map=fold_map,
            num_classes=num_classes,
            solver=solver,
            n_components=n_components,
        ),
        SVM_TRIAL_RESOURCES,
    )
    grid_batches_n = grid_trials(solver, max_concurrent_trials)
    param_space, tune_config = _search_space(
        search, num_samples, seed, grid, smoke_test, max_concurrent_trials, grid_batches_n
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage.absolute(storage_path),
        verbose=console.search_verbosity(),
        callbacks=[console.no_trial_event_files()],  # a trial is no run of TensorBoard's
    )
    tuner = tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config, run_config=run_config
    )
    results, search_s = _fit(tuner)
    return _best_of_search(list(results), search_s, name, storage_path, results.experiment_path)


def tune_folds_grid(
    train_rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    fold_map: dict[int, int],
    num_classes: int,
    storage_path: str | os.PathLike,
    name: str,
    smoke_test: bool = False,
    grid: Sequence[dict[str, Any]] | None = None,
    max_concurrent_trials: int | None = None,
    solver: str = "exact",
    n_components: int = svm_approx.N_COMPONENTS,
) -> dict[int, dict[str, Any]]:
    """The grid search of every outer fold in one Tune run: ``train_rows`` maps each outer
    fold to its training rows ``(X, y, speakers)``; a trial scores one batch of the grid on one
    fold's rows (``solver="approx"``: the whole grid by successive halving, one trial per
    fold, so the folds spread over the trial slots). Returns, per fold, what
    :func:`tune_fold` returns for it (``search_s``: the whole run's wall time, every fold's
    search together; ``trial_paths``: the fold's trials)."""
    import ray
    from ray import tune

    if not ray.is_initialized():
        raise RuntimeError("connect to a Ray cluster (ray.init) before the SVM search")
    if max_concurrent_trials is None:
        max_concurrent_trials = svm_concurrent_trials()
    grid_points = list(grid) if grid is not None else svm.svm_grid(smoke_test)
    points = [svm.svm_params(c) for c in grid_points]
    trainable = tune.with_resources(
        tune.with_parameters(
            svm_fold_trial,
            fold_rows={k: ray.put(rows) for k, rows in train_rows.items()},
            fold_map=fold_map,
            num_classes=num_classes,
            solver=solver,
            n_components=n_components,
        ),
        SVM_TRIAL_RESOURCES,
    )
    n_batches = grid_trials(solver, max_concurrent_trials)
    tuner = tune.Tuner(
        trainable,
        param_space={
            "fold": tune.grid_search([int(k) for k in train_rows]),
            "svm": tune.grid_search(grid_batches(points, n_batches)),
        },
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            max_concurrent_trials=max_concurrent_trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.absolute(storage_path),
            verbose=console.search_verbosity(),
            callbacks=[console.no_trial_event_files()],  # a trial is no run of TensorBoard's
        ),
    )
    results, search_s = _fit(tuner)
    return {
        k: _best_of_search(
            [r for r in results if int(r.config["fold"]) == k],
            search_s,
            f"{name} fold {k}",
            storage_path,
            results.experiment_path,
        )
        for k in train_rows
    }


def _fit(tuner: Any) -> tuple[Any, float]:
    """Run a ``Tuner`` (RAY); its ``ResultGrid`` and wall seconds, or an error naming how many
    trials failed and the first one's error."""
    start_s = time.perf_counter()
    results = tuner.fit()
    search_s = time.perf_counter() - start_s
    if results.errors:
        raise RuntimeError(
            f"{len(results.errors)} SVM trials failed; first: {results.errors[0]!r}"
        ) from results.errors[0]
    return results, search_s


def _search_space(
    search: str,
    num_samples: int,
    seed: int,
    grid: Sequence[dict[str, Any]] | None,
    smoke_test: bool,
    max_concurrent_trials: int,
    n_grid_batches: int,
) -> tuple[dict[str, Any], Any]:
    """Tune's ``param_space`` and ``TuneConfig`` of ``search``: every grid point once, in
    ``n_grid_batches`` trials, or ``num_samples`` Optuna TPE trials asked in batches of
    ``max_concurrent_trials``."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    if search == "grid":
        grid_points = list(grid) if grid is not None else svm.svm_grid(smoke_test)
        points = [svm.svm_params(c) for c in grid_points]
        param_space = {"svm": tune.grid_search(grid_batches(points, n_grid_batches))}
        tune_config = tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=1,
            max_concurrent_trials=max_concurrent_trials,
            reuse_actors=True,
        )
        return param_space, tune_config
    searcher = ConcurrencyLimiter(
        OptunaSearch(space=_optuna_space, metric=METRIC, mode="max", seed=seed),
        max_concurrent=max_concurrent_trials,
        batch=True,  # ask only after a whole batch is told: same trials for the same seed
    )
    return {}, tune.TuneConfig(search_alg=searcher, num_samples=num_samples, reuse_actors=True)


def _best_of_search(
    results: Sequence[Any],
    search_s: float,
    name: str,
    storage_path: str | os.PathLike,
    experiment_path: str,
) -> dict[str, Any]:
    """The best config of a finished search (its Tune ``Result``s; ties broken by
    :func:`ser_ray.models.svm.best_config`'s fixed rule, never by completion order) and what
    its trials saw: the dict :func:`tune_fold` returns (``n_trials``: configs scored). Tune
    gives paths inside the storage's filesystem (``bucket/…`` for ``s3://bucket/…``); they
    are recorded as locations, the storage's scheme put back."""
    scheme = storage.uri_prefix(storage_path)
    rows, seen, val_splits, n_pruned = [], set(), set(), 0
    for result in results:
        rows += [(params, uar) for params, uar, *_ in json.loads(result.metrics["scores"])]
        n_pruned += int(result.metrics.get("n_pruned", 0))
        seen.update(int(a) for a in result.metrics["actors_seen"].split())
        val_splits.add(result.metrics["inner_val_actors"])
    params, inner_uar = svm.best_config(rows)
    log.debug(
        "%s: best inner UA %.3f with %s (%d trials, %.1f s)",
        name,
        inner_uar,
        params,
        len(rows),
        search_s,
    )
    return {
        "params": params,
        "inner_uar": inner_uar,
        "search_s": search_s,
        "n_trials": len(rows),
        "n_pruned": n_pruned,
        "actors_seen": sorted(seen),
        "inner_val_actors": [
            [[int(a) for a in part.split()] for part in s.split("|")] for s in sorted(val_splits)
        ],
        "experiment_path": scheme + experiment_path,
        "trial_paths": sorted(scheme + str(result.path) for result in results),
    }


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The features table as the SVM reads it: one row per clip, in table order."""

    table: pd.DataFrame  # path, actor (int), fold (of the protocol), features...
    X: np.ndarray  # the feature set's columns side by side (speaker-normalised if asked)
    y: np.ndarray  # class indices
    speakers: np.ndarray
    class_names: list[str]
    fold_map: dict[int, int]  # speaker -> outer fold
    protocol: Protocol
    solver: str  # exact or approx (models.svm_approx.choose_solver)


def run_nested_svm(
    df: pd.DataFrame,
    cfg: NestedSvmConfig,
    protocol: Protocol,
    *,
    storage_path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
) -> SvmResult:
    """Nested cross-validation of the SVM over the outer folds of ``protocol``.

    ``df`` is the features table (columns ``path``, ``actor``, ``emotion``, ``mfcc_stats``),
    clips of labels the protocol drops already left out; its ``fold`` column is the
    protocol's fold of ``actor``. ``cfg.outer_folds`` restricts the outer folds (default: all
    of the protocol). Tune results go to ``storage_path/<variant>_grid`` (every fold's
    grid search, one Tune run) or ``storage_path/<variant>_bayes_fold<k>``. ``cfg.grid``
    overrides the fixed grid of ``search="grid"`` (default
    :func:`ser_ray.models.svm.svm_grid`); ``cfg.smoke_test`` picks its small version. Needs a
    running Ray instance (``ray.init``).

    ``cfg.feature_set`` picks the columns (:data:`ser_ray.models.svm.FEATURE_SETS`). With
    ``cfg.speaker_normalise`` every clip's features are z-normalised over its own speaker's clips
    (:mod:`ser_ray.features.speaker_norm`) before the pipeline's StandardScaler; since a speaker's
    statistics use only that speaker's clips, doing it once for all rows is the same as doing
    it inside each outer and inner fold (no statistic crosses speakers). Results, predictions
    and Tune experiments are named after ``cfg.variant`` (e.g. ``svm+spknorm``). With
    ``models_dir`` each fold's fitted model is saved there as ``fold_<k>.joblib``
    (:mod:`ser_ray.models.svm_model`, for ``jobs/predict.py --svm-models``). ``storage_path``
    and ``models_dir`` are locations (a local folder or a URI, :mod:`ser_ray.common.storage`):
    Tune and the fold models write there, from whichever node runs them.

    ``cfg.solver`` picks the solver of every fold: ``auto`` takes the kernel approximation
    (:mod:`ser_ray.models.svm_approx`) when the largest outer fold trains on more than
    ``cfg.approx_min_clips`` clips, the exact SVC otherwise (one solver for all folds, so
    their results compare); every fold record and the config name it.
    """
    rows, outer_folds = _read_rows(df, cfg, protocol)
    found = _search_folds(rows, outer_folds, cfg, storage_path)
    fold_results, prediction_parts = [], []
    for k in outer_folds:
        fold_result, predictions = _run_outer_fold(k, rows, cfg, found[k], models_dir)
        fold_results.append(fold_result)
        prediction_parts.append(predictions)
    return SvmResult(
        folds=fold_results,
        predictions=pd.concat(prediction_parts, ignore_index=True),
        config=_resolved_config(cfg, protocol, outer_folds, storage_path, rows.solver),
    )


def _read_rows(
    df: pd.DataFrame, cfg: NestedSvmConfig, protocol: Protocol
) -> tuple[_Rows, Sequence[int]]:
    """The rows with their outer fold under ``protocol``, and the outer folds to run
    (``cfg.outer_folds``, or all of the protocol)."""
    fold_map = protocol.fold_of_speaker()
    outer_folds = cfg.outer_folds if cfg.outer_folds is not None else protocol.fold_numbers
    df = df.reset_index(drop=True).copy()
    df["actor"] = df["actor"].astype(int)
    unknown = sorted(set(df["actor"]) - set(fold_map))
    if unknown:
        raise ValueError(f"speakers {unknown} have clips but no fold of the protocol")
    df["fold"] = df["actor"].map(fold_map).astype("int32")
    rows = _Rows(
        table=df,
        X=svm.feature_set_matrix(df, cfg.feature_set, cfg.speaker_normalise),
        y=svm.label_vector(df, protocol),
        speakers=df["actor"].to_numpy(),
        class_names=list(protocol.classes),
        fold_map=fold_map,
        protocol=protocol,
        solver="exact",
    )
    n_train = max(int(_fold_masks(rows, k)[1].sum()) for k in outer_folds)
    solver = svm_approx.choose_solver(cfg.solver, n_train, cfg.approx_min_clips)
    log.info(
        "%s: %s solver (up to %d training clips per fold; auto takes approx above %d)",
        cfg.variant,
        solver,
        n_train,
        cfg.approx_min_clips,
    )
    return dataclasses.replace(rows, solver=solver), outer_folds


def _fold_masks(rows: _Rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, training rows) of outer fold ``k``, checked: no speaker on both sides, some
    test clips."""
    speakers = rows.speakers
    test_speakers, train_speakers = rows.protocol.test_and_train(k)
    test_mask = np.isin(speakers, test_speakers)
    train_mask = np.isin(speakers, train_speakers)
    check_no_leakage(speakers[train_mask].tolist(), speakers[test_mask].tolist())
    if not test_mask.any():
        raise ValueError(f"fold {k} (speakers {test_speakers}) has no clips")
    return test_mask, train_mask


def _search_folds(
    rows: _Rows, outer_folds: Sequence[int], cfg: NestedSvmConfig, storage_path: str | os.PathLike
) -> dict[int, dict[str, Any]]:
    """Each outer fold's search on its training rows: the grid of every fold in one Tune run,
    the Bayesian search in one run per fold."""
    train_rows = {}
    for k in outer_folds:
        _, train_mask = _fold_masks(rows, k)
        train_rows[int(k)] = (rows.X[train_mask], rows.y[train_mask], rows.speakers[train_mask])
    variant = cfg.variant.replace("+", "_")
    common = {"fold_map": rows.fold_map, "num_classes": len(rows.class_names),
              "storage_path": storage_path, "smoke_test": cfg.smoke_test, "grid": cfg.grid,
              "max_concurrent_trials": cfg.max_concurrent_trials, "solver": rows.solver,
              "n_components": cfg.approx_components}  # fmt: skip
    if cfg.search == "grid":
        return tune_folds_grid(train_rows, name=f"{variant}_grid", **common)
    return {
        k: tune_fold(*train_rows[k], search=cfg.search, num_samples=cfg.num_samples,
                     seed=cfg.seed, name=f"{variant}_{cfg.search}_fold{k}", **common)
        for k in train_rows
    }  # fmt: skip


def _run_outer_fold(
    k: int,
    rows: _Rows,
    cfg: NestedSvmConfig,
    found: dict[str, Any],
    models_dir: str | os.PathLike | None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Outer fold ``k`` after its search (``found``): refit, test once on its test speakers,
    save the model; its result record and its test clips' predictions."""
    names, num_classes, speakers = rows.class_names, len(rows.class_names), rows.speakers
    test_speakers, _ = rows.protocol.test_and_train(k)
    test_mask, train_mask = _fold_masks(rows, k)
    X_train, y_train = rows.X[train_mask], rows.y[train_mask]
    leaked = sorted(set(found["actors_seen"]) & set(test_speakers))
    if leaked:  # cannot happen by construction; a guard for future edits
        raise RuntimeError(f"fold {k}: test speakers {leaked} reached the search")

    model = svm.fit_calibrated_svm(
        found["params"], X_train, y_train, speakers[train_mask], rows.fold_map,
        rows.solver, cfg.approx_components,
    )  # fmt: skip
    pred = svm.predict_labels(model, rows.X[test_mask])
    proba = svm.class_probabilities(model, rows.X[test_mask], num_classes)
    if models_dir is not None:
        svm_model.save_fold_model(
            storage.join(models_dir, f"fold_{k}.joblib"),
            svm_model.FoldModel(
                model, cfg.variant, cfg.feature_set, cfg.speaker_normalise, names, int(k),
                found["params"], cfg.encoder,
            ),
        )  # fmt: skip
    metrics = classification_metrics(rows.y[test_mask], pred, num_classes)
    log.info(
        "%s fold %d: test UA %.3f, accuracy %.3f (%s, inner UA %.3f, %d configs scored)",
        cfg.variant,
        k,
        metrics["uar"],
        metrics["accuracy"],
        found["params"],
        found["inner_uar"],
        found["n_trials"],
    )
    record = _fold_record(k, test_speakers, int(test_mask.sum()), metrics, found, cfg.variant)
    record[f"{cfg.variant}_solver"] = rows.solver
    columns = {
        **rows.table.loc[test_mask, ["path", "actor", "fold"]].to_dict("series"),
        "true_label": [names[i] for i in rows.y[test_mask]],
        "pred_label": [names[i] for i in pred],  # SVC.predict's, not the argmax of proba
        "model": cfg.variant,
    }
    return record, predictions_frame(columns, proba, names)


def _fold_record(
    k: int,
    test_speakers: Sequence[int],
    n_test: int,
    metrics: dict[str, float],
    found: dict[str, Any],
    variant: str,
) -> dict[str, Any]:
    """One outer fold's entry of :attr:`SvmResult.folds`."""
    return {
        "fold": int(k),
        "test_actors": [int(a) for a in test_speakers],
        "n_test": n_test,
        variant: metrics,
        f"{variant}_params": found["params"],
        f"{variant}_search_s": float(found["search_s"]),
        f"{variant}_inner": {
            "best_inner_uar": float(found["inner_uar"]),
            "n_trials": int(found["n_trials"]),
            "n_pruned": int(found.get("n_pruned", 0)),
            "actors_seen": found["actors_seen"],
            "inner_val_actors": found["inner_val_actors"],
            "experiment_path": str(found["experiment_path"]),
            "trial_paths": found["trial_paths"],
        },
    }


def _resolved_config(
    cfg: NestedSvmConfig,
    protocol: Protocol,
    outer_folds: Sequence[int],
    storage_path: str | os.PathLike,
    solver: str,
) -> dict[str, Any]:
    """The resolved settings of the run (:attr:`SvmResult.config`)."""
    grid_points = (
        [svm.svm_params(c) for c in cfg.grid]
        if cfg.grid is not None
        else svm.svm_grid(cfg.smoke_test)
    )
    return {
        "model": cfg.variant,
        "search": cfg.search,
        "num_samples": cfg.num_samples if cfg.search == "bayes" else len(grid_points),
        "grid": grid_points if cfg.search == "grid" else None,
        "max_concurrent_trials": cfg.max_concurrent_trials,
        "scheme": protocol.scheme,  # here "folds" lists the outer folds run
        "label_map": dict(protocol.label_map),
        "class_names": list(protocol.classes),
        "seed": cfg.seed,
        "folds": [int(k) for k in outer_folds],
        "smoke_test": cfg.smoke_test,
        "solver_setting": cfg.solver,
        "approx_min_clips": cfg.approx_min_clips,
        "solver": solver,
        "solver_description": svm_approx.describe(solver, cfg.approx_components),
        "inner_cv": "leave one remaining outer fold out (speakers of the other folds), metric UA",
        "decision_rule": "SVC.predict, in the inner CV (selection) and on the test fold "
        "(pred_label, metrics) alike",
        "probabilities": "sigmoid calibration on the inner speaker folds (ensemble=False) around "
        "the same SVC; their argmax may differ from pred_label on a few clips",
        "feature_set": cfg.feature_set,
        "feature_columns": list(svm.FEATURE_SETS[cfg.feature_set]),
        "encoder": cfg.encoder,
        "normalisation": speaker_norm.DESCRIPTION if cfg.speaker_normalise else speaker_norm.NONE,
        "storage_path": storage.absolute(storage_path),
    }
