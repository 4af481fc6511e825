"""Progress inside long epochs: the loop's time-based lines (step, clips/s, running loss, ETA;
validation likewise), their way to the driver's console, and the stall watchdog they feed."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
from test_train_loop import LABELS, clips, tiny_config  # noqa: F401 - clips: a fixture

from ser_ray.distributed import console
from ser_ray.distributed.train_in_tune import FoldStalledError, stall_watchdog
from ser_ray.training.config import TrainConfig, build_model
from ser_ray.training.engine import seed_everything
from ser_ray.training.finetune import run_training
from ser_ray.training.progress import EpochProgress, format_duration

TRAIN_LINE = re.compile(
    r"^epoch 1/1: step (\d+)/4 \(\d+%\), [\d.]+ clips/s, loss [\d.]+(, ETA [\d.]+ (s|min))?$"
)
VAL_LINE = re.compile(r"^validation after epoch 1/1: clip (\d+)/16 \(\d+%\), [\d.]+ clips/s")


def test_a_line_at_most_every_interval_and_none_in_a_short_pass():
    now, lines = [0.0], []
    meter = EpochProgress("epoch 3/8", 100, lines.append, every_s=60, clock=lambda: now[0])
    for step in range(1, 101):  # 2 s and 16 clips per step, loss 0.5 a clip
        now[0] = 2.0 * step
        meter.update(clips=16, loss_sum=8.0)
    assert len(lines) == 3  # at 60 s, 120 s, 180 s
    assert lines[0] == "epoch 3/8: step 30/100 (30%), 8 clips/s, loss 0.5, ETA 2.3 min"
    assert lines[-1].startswith("epoch 3/8: step 90/100 (90%)") and "ETA 20 s" in lines[-1]
    short = []
    quick = EpochProgress("epoch 1/8", 10, short.append, every_s=60, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 5.0
        quick.update(clips=8, loss_sum=4.0)
    assert short == []  # a 50 s epoch prints nothing more than its epoch line
    off = EpochProgress("epoch 1/8", 10, short.append, every_s=0, clock=lambda: now[0])
    now[0] += 1000
    off.update(clips=8)
    assert short == []


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (42, 450, 4500, 7200)] == [
        "42 s",
        "7.5 min",
        "75.0 min",
        "2.0 h",
    ]


def test_the_loop_hands_train_and_validation_lines_when_the_interval_is_tiny(clips):  # noqa: F811
    lines: list[str] = []
    cfg = tiny_config(epochs=1, progress_every_s=1e-9, head_warmup_epochs=0)  # 4 steps
    seed_everything(cfg.seed)
    model, fe = build_model(cfg, list(LABELS))
    run_training(cfg, model, fe, clips, clips, on_progress=lines.append)
    train = [m for m in map(TRAIN_LINE.match, lines) if m]
    assert [int(m.group(1)) for m in train] == [1, 2, 3]  # step 4/4: the epoch's line says it
    assert all(m.group(2) for m in train)  # each with its ETA
    val = [m for m in map(VAL_LINE.match, lines) if m]
    assert val and 0 < int(val[-1].group(1)) < 16
    assert len(lines) == len(train) + len(val)
    assert TrainConfig().progress_every_s == 60  # the default: a short epoch prints none


def _trial(trial_id: str, fold: int, status: str = "RUNNING"):
    return SimpleNamespace(trial_id=trial_id, config={"fold": fold}, status=status)


def test_the_driver_prints_each_new_line_of_a_running_fold(monkeypatch, capsys):
    published = {console.progress_key("a"): "epoch 1/8: step 5/400 (1%), 3 clips/s, loss 2.1"}
    monkeypatch.setattr(console, "latest_progress", published.get)
    now, seen = [0.0], []
    callback = console.fold_progress_callback("wav2vec2", 8, seen.append, clock=lambda: now[0])
    running, done = _trial("a", 2), _trial("b", 3, status="TERMINATED")
    published[console.progress_key("b")] = "epoch 1/8: step 9/400"
    callback.on_step_begin(0, [running, done])
    callback.on_step_begin(0, [running, done])  # the same line again, and too soon: nothing
    now[0] = 5.0
    callback.on_step_begin(0, [running, done])  # still the same line: nothing
    published[console.progress_key("a")] = "validation after epoch 1/8: clip 32/64 (50%)"
    callback.on_step_begin(0, [running, done])  # within the poll interval: not yet
    now[0] = 6.5
    callback.on_step_begin(0, [running, done])
    assert capsys.readouterr().out.splitlines() == [
        "wav2vec2 fold 2 epoch 1/8: step 5/400 (1%), 3 clips/s, loss 2.1",
        "wav2vec2 fold 2 validation after epoch 1/8: clip 32/64 (50%)",
    ]
    assert seen == [running, running]
    forgotten = []
    monkeypatch.setattr(console, "forget_progress", forgotten.append)
    callback.on_trial_complete(0, [running, done], done)  # printed nothing: nothing to forget
    callback.on_trial_complete(0, [running, done], running)
    assert forgotten == [console.progress_key("a")]


def test_a_progress_line_keeps_the_stall_watchdog_quiet():
    now = [0.0]
    watchdog = stall_watchdog("wav2vec2", timeout_s=100, clock=lambda: now[0])
    trial = _trial("a", 1)
    watchdog.on_trial_start(0, [trial], trial)
    now[0] = 90.0
    watchdog.saw_progress(trial)  # a line inside the first epoch
    now[0] = 150.0
    watchdog.on_step_begin(0, [trial])  # 60 s since the line: alive
    now[0] = 200.0
    with pytest.raises(FoldStalledError, match="fold 1 made no progress for 110 s"):
        watchdog.on_step_begin(0, [trial])


def test_a_fold_trials_lines_reach_the_driver_console(ray_local, tmp_path, capsys):
    """A Tune trial (as a fold's) publishes two lines a second apart; the driver's callback
    prints both, prefixed with the fold, besides the trial's epoch line."""
    from ray import tune

    def trainable(config):
        key = console.progress_key(tune.get_context().get_trial_id())
        for step in (1, 2):
            console.publish_progress(key, f"epoch 1/1: step {step}/2 (50%), 4 clips/s, loss 1")
            time.sleep(2.5)
        tune.report({"epoch": 1, "train/loss": 1.0})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1}),
        param_space={"fold": tune.grid_search([4])},
        run_config=tune.RunConfig(
            storage_path=str(tmp_path),
            verbose=0,
            callbacks=[console.fold_progress_callback("demo", 1)],
        ),
    )
    assert not tuner.fit().errors
    out = capsys.readouterr().out.splitlines()
    assert "demo fold 4 epoch 1/1: step 1/2 (50%), 4 clips/s, loss 1" in out
    assert "demo fold 4 epoch 1/1: step 2/2 (50%), 4 clips/s, loss 1" in out
    assert "demo fold 4 epoch 1/1: train/loss 1" in out
    assert console.latest_progress(console.progress_key("x")) is None
