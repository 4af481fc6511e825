"""A Ray Train run inside a Tune trial hands every report to Tune and ends; a stuck trial fails
the run with a message instead of hanging it (ser_ray.distributed.train_in_tune).

The race these tests pin down: with Ray's ``TuneReportCallback`` a trial deadlocks when its Train
run ends before the Tune driver has taken the last report. A driver that is slow to ask for
results (here: a callback that pauses before the last report, as a busy two-core machine can)
makes it near certain; with the production hand-off the same runs end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle

from ser_ray.distributed.train_in_tune import FoldStalledError, checked_report, stall_watchdog

# the trial functions below go to Ray workers by value: they cannot import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPORTS = 3
DRIVER_PAUSE_S = 10
STALL_S = 60  # the watchdog: a deadlocked trial fails the run instead of hanging the suite


def _train_loop(config):
    import tempfile
    from pathlib import Path

    import ray.train

    for epoch in range(1, REPORTS):
        ray.train.report({"epoch": epoch, "val/uar": epoch / 10})
    with tempfile.TemporaryDirectory() as folder:  # the last report carries a checkpoint
        (Path(folder) / "result.json").write_text(f"fold {config['fold']}")
        checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"epoch": REPORTS, "val/uar": REPORTS / 10}, checkpoint=checkpoint)


def _fold_trial(config, storage):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ser_ray.distributed.train_in_tune import fit_reporting_to_tune

    def build(callbacks):
        return TorchTrainer(
            _train_loop,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.1}),
            train_loop_config={"fold": config["fold"]},
            run_config=RunConfig(
                name=f"fold_{config['fold']}", storage_path=storage, callbacks=callbacks
            ),
        )

    result = fit_reporting_to_tune(build)
    assert result.error is None


def _slow_driver():
    from ray import tune

    class SlowDriver(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("epoch") == REPORTS - 1:
                # the driver asks for the last report only after the Train run has ended
                time.sleep(DRIVER_PAUSE_S)

    return SlowDriver()


def _run_folds(trainable, tmp_path, callbacks, folds=(1, 2)):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.01}),
        param_space={"fold": tune.grid_search(list(folds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=len(folds)),
        run_config=tune.RunConfig(
            name="folds", storage_path=str(tmp_path / "ray"), verbose=0, callbacks=callbacks
        ),
    )
    return tuner.fit()


def test_every_report_reaches_tune_and_the_folds_end_with_a_slow_driver(ray_local, tmp_path):
    from ray import tune

    trainable = tune.with_parameters(_fold_trial, storage=str(tmp_path / "train"))
    grid = _run_folds(trainable, tmp_path, [_slow_driver(), stall_watchdog("test", STALL_S)])
    assert grid.num_errors == 0
    for result in grid:
        epochs = result.metrics_dataframe["epoch"].dropna().tolist()
        assert epochs == list(range(1, REPORTS + 1)), result.config
        assert result.metrics["val/uar"] == pytest.approx(REPORTS / 10)
        saved = Path(result.metrics["checkpoint_path"]) / "result.json"
        assert saved.read_text() == f"fold {result.config['fold']}"
    # each Train run shut its workers down before its trial ended: no CPUs left reserved
    states = [group["state"] for group in ray.util.placement_group_table().values()]
    assert states and set(states) == {"REMOVED"}, states


def test_a_report_with_a_key_tune_acts_on_is_refused():
    report = {"epoch": 3, "val/uar": 0.5}
    assert checked_report(report) is report
    with pytest.raises(ValueError, match=r"\['done'\].*rename it"):
        checked_report({"epoch": 3, "done": True})


def _stuck_trial(config):
    from ray import tune

    tune.report({"epoch": 1})
    time.sleep(600)  # a fold whose next epoch never comes


def test_the_watchdog_fails_a_stuck_fold_naming_it_and_what_it_waited_for(ray_local, tmp_path):
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        _run_folds(_stuck_trial, tmp_path, [stall_watchdog("wav2vec2", 3)], folds=(4,))
    assert time.monotonic() - started < 60
    message = "".join(str(e) for e in _chain(raised.value))
    assert "wav2vec2 fold 4 made no progress" in message
    assert "waiting for the result after epoch 1" in message
    assert any(isinstance(e, FoldStalledError) for e in _chain(raised.value))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_the_watchdog_waits_while_results_come_and_can_be_turned_off():
    now = [0.0]
    watchdog = stall_watchdog("svm", 10, clock=lambda: now[0])
    trial = type("Trial", (), {"trial_id": "t1", "config": {"fold": 2}})()
    watchdog.on_trial_start(0, [], trial)
    now[0] = 9.0
    watchdog.on_step_begin(1, [])
    watchdog.on_trial_result(1, [], trial, {"epoch": 3})
    now[0] = 18.0
    watchdog.on_step_begin(2, [])  # 9 s since the last result
    now[0] = 19.5
    with pytest.raises(FoldStalledError, match="svm fold 2 .* after epoch 3"):
        watchdog.on_step_begin(3, [])
    watchdog.on_trial_complete(3, [], trial)
    watchdog.on_step_begin(4, [])  # a finished trial is not waited for

    off = stall_watchdog("svm", 0, clock=lambda: now[0])
    off.on_trial_start(0, [], trial)
    now[0] = 1e9
    off.on_step_begin(1, [])
