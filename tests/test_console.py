import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ser_ray.distributed import console


def test_a_fold_prints_its_first_epoch_then_a_line_at_most_every_30_s_and_its_end(capsys):
    now = [0.0]
    callback = console.fold_progress_callback("wav2vec2", epochs=4, clock=lambda: now[0])
    trial = SimpleNamespace(trial_id="t3", config={"fold": 3})
    for epoch, at_s in ((1, 5.0), (2, 20.0), (3, 36.0), (4, 50.0)):
        now[0] = at_s
        report = {"epoch": epoch, "step": 40 * epoch, "train/loss": 1.23456 / epoch,
                  "val/uar": 0.5 + epoch / 100, "train/lr": 1e-4, "best_epoch": min(epoch, 3),
                  "best/val_uar": 0.5 + min(epoch, 3) / 100}  # fmt: skip
        callback.on_trial_result(iteration=epoch, trials=[trial], trial=trial, result=report)
    callback.on_trial_result(
        iteration=2,
        trials=[trial],
        trial=trial,
        result={"epoch": 4, "final": True, "test/uar": 0.4},
    )
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    assert capsys.readouterr().out.splitlines() == [
        "wav2vec2 fold 3 epoch 1/4: train/loss 1.235, val/uar 0.51",  # its first
        "wav2vec2 fold 3 epoch 3/4: train/loss 0.4115, val/uar 0.53",  # 31 s later
        "wav2vec2 fold 3: done after epoch 4/4, best val/uar 0.53 (epoch 3)",
    ]


def test_pretraining_prints_a_loss_line_at_least_every_30_s():
    """The demo encoder's and TAPT's progress: the first epoch, then a line whenever 30 s have
    passed, and the last epoch; the closing report prints nothing."""
    now, lines = [0.0], []
    on_report = console.pretrain_progress(
        "demo encoder", 40, every_s=30, clock=lambda: now[0], emit=lines.append
    )
    for epoch in range(1, 41):  # 10 s per epoch
        now[0] = 10.0 * epoch
        on_report({"epoch": epoch, "pretrain/contrastive": 4.0 - epoch / 100, "pretrain/loss": 4.5})
    on_report({"final": True, "step": 1600})
    assert lines[0] == "demo encoder: epoch 1/40, contrastive 3.990, loss 4.500 (10 s)"
    shown = [int(line.split()[3].split("/")[0]) for line in lines]
    assert shown == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40]
    assert lines[-1].endswith("(400 s)")


def test_ray_output_follows_verbose(monkeypatch):
    for name in ("RAY_AIR_NEW_OUTPUT", "RAY_LOGGER_LEVEL", "TUNE_WARN_THRESHOLD_S"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.configure(verbose=False)
    assert console.tune_verbosity() == 0
    assert console.ray_init_kwargs() == {
        "logging_level": 30,  # WARNING
        "log_to_driver": False,  # workers' output stays in Ray's log files
    }
    assert os.environ["RAY_LOGGER_LEVEL"] == "warning"  # what Ray's workers read
    assert os.environ["TUNE_WARN_THRESHOLD_S"] == "10"  # Tune's slow-operation warnings
    console.configure(verbose=True)
    assert console.tune_verbosity() == 2 and console.ray_init_kwargs() == {}


QUIET_READ = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from ser_ray import cli
from ser_ray.distributed import console
from ser_ray.distributed.ingest import parquet_dataset
console.configure(verbose=sys.argv[2] == "verbose")
pq.write_table(pa.table({"path": ["a.wav"], "actor": [1]}), sys.argv[1] + "/part-0.parquet")
cli.init_ray(num_cpus=1)
print(parquet_dataset(sys.argv[1], ["path"]).take_all())
"""


@pytest.mark.slow
@pytest.mark.ray
def test_reading_features_on_ray_prints_no_ray_data_notices(tmp_path):
    """Ray Data's one-time notices (progress bars off, execution start) only with --verbose;
    in a fresh process, as every job starts (the notices are printed once per process)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-c", QUIET_READ, str(tmp_path)]
    runs = {
        mode: subprocess.run(
            command + [mode], capture_output=True, text=True, env=env, check=True, timeout=300
        )
        for mode in ("quiet", "verbose")
    }
    assert "a.wav" in runs["quiet"].stdout
    assert "Progress bars disabled" not in runs["quiet"].stderr, runs["quiet"].stderr
    assert "Progress bars disabled" in runs["verbose"].stderr  # the notice the test hides
