"""Nested cross-validation of the SVM on Ray Tune, on the demo corpus's features.

Kept small for 2 cores: a two-point grid for the six-fold run, and one outer fold with a
few trials for the Bayesian searcher and the job.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ser_ray.common.metrics import classification_metrics
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.corpus.ravdess import class_names
from ser_ray.features import featurize
from ser_ray.models import svm
from ser_ray.study import summary
from ser_ray.sweeps.svm import NestedSvmConfig, run_nested_svm

pytestmark = pytest.mark.usefixtures("ray_local")

TINY_GRID = [
    {"kernel": "rbf", "C": 1.0, "gamma": "scale", "class_weight": None},
    {"kernel": "linear", "C": 0.01, "class_weight": "balanced"},
]
NAMES = class_names()
RAVDESS = ravdess_protocol()
PROB_COLUMNS = [f"prob_{n}" for n in NAMES]


@pytest.fixture(scope="module")
def demo_df(demo_features) -> pd.DataFrame:
    return featurize.load_features(
        demo_features / "features", columns=["path", "actor", "emotion", "mfcc_stats"]
    )


@pytest.fixture(scope="module")
def grid_run(demo_df, tmp_path_factory):
    storage = tmp_path_factory.mktemp("svm_grid") / "tune"
    return run_nested_svm(
        demo_df,
        NestedSvmConfig(search="grid", grid=TINY_GRID, seed=0),
        RAVDESS,
        storage_path=storage,
    )


def test_test_speakers_never_reach_the_search(grid_run):
    assert [f["fold"] for f in grid_run.folds] == [1, 2, 3, 4, 5, 6]
    # the grid of every fold in one Tune run (its start and trial processes paid once)
    assert len({f["svm_inner"]["experiment_path"] for f in grid_run.folds}) == 1
    for f in grid_run.folds:
        test_speakers, train_speakers = RAVDESS.test_and_train(f["fold"])
        assert f["test_actors"] == test_speakers
        inner = f["svm_inner"]
        # what the trials reported they received: the training speakers, nothing else
        assert inner["actors_seen"] == train_speakers
        assert inner["n_trials"] == len(TINY_GRID)
        (val_folds,) = inner["inner_val_actors"]  # every trial used the same inner splits
        assert len(val_folds) == 5
        assert sorted(a for v in val_folds for a in v) == train_speakers
        assert not {a for v in val_folds for a in v} & set(test_speakers)
        # and the same from the Tune results on disk (one result.json per trial): the fold's
        # trials, in the one Tune run that searched every fold's grid
        results = [Path(trial) / "result.json" for trial in inner["trial_paths"]]
        assert len(results) == len(TINY_GRID)
        for path in results:
            assert path.parent.parent == Path(inner["experiment_path"])
            assert json.loads((path.parent / "params.json").read_text())["fold"] == f["fold"]
            reported = json.loads(path.read_text().splitlines()[-1])
            seen = {int(a) for a in reported["actors_seen"].split()}
            assert seen == set(train_speakers) and not seen & set(test_speakers)
            assert reported["n_rows"] == 20 * 16  # 20 speakers x 16 demo clips


def test_out_of_fold_predictions(grid_run, demo_df):
    pred = grid_run.predictions
    assert list(pred.columns) == [
        "path", "actor", "fold", "true_label", "pred_label", "model", *PROB_COLUMNS
    ]  # fmt: skip
    summary.check_coverage(pred, demo_df["path"])  # every clip exactly once
    assert (pred["model"] == "svm").all()
    assert len(pred) == len(demo_df) == 24 * 16
    probs = pred[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    # pred_label is SVC.predict (the rule the inner CV selected on), mostly the probs' argmax
    assert (pred["pred_label"] == [NAMES[i] for i in probs.argmax(axis=1)]).mean() > 0.9
    truth = dict(zip(demo_df["path"], demo_df["emotion"], strict=True))
    assert (pred["true_label"] == pred["path"].map(truth)).all()
    for f in grid_run.folds:
        rows = pred[pred["fold"] == f["fold"]]
        assert sorted(rows["actor"].unique()) == f["test_actors"]
        assert len(rows) == f["n_test"] == 4 * 16
        y_true = [NAMES.index(n) for n in rows["true_label"]]
        y_pred = [NAMES.index(n) for n in rows["pred_label"]]
        assert classification_metrics(y_true, y_pred, 8) == pytest.approx(f["svm"])


def test_demo_corpus_ua_well_above_chance(grid_run):
    mean = summary.fold_mean_std(grid_run.folds)[0]["svm"]
    assert mean["uar"] >= 2 / 8  # two times chance
    for f in grid_run.folds:
        assert f["svm_params"] in TINY_GRID
        assert f["svm_inner"]["best_inner_uar"] > 1 / 8
        assert f["svm_search_s"] > 0


def test_grid_and_bayes_repeat_with_a_fixed_seed(grid_run, demo_df, tmp_path):
    # the grid in one trial (one at a time) vs the fixture's two trials at once: the same
    # choice, inner score and test metrics whatever the concurrency
    again = run_nested_svm(
        demo_df,
        NestedSvmConfig(search="grid", grid=TINY_GRID, outer_folds=[3], max_concurrent_trials=1),
        RAVDESS,
        storage_path=tmp_path / "grid",
    )
    first = grid_run.folds[2]
    assert again.folds[0]["svm_params"] == first["svm_params"]
    inner = again.folds[0]["svm_inner"]
    assert inner["best_inner_uar"] == first["svm_inner"]["best_inner_uar"]
    assert inner["n_trials"] == len(TINY_GRID)  # configs scored
    assert len(inner["trial_paths"]) == 1  # one trial
    assert len(list(Path(inner["experiment_path"]).glob("*/params.json"))) == 1
    assert again.folds[0]["svm"] == first["svm"]
    pd.testing.assert_frame_equal(
        again.predictions,
        grid_run.predictions[grid_run.predictions["fold"] == 3].reset_index(drop=True),
    )

    runs = [
        run_nested_svm(
            demo_df,
            NestedSvmConfig(search="bayes", num_samples=4, seed=7, outer_folds=[1]),
            RAVDESS,
            storage_path=tmp_path / f"bayes{i}",
        )
        for i in range(2)
    ]
    a, b = (r.folds[0] for r in runs)
    assert a["svm_params"] == b["svm_params"]
    assert a["svm_inner"]["best_inner_uar"] == b["svm_inner"]["best_inner_uar"]
    assert a["svm"] == b["svm"] and a["svm_inner"]["n_trials"] == 4
    pd.testing.assert_frame_equal(runs[0].predictions, runs[1].predictions)
    # the four trials of one run are four different configs from the Bayesian space
    configs = [
        json.loads(p.read_text())
        for p in Path(a["svm_inner"]["experiment_path"]).glob("*/params.json")
    ]
    assert len(configs) == 4 and len({json.dumps(c, sort_keys=True) for c in configs}) == 4
    for c in configs:
        low, high = svm.LINEAR_C_RANGE if c["kernel"] == "linear" else svm.C_RANGE
        assert low <= svm.svm_params(c)["C"] <= high


def test_job_writes_its_outputs(demo_features, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "tune_svm_job", Path(__file__).parents[1] / "jobs" / "tune_svm.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "run"
    args = ["--features", str(demo_features / "features"), "--search", "bayes"]
    args += ["--num-samples", "2", "--outer-folds", "2", "--merge-calm", "--out", str(out)]
    assert job.main(args) == 0

    folds_json = json.loads((out / "svm_folds.json").read_text())
    (fold,) = folds_json["folds"]
    assert fold["fold"] == 2 and fold["test_actors"] == [5, 6, 7, 8] and fold["n_test"] == 64
    assert folds_json["mean"]["uar"] == pytest.approx(fold["svm"]["uar"])
    pred = pd.read_csv(out / "predictions_svm.csv")
    assert len(pred) == 64 and set(pred["actor"]) == {5, 6, 7, 8}
    merged = [f"prob_{n}" for n in class_names(merge_calm=True)]
    assert [c for c in pred.columns if c.startswith("prob_")] == merged  # 7 classes
    assert "calm" not in set(pred["true_label"])
    config = json.loads((out / "config.json").read_text())
    assert config["search"] == "bayes" and config["label_map"]["calm"] == "neutral"
    assert config["scheme"] == "contiguous" and "calm" not in config["class_names"]
    assert config["num_samples"] == 2 and config["folds"] == [2]
    assert list((out / "tune").glob("svm_bayes_fold2/*/result.json"))
    printed = capsys.readouterr().out
    assert "| 2 | 5,6,7,8 | 64 |" in printed and "mean ± std" in printed


def test_job_reference_with_speaker_norm_on_both_feature_sets(demo_features, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "tune_svm_job", Path(__file__).parents[1] / "jobs" / "tune_svm.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "run"
    args = ["--features", str(demo_features / "features"), "--search", "reference"]
    args += ["--speaker-norm", "--svm-features", "mfcc+egemaps", "--outer-folds", "2"]
    assert job.main([*args, "--out", str(out)]) == 0

    variant = "svm+mfcc+egemaps+spknorm"
    (fold,) = json.loads((out / "svm_folds.json").read_text())["folds"]
    assert fold[f"{variant}_params"] == svm.svm_params(svm.REFERENCE_PARAMS)
    assert set(pd.read_csv(out / "predictions_svm.csv")["model"]) == {variant}
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == variant and config["feature_set"] == "mfcc+egemaps"
    assert config["feature_columns"] == ["mfcc_stats", "egemaps"]
    assert config["normalisation"].startswith("per-speaker z-normalisation")
    assert config["grid"] == [svm.svm_params(svm.REFERENCE_PARAMS)]
    printed = capsys.readouterr().out
    assert f"{variant}: mfcc+egemaps features, normalisation: per-speaker" in printed


def test_above_the_threshold_the_approx_solver_prunes_and_predicts_probabilities(
    grid_run, demo_df, tmp_path
):
    """The threshold reaches the run: the demo's 320 training clips per fold exceed 100, so
    ``auto`` takes the kernel approximation, its grid searched by successive halving in one
    trial per fold; the predictions keep the contract (probabilities summing to 1)."""
    assert {f["svm_solver"] for f in grid_run.folds} == {"exact"}  # default threshold: exact
    run = run_nested_svm(
        demo_df,
        NestedSvmConfig(smoke_test=True, outer_folds=[2, 5], approx_min_clips=100,
                        approx_components=100),
        RAVDESS,
        storage_path=tmp_path / "approx",
    )  # fmt: skip
    assert run.config["solver"] == "approx" and "Nystroem" in run.config["solver_description"]
    grid = svm.svm_grid(smoke_test=True)
    for f in run.folds:
        inner = f["svm_inner"]
        assert f["svm_solver"] == "approx"
        assert len(inner["trial_paths"]) == 1  # the fold's whole grid in one trial
        assert inner["n_pruned"] > 0 and inner["n_trials"] + inner["n_pruned"] == len(grid)
        assert f["svm_params"] in grid
    probs = run.predictions[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert summary.fold_mean_std(run.folds)[0]["svm"]["uar"] >= 2 / 8  # two times chance
