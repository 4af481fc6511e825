"""The main job end to end: submitted to a real `ray start` cluster, killed and resumed,
deterministic, a fold's training process killed mid-fold, and DDP folds on TorchTrainers."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from cluster_fixtures import free_port, kill_process_group

pytestmark = pytest.mark.e2e  # jobs run end to end

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)
VARIANTS = ("svm", "svm+spknorm", "wav2vec2")  # the default demo run


def _fold_metrics(run: Path) -> dict[int, dict]:
    summary = json.loads((run / "summary.json").read_text())
    return {f["fold"]: {m: f[m] for m in VARIANTS} for f in summary["folds"]}


def _check_run_folder(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [1, 2, 3, 4, 5, 6]
    assert summary["models"] == {"wav2vec2": "demo"} and summary["merge_calm"] is False
    for fold in summary["folds"]:
        for model in VARIANTS:
            assert set(fold[model]) >= {"accuracy", "uar", "macro_f1"}
            assert 0 <= fold[model]["uar"] <= 1
    # "it ran" is not "it works": the SVM (nested CV on 20 speakers x 8 clips) must learn
    chance = 1 / len(summary["classes"])
    assert summary["mean"]["svm"]["uar"] > 2 * chance
    assert min(fold["svm"]["uar"] for fold in summary["folds"]) > chance
    # what each variant trained on, and no tuned settings were used
    assert summary["params_provenance"] is None
    assert summary["trained_on"]["svm"]["per_fold"]["1"] == list(range(5, 25))
    assert len(summary["trained_on"]["wav2vec2"]["per_fold"]["1"]) == 16
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == 3 * 192  # every clip once per variant
    assert predictions.groupby("model").path.nunique().to_dict() == dict.fromkeys(VARIANTS, 192)
    assert summary["models_run"] == list(VARIANTS)
    assert summary["variants"]["svm+spknorm"]["normalisation"].startswith("per-speaker")
    assert summary["variants"]["svm"]["normalisation"] == "none"
    probs = predictions.filter(like="prob_")
    assert probs.shape[1] == 8 and ((probs.sum(axis=1) - 1).abs() < 1e-6).all()
    # out-of-fold: a clip's fold is the fold whose test speakers hold its speaker
    assert (predictions.fold == (predictions.actor - 1) // 4 + 1).all()
    for name in ("summary.md", "summary.csv", "config.json", "rejected.csv"):
        assert (run / name).stat().st_size > 0
    assert "| mean ± std |" in (run / "summary.md").read_text()
    assert list(run.glob("*.png")) and list((run / "tensorboard").rglob("events.out.tfevents.*"))
    # TensorBoard on the run folder: each fold's curves once, no SVM search trial as a run
    events = [p.relative_to(run) for p in run.rglob("events.out.tfevents.*")]
    assert events and all(p.parts[0] == "tensorboard" for p in events), events


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster on 127.0.0.1 with token auth, in its own process group."""
    tmp = tmp_path_factory.mktemp("head")
    dashboard_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        f"{VENV_BIN}/ray", "start", "--head", "--block", "--num-cpus", "2",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", f"/tmp/ser_ray_test_{os.getpid()}",
    ]  # fmt: skip
    log = open(tmp / "head.log", "w")  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    for _ in range(120):
        assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
        probe = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", address],
                               env=env, capture_output=True)  # fmt: skip
        if probe.returncode == 0:
            break
        time.sleep(1)
    yield address, env
    # SIGTERM, then SIGKILL: only what we started, this process group. The helper reaps the
    # `ray start` leader: a zombie leader keeps the group "alive" to a bare killpg(pgid, 0).
    kill_process_group(head.pid, head, grace_s=10)
    log.close()


@pytest.fixture(scope="module")
def submitted_run(ray_head, tmp_path_factory):
    """kfold.py --smoke-test submitted to the 2-CPU cluster: also the no-deadlock check of
    six folds training at once while Ray Data streams each fold's clips into its workers."""
    address, env = ray_head
    out = tmp_path_factory.mktemp("submitted") / "run"
    # a client without the token is refused: authentication stays on
    refused = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "list", "--address", address],
        env={k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)} | {
            "RAY_AUTH_TOKEN": "wrong-token"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0
    done = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--", "python", "jobs/kfold.py", "--smoke-test", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", done.stdout + done.stderr)
    return out, done.stdout


