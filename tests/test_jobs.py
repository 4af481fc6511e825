"""Recipe tests: the real job scripts, run as a user runs them, on tiny data."""

import csv
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e  # jobs run end to end

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(p.name for p in (ROOT / "jobs").glob("[a-z]*.py"))


def run_job(*args: str, env: dict | None = None, timeout_s: int = 600):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_help(job, monkeypatch, capsys):
    """``python jobs/<job> --help``, the script run as ``__main__`` but in this process
    (runpy), so the suite pays the jobs' imports once, not once per job; the other tests
    here start the scripts as processes."""
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}", "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # benchmark.py adds the repository
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "jobs" / job), run_name="__main__")
    printed = capsys.readouterr()
    assert stop.value.code == 0, printed.err
    assert "usage:" in printed.out
    if job != "benchmark.py":
        assert "--smoke-test" in printed.out and "--out" in printed.out


def test_prepare_smoke_test(tmp_path):
    out = tmp_path / "run"
    env = {"SER_RAY_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    done = run_job("jobs/prepare.py", "--smoke-test", "--out", str(out), "--num-cpus", "2",
                   env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "192 input files: 192 with features, 0 rejected" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["counts"] == {"input": 192, "ok": 192, "rejected": 0}
    assert config["actors"] == list(range(1, 25)) and config["source"] == "ravdess"
    with open(out / "rejected.csv") as f:
        assert next(csv.reader(f)) == ["path", "reason"]
    # each Ray task writes its own file, named after its first clip: 192 clips on 2 CPUs are
    # 8 tasks of 24 (plan_batches)
    parts = sorted(p.name for p in (out / "features").glob("part-*.parquet"))
    assert parts == [f"part-{first:06d}.parquet" for first in range(0, 192, 24)]
    again = run_job("jobs/prepare.py", "--smoke-test", "--out", str(out), "--num-cpus", "2",
                    env=env)  # fmt: skip
    assert again.returncode == 0 and "(reused" in again.stdout


def test_prepare_reads_a_manifest_as_the_study_does(demo_corpus, tmp_path):
    """--unknown-speaker on prepare.py: the clips of speaker "n/a" are each their own
    pseudo-speaker in the features, as kfold.py would read the same manifest."""
    wavs = sorted(demo_corpus.glob("Actor_0[12]/*.wav"))[:6]
    manifest = tmp_path / "clips.csv"
    speakers = ["a1", "a1", "N/A", "", "a2", "n/a"]
    manifest.write_text("path,speaker,emotion\n" + "".join(
        f"{wav},{speaker},angry\n" for wav, speaker in zip(wavs, speakers, strict=True)
    ))  # fmt: skip
    out = tmp_path / "run"
    done = run_job("jobs/prepare.py", "--data-dir", str(manifest), "--no-egemaps",
                   "--unknown-speaker", "n/a", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 input files: 6 with features, 0 rejected" in done.stdout
    features = pd.read_parquet(out / "features").set_index("path").loc[[str(w) for w in wavs]]
    known, unknown = features["speaker"].iloc[[0, 1, 4]], features["speaker"].iloc[[2, 3, 5]]
    assert list(known) == ["a1", "a1", "a2"]
    assert unknown.str.startswith("?unknown-").all() and unknown.nunique() == 3


def test_kfold_refuses_single_fold_tuned_settings(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"params": {"lr_encoder": 3e-5}, "val_uar": 0.4, "fold": 1}))
    done = run_job("jobs/kfold.py", "--params", str(best), "--out", str(tmp_path / "run"),
                   timeout_s=120)  # fmt: skip
    assert done.returncode == 2
    assert "outer fold 1 only" in done.stderr and "jobs/tune_adamw.py --nested" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_pretrain_smoke_test(tmp_path):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "pretrain"
    env = {"SER_RAY_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    done = run_job("jobs/pretrain.py", "--smoke-test", "--out", str(out), "--num-cpus", "2",
                   env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"pre-trained model: {out / 'model'}" in done.stdout
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert any(k.startswith("quantizer.") for k in weights)  # a full pre-training checkpoint
    assert (out / "model" / "preprocessor_config.json").exists()
    history = json.loads((out / "result.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1] and history[0]["pretrain/loss"] > 0
    assert len((out / "clips.csv").read_text().split()) == 16  # the smoke pool, every clip
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {
        "pretrain/loss",
        "pretrain/contrastive",
        "pretrain/diversity",
        "pretrain/codevector_perplexity",
        "pretrain/lr",
    } <= set(events.Tags()["scalars"])
