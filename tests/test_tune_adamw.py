"""Bayesian AdamW sweep (Optuna TPE + ASHA on Ray Tune) on the demo corpus's features.

One small sweep (4 trials x 2 epochs on outer fold 2) is shared by the tests; the searcher
and the scheduler are also checked on their own, without training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.study.config import KFoldConfig
from ser_ray.study.params import train_config_for
from ser_ray.sweeps.adamw import (
    GRACE_RULE,
    METRIC,
    SEARCH_METRIC,
    SEARCHED_FIELDS,
    SearchSpace,
    SweepConfig,
    make_scheduler,
    make_searcher,
    params_from_config,
    run_sweep,
    sweep_train_config,
)
from ser_ray.training.config import TrainConfig

FOLD = 2
RAVDESS = ravdess_protocol()
SWEEP = SweepConfig(num_samples=4, train=sweep_train_config(epochs=2, seed=0))


@pytest.fixture(scope="module")
def sweep(ray_local, demo_features, tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw")
    result = run_sweep(demo_features / "features", SWEEP, out, RAVDESS, fold=FOLD)
    return out, result


def _reports(out: Path) -> list[list[dict]]:
    """Every report of every trial, from the Tune results on disk (one result.json each)."""
    files = sorted((out / "tune" / f"adamw_fold{FOLD}").glob("*/result.json"))
    return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]


def test_the_search_never_sees_the_test_fold(sweep):
    out, _ = sweep
    test_speakers, train_speakers = RAVDESS.test_and_train(FOLD)
    _, fit_speakers, val_speakers = RAVDESS.split(FOLD)
    assert test_speakers == [5, 6, 7, 8]
    trials = _reports(out)
    assert len(trials) == SWEEP.num_samples
    for reports in trials:
        assert 1 <= len(reports) <= SWEEP.train.epochs
        for r in reports:  # the speakers of the rows the trial actually received
            fit = [int(a) for a in r["fit_actors"].split()]
            val = [int(a) for a in r["val_actors"].split()]
            assert fit == fit_speakers and val == val_speakers
            assert sorted(fit + val) == train_speakers
            assert not set(fit + val) & set(test_speakers)
            assert (r["n_train"], r["n_val"]) == (16 * 16, 4 * 16)  # 16 demo clips per speaker
            assert 0.0 <= r[METRIC] <= 1.0


def test_best_json_fields_and_values(sweep):
    out, result = sweep
    best = json.loads((out / "best.json").read_text())
    assert best == json.loads(json.dumps(result.best))
    assert set(best) == {"params", "val_uar", "fold", "search"}
    assert best["fold"] == FOLD and best["search"]["fold"] == FOLD
    assert set(best["params"]) == set(SEARCHED_FIELDS)
    assert SearchSpace().contains(best["params"])
    assert best["params"]["betas"][0] == 0.9
    # val_uar is the best val UA any trial reached at any epoch, and belongs to these params
    per_trial = [max(r[METRIC] for r in reports) for reports in _reports(out)]
    assert best["val_uar"] == pytest.approx(max(per_trial))
    top = result.trials[FOLD].iloc[0]
    assert top["val_uar"] == pytest.approx(best["val_uar"])
    assert params_from_config(top["config"]) == best["params"]
    search = best["search"]
    assert search["test_actors"] == [5, 6, 7, 8]
    assert "only fold 2's test score" in search["note"]
    assert search["searcher"] == {"type": "OptunaSearch", "sampler": "TPESampler", "seed": 0}
    assert search["n_trials"] == 4 and search["max_concurrent_trials"] == 2
    assert (out / f"trials_fold{FOLD}.csv").exists()
    # TensorBoard event files per trial, for the dashboard
    assert len(list((out / "tune" / f"adamw_fold{FOLD}").glob("*/events.out.tfevents.*"))) == 4


def test_asha_is_wired(sweep):
    out, _ = sweep
    scheduler = json.loads((out / "best.json").read_text())["search"]["scheduler"]
    assert scheduler == {
        "type": "ASHAScheduler",
        "metric": "val/uar",
        "mode": "max",
        "time_attr": "training_iteration",
        "max_t": 2,
        "grace_period": 1,
        "reduction_factor": 2,
        "grace_rule": GRACE_RULE,
    }
    for reports in _reports(out):  # one report per epoch: training_iteration counts epochs
        assert [r["training_iteration"] for r in reports] == [r["epoch"] for r in reports]


def test_asha_stops_the_weaker_trial_after_the_grace_period():
    class Stub:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id

    cfg = SweepConfig(train=sweep_train_config(epochs=8))
    assert cfg.grace_period == 3  # a third of the epochs, after the longest warm-up (2 epochs)
    scheduler = make_scheduler(cfg)
    good, bad = Stub("good"), Stub("bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    for epoch in (1, 2):  # no cut while warm-ups under search may still hold the LR down
        for trial, uar in ((good, 0.5), (bad, 0.2)):
            result = {"training_iteration": epoch, METRIC: uar}
            assert scheduler.on_trial_result(None, trial, result) == "CONTINUE"
    assert (
        scheduler.on_trial_result(None, good, {"training_iteration": 3, METRIC: 0.5}) == "CONTINUE"
    )
    assert scheduler.on_trial_result(None, bad, {"training_iteration": 3, METRIC: 0.2}) == "STOP"


def test_grace_period_must_fit_the_search_space():
    assert SweepConfig(train=sweep_train_config(epochs=2)).grace_period == 1
    assert SweepConfig(train=sweep_train_config(epochs=12)).grace_period == 4
    long_warmup = SearchSpace(warmup_frac=(0.0, 0.5), decay_start_frac=(0.5, 1.0))
    assert (
        SweepConfig(train=sweep_train_config(epochs=8), space=long_warmup).grace_period == 4
    )  # warm-up up to epoch 4
    with pytest.raises(ValueError, match="favours short warm-ups"):
        SweepConfig(train=sweep_train_config(epochs=8), grace_period=1)
    assert SweepConfig(train=sweep_train_config(epochs=8), grace_period=8).grace_period == 8


def test_same_seed_same_configs(sweep):
    def sample(seed: int, n: int = 4) -> list[dict]:
        searcher = make_searcher(SearchSpace(), seed, max_concurrent=n)
        return [searcher.suggest(f"t{i}") for i in range(n)]

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    for config in first:
        assert SearchSpace().contains(params_from_config(config))
        assert ("grad_clip_norm" in config) == (config["grad_clip"] == "on")
    # the sweep asked the same searcher two at a time: its first batch is this seed's first two
    out, result = sweep
    ran = [dict(c) for c in result.trials[FOLD]["config"]]
    assert first[0] in ran and first[1] in ran


def test_searcher_learns_from_the_best_epoch():
    searcher = make_searcher(SearchSpace(), 0, max_concurrent=1)
    assert searcher.searcher.metric == SEARCH_METRIC == "best/val_uar"
    assert searcher.searcher.mode == "max"


def test_kfold_refuses_a_single_fold_best_json_unless_allowed(sweep):
    out, _ = sweep
    best = json.loads((out / "best.json").read_text())["params"]
    with pytest.raises(ValueError, match="tune_adamw.py --nested"):
        train_config_for(KFoldConfig(params=str(out / "best.json")), 1)
    cfg = train_config_for(KFoldConfig(params=str(out / "best.json"), allow_leaky_params=True))
    assert isinstance(cfg, TrainConfig)
    for name in SEARCHED_FIELDS:
        expected = tuple(best[name]) if name == "betas" else best[name]
        assert getattr(cfg, name) == expected
    # kfold's own flags still decide epochs, batch size and model
    assert (cfg.epochs, cfg.batch_size, cfg.model) == (8, 8, "demo")


def test_search_space_defaults_follow_the_model():
    assert SearchSpace.for_model("demo").lr_encoder == (1e-5, 1e-3)
    assert SearchSpace.for_model("facebook/wav2vec2-base").lr_encoder == (1e-5, 1e-4)
    assert SearchSpace.for_model("demo", lr_encoder=(2e-5, 5e-5)).lr_encoder == (2e-5, 5e-5)
    with pytest.raises(ValueError):
        SearchSpace(warmup_frac=(0.0, 0.5), decay_start_frac=(0.4, 1.0))
    off = params_from_config(
        {"lr_encoder": 1e-4, "lr_head": 1e-3, "weight_decay": 0.01, "beta2": 0.98,
         "warmup_frac": 0.1, "decay_start_frac": 0.7, "grad_clip": "off"}
    )  # fmt: skip
    assert off["grad_clip_norm"] is None and off["betas"] == [0.9, 0.98]
    assert TrainConfig.from_dict(off).betas == (0.9, 0.98)


def test_nested_sweeps_each_fold_on_its_own_training_speakers(ray_local, demo_features, tmp_path):
    outer = [3, 6]
    cfg = SweepConfig(num_samples=2, train=sweep_train_config(epochs=1, seed=0))
    result = run_sweep(
        demo_features / "features", cfg, tmp_path, RAVDESS, nested=True, outer_folds=outer
    )
    best = json.loads((tmp_path / "best.json").read_text())
    assert set(best) == {"per_fold", "note"} and list(best["per_fold"]) == ["3", "6"]
    for k in outer:
        found = best["per_fold"][str(k)]
        test_speakers, train_speakers = RAVDESS.test_and_train(k)
        assert found["search"]["test_actors"] == test_speakers
        assert SearchSpace().contains(found["params"]) and 0.0 <= found["val_uar"] <= 1.0
        trials = result.trials[k]
        assert len(trials) == 2
        for fit, val in zip(trials["fit_actors"], trials["val_actors"], strict=True):
            seen = [int(a) for a in f"{fit} {val}".split()]
            assert sorted(seen) == train_speakers and not set(seen) & set(test_speakers)
        assert len(list((tmp_path / "tune" / f"adamw_fold{k}").glob("*/result.json"))) == 2


def test_a_trial_streams_the_batches_of_the_study_fold(ray_local, demo_features, tmp_path):
    """For one fold and seed, an AdamW trial's clips (trial_clips) give, epoch by epoch, the
    batches (clip paths, in order) that the study fold's Train worker gets from its trainer's
    datasets (build_fold_trainer) with the same settings, windows smaller than the splits."""
    from ser_ray.distributed.fold_inputs import build_fold_inputs
    from ser_ray.distributed.fold_trainer import build_fold_trainer, open_fold_clips
    from ser_ray.distributed.fold_work import WORK_KEY, FoldWork
    from ser_ray.models.ssl import demo_feature_extractor
    from ser_ray.sweeps.adamw import trial_clips, trial_setup
    from ser_ray.training.clip_data import window_batches

    cfg = SWEEP
    train_cfg = dataclasses.replace(cfg.base_train_config(), window_clips=48, seed=3)
    inputs = build_fold_inputs(demo_features / "features", train_cfg, tmp_path / "cache")
    setup = trial_setup(inputs, FOLD, cfg, RAVDESS).with_train(train_cfg)
    fe = demo_feature_extractor()
    trial = trial_clips(setup, fe)

    trainer = build_fold_trainer(
        FoldWork(train=train_cfg, inputs=inputs, fold=FOLD, protocol=RAVDESS)
    )
    shards = trainer.data_config.configure(
        trainer.datasets, world_size=1, worker_handles=None, worker_node_ids=None
    )[0]  # what its one worker's get_dataset_shard returns
    worker = open_fold_clips(trainer.train_loop_config[WORK_KEY], shards, fe)

    def paths(table, indices):
        return [table.paths[i] for i in indices]

    _, fit_speakers, val_speakers = RAVDESS.split(FOLD)
    for split, speakers in (("train", fit_speakers), ("val", val_speakers)):
        assert len(trial[split]) == len(worker[split]) == 16 * len(speakers)
        for epoch in (0, 1):
            kw = dict(seed=train_cfg.seed, epoch=epoch)
            got = list(window_batches(trial[split], paths, train_cfg.batch_size, **kw))
            want = list(window_batches(worker[split], paths, train_cfg.batch_size, **kw))
            assert got == want
            clips = [p for batch in got for p in batch]
            assert len(clips) == len(set(clips)) == len(trial[split])  # each clip once
    assert "test" not in trial and "test" in worker