def _job_console(stdout: str) -> list[str]:
    """What the job itself printed: the lines `ray job submit` tails between its own header
    ("Tailing logs until the job exits") and footer ("Job '...' succeeded"), less the CLI's
    separator lines (plain, or logged with a timestamp and colours when not on a terminal)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "Tailing logs until the job exits" in line)
    end = max(
        i for i, line in enumerate(lines) if re.search(r"Job 'raysubmit_\w+' succeeded", line)
    )
    separator = re.compile(r"^(.*\scli\.py:\d+ -- )?(\x1b\[[0-9;]*m)*-+(\x1b\[[0-9;]*m)*$")
    return [line for line in lines[start + 1 : end] if line.strip() and not separator.match(line)]


def _own_lines(lines: list[str]) -> list[str]:
    """The job's own console lines: the raylet's notices ("N PYTHON worker processes have been
    started") reach every driver whenever they happen, after the final table too."""
    return [line for line in lines if "(raylet)" not in line]


def test_job_submit_to_token_auth_cluster(submitted_run):
    out, stdout = submitted_run
    _check_run_folder(out)
    console = _job_console(stdout)
    # a console people can read: stage lines, one line per fold and epoch, the final table
    # last; no Ray worker chatter (Ray Train's per-report lines, its controllers' warnings)
    assert len(console) <= 60, "\n".join(console)
    assert not [line for line in console if "pid=" in line], "\n".join(console)
    # no error-level line of Ray's core worker (feature-cache actors that Ray Data may restart)
    assert not [line for line in console if "core_worker.cc" in line], "\n".join(console)
    own = _own_lines(console)
    assert own[-1].startswith("run folder:") and own[-2].startswith("| mean ± std |")
    assert sum(line.startswith("wav2vec2 fold ") for line in own) == 12  # 6 x (1 epoch + done)
    # the resource plan: one line, and the same in config.json (a 2-CPU cluster)
    assert [line for line in own if line.startswith("resource plan:")] == [
        "resource plan: 2 of 6 folds at once, each in its Tune trial's process, 1 CPU and 1 "
        "torch thread(s) per worker (cluster: 2 CPUs, 0 GPUs)"
    ]
    plan = json.loads((out / "config.json").read_text())["resource_plan"]
    assert (plan["concurrent_folds"], plan["cpus_per_worker"], plan["torch_threads"]) == (2, 1, 1)
    assert plan["in_trial"] is True
    # no fold ran a TorchTrainer: no Train run folder beside the folds' Tune experiment
    assert sorted(p.name for p in (out / "ray").iterdir()) == ["wav2vec2_folds"]


def _wav2vec2_done_folds(run: Path) -> set[int]:
    """Folds whose Tune trial reported the final test metrics."""
    done = set()
    for result in (run / "ray" / "wav2vec2_folds").glob("*_fold=*/result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            if "test/uar" in row:
                done.add(row["config"]["fold"])
    return done


def _fold_checkpoints(run: Path) -> list[Path]:
    """The wav2vec2 folds' checkpoints: each fold trains in its Tune trial (one worker)."""
    return list((run / "ray" / "wav2vec2_folds").glob("*_fold=*/checkpoint_*/"))


def _fold_of_trial_dir(trial_dir: Path) -> int:
    """A fold trial's fold, from its folder's name (Tune's ``..._fold=<k>_<date>``)."""
    return int(re.search(r"_fold=(\d+)_", trial_dir.name).group(1))


def test_killed_driver_resumes_without_rerunning_finished_folds(submitted_run, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "jobs/kfold.py", "--smoke-test", "--out", str(run), "--num-cpus", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        if _wav2vec2_done_folds(run):
            break
        time.sleep(0.5)
    finished = _wav2vec2_done_folds(run)
    assert finished and driver.poll() is None, "the driver ended before a fold finished"
    time.sleep(2)  # let Tune save its experiment state
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    finished = _wav2vec2_done_folds(run)
    stamps = {p: p.stat().st_mtime_ns for p in _fold_checkpoints(run)}
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # the table, then where it went
    assert _own_lines(resumed.stdout.splitlines())[-1].startswith("run folder:")
    _check_run_folder(run)
    assert stamps, "no fold checkpoint before the kill"
    for path, stamp in stamps.items():  # checkpoints written before the kill are untouched
        if _fold_of_trial_dir(path.parent) in finished and path.exists():
            assert path.stat().st_mtime_ns == stamp
    for path in _fold_checkpoints(run):  # finished folds made no new checkpoint after the restart
        assert path in stamps or _fold_of_trial_dir(path.parent) not in finished
    # same seed and config: the same fold metrics as the uninterrupted submitted run
    assert _fold_metrics(run) == _fold_metrics(submitted_run[0])


def _fit_fold_in_its_trial(features_dir: Path, fold: int, cfg, out: Path, cache_dir: Path,
                           max_failures: int = 0):  # fmt: skip
    """One fold as the study trains it by default: the study's fold trial
    (``ssl_folds.fold_trial``, the plan of one worker per fold: training in the trial, one CPU)
    in a Tune run of that trial alone (``out/ray/fold``), restarted by Tune up to
    ``max_failures`` times; its outcome read back from the trial's final checkpoint."""
    from ray import tune

    from ser_ray.corpus.protocol import ravdess_protocol
    from ser_ray.distributed.fold_inputs import build_fold_inputs
    from ser_ray.distributed.fold_trainer import fold_result_from_checkpoint
    from ser_ray.distributed.ssl_folds import FoldJob, fold_trial

    job = FoldJob(
        variant="wav2vec2",
        protocol=ravdess_protocol(n_val_speakers=cfg.n_val_speakers),
        train_configs={fold: cfg},
        inputs={fold: build_fold_inputs(features_dir, cfg, cache_dir)},
        tensorboard_dir=str(out / "tensorboard"),
    )  # the defaults: one worker on a CPU, in its trial, one torch thread
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(fold_trial, job=job), {"CPU": 1}),
        param_space={"fold": fold},
        run_config=tune.RunConfig(
            name="fold", storage_path=str(out / "ray"), verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )  # fmt: skip
    (result,) = tuner.fit()
    assert result.error is None, result.error
    return fold_result_from_checkpoint(result.checkpoint, out / f"fold_{fold}")


def test_killed_fold_process_is_restored_from_its_checkpoint(ray_local, demo_features, tmp_path):
    """The process that trains a fold (its Tune trial) killed after an epoch: Tune restarts
    the trial, which resumes from its last checkpoint and ends as an unbroken run does."""
    from ser_ray.models.ssl import RANDOM_DEMO_MODEL
    from ser_ray.training.config import TrainConfig

    cfg = TrainConfig(
        model=RANDOM_DEMO_MODEL, epochs=4, batch_size=8, lr_encoder=5e-4, lr_head=2e-3
    )
    features = demo_features / "features"
    reference = _fit_fold_in_its_trial(features, 2, cfg, tmp_path / "reference",
                                       tmp_path / "cache")  # fmt: skip

    out = tmp_path / "killed"
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            result=_fit_fold_in_its_trial(
                features, 2, cfg, out, tmp_path / "cache", max_failures=2
            )  # fmt: skip
        )
    )
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:
        if list((out / "ray" / "fold").glob("*/checkpoint_*")):
            trials = [p for p in psutil.Process().children(recursive=True)
                      if "ImplicitFunc" in _cmdline(p)]  # fmt: skip
            if trials:
                killed = trials[0].pid
                trials[0].kill()
        time.sleep(0.05)
    thread.join()
    assert killed is not None, "training ended before its process could be killed"
    result = outcome["result"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.metrics["test/uar"] == reference.metrics["test/uar"]
    assert result.metrics["test/accuracy"] == reference.metrics["test/accuracy"]
    pd.testing.assert_frame_equal(result.predictions, reference.predictions)


def _cmdline(process: psutil.Process) -> str:
    """A process's command line; "" for one that ended (or is a zombie) meanwhile."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_ddp_folds_each_run_a_torch_trainer(tmp_path):
    """--workers-per-fold 2: the plan gives each fold a TorchTrainer of two DDP workers (the
    path a default run no longer takes); its final checkpoint reaches the run folder, and the
    two workers share each epoch's clips: half the optimizer steps of one worker's epoch, each
    step on 8 clips per worker (the smoke run's batch size). Two speaker folds of 12 speakers:
    each TorchTrainer costs its start-up, and two show what six would."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "jobs/kfold.py", "--smoke-test", "--variants", "wav2vec2",
           "--folds", "speaker-kfold", "--num-folds", "2",
           "--workers-per-fold", "2", "--num-cpus", "2", "--out", str(run)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "1 of 2 folds at once, 2 TorchTrainer workers per fold" in done.stdout
    assert json.loads((run / "config.json").read_text())["resource_plan"]["in_trial"] is False
    summary = json.loads((run / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [1, 2]
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == 192  # every clip once, by the fold that tested its speaker
    clips_of = pd.read_parquet(run / "prepared" / "features", columns=["actor"]).actor
    clips_of = clips_of.value_counts()
    for fold in summary["folds"]:
        mine = predictions[predictions.fold == fold["fold"]]
        assert sorted(set(mine.actor)) == sorted(fold["test_actors"])
        assert len(mine) == fold["n_test"] == 8 * len(fold["test_actors"])
        result = json.loads((run / "wav2vec2" / f"fold_{fold['fold']}" / "result.json").read_text())
        trained_on = result["trained_on_actors"]
        assert not set(trained_on) & set(fold["test_actors"])
        n_fit = sum(clips_of[a] for a in trained_on)
        assert n_fit == 64  # 12 training speakers, less 4 for validation, of 8 clips
        assert [h["step"] for h in result["history"]] == [n_fit // (2 * 8)]
        right = (mine.true_label == mine.pred_label).mean()
        assert fold["wav2vec2"]["accuracy"] == pytest.approx(right)
    for fold in (1, 2):  # each fold's Train run kept its checkpoints; the copy holds the model
        assert list((run / "ray" / f"wav2vec2_fold_{fold}").glob("checkpoint_*"))
        assert (run / "wav2vec2" / f"fold_{fold}" / "best_model" / "config.json").exists()
