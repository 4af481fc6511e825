"""A corpus's own partitions end to end: a manifest whose split names train, dev, test1 and
test2, 5% of its clips of unknown speakers, through ``jobs/kfold.py`` as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ser_ray.corpus.ravdess import parse_name

pytestmark = pytest.mark.e2e  # the job runs end to end

ROOT = Path(__file__).resolve().parent.parent
#: Demo actors by split: 12 train, 4 dev, 4 in each test set.
SPLIT_OF = {a: "train" if a <= 12 else "dev" if a <= 16 else "test1" if a <= 20 else "test2"
            for a in range(1, 25)}  # fmt: skip


def write_manifest(demo_corpus: Path, out: Path, moved: str | None = None) -> pd.DataFrame:
    """The demo corpus as a manifest with official splits; every 20th clip (5%) of an
    unknown speaker (``Unknown`` or empty, its split kept). ``moved``: one clip of that known
    speaker put in test1 (a speaker in two splits)."""
    rows = []
    for i, wav in enumerate(sorted(demo_corpus.glob("Actor_*/*.wav"))):
        name = parse_name(wav.name)
        speaker = f"a{name.actor:02d}"
        if i % 20 == 7:
            speaker = "Unknown" if i % 40 == 7 else ""
        rows.append({"path": str(wav), "speaker": speaker, "emotion": name.emotion,
                     "split": SPLIT_OF[name.actor]})  # fmt: skip
    if moved:
        next(r for r in rows if r["speaker"] == moved)["split"] = "test1"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return pd.DataFrame(rows)


def run_kfold(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/kfold.py", "--folds", "predefined", "--smoke-test",
         "--num-cpus", "2", "--model", "demo", *args],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def test_official_partitions_with_unknown_speakers_run_end_to_end(demo_corpus, tmp_path):
    clips = write_manifest(demo_corpus, tmp_path / "clips.csv")
    unknown = clips["speaker"].isin(["", "Unknown"])
    assert unknown.sum() == len(clips) // 20 and clips.loc[unknown, "speaker"].nunique() == 2
    out = tmp_path / "run"
    variants = "svm,svm+spknorm,wav2vec2+probe+spknorm"
    done = run_kfold("--manifest", str(tmp_path / "clips.csv"), "--variants", variants,
                     "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["scheme"] == "partitions"
    assert [f["name"] for f in protocol["folds"]] == ["test1", "test2"]
    names = protocol["speakers"]
    by_split = {
        side: sorted(clips.loc[(clips["split"] == side) & ~unknown, "speaker"].unique())
        for side in ("train", "dev", "test1", "test2")
    }
    for fold in protocol["folds"]:
        known = sorted(s for s in fold["test_speakers"] if not s.startswith("?unknown-"))
        assert known == by_split[fold["name"]]
        n_unknown = int((unknown & (clips["split"] == fold["name"])).sum())
        assert len(fold["test_speakers"]) - len(known) == n_unknown  # each clip its own
        assert sorted(s for s in fold["validation_speakers"] if s[0] != "?") == by_split["dev"]
        assert sorted(s for s in fold["fit_speakers"] if s[0] != "?") == by_split["train"]
    assert sum(name.startswith("?unknown-") for name in names.values()) == unknown.sum()

    summary = json.loads((out / "summary.json").read_text())
    tested = clips[clips["split"].str.startswith("test")]
    rows = summary["folds"]
    assert [(r["fold"], r["name"]) for r in rows] == [(1, "test1"), (2, "test2")]
    for row in rows:
        assert row["n_test"] == int((tested["split"] == row["name"]).sum())
        for variant in variants.split(","):
            assert 0.0 <= row[variant]["uar"] <= 1.0
    assert summary["fold_scheme"] == "partitions" and "test sets" in summary["std_kind"]
    md = (out / "summary.md").read_text()
    assert "| test1 | a17,a18,a19,a20 + " in md and "clips of unknown speakers" in md

    predictions = pd.read_csv(out / "predictions.csv")
    for variant in variants.split(","):
        mine = predictions[predictions["model"] == variant]
        assert sorted(mine["path"]) == sorted(tested["path"])  # one row per test clip
        assert len(mine) == len(tested)


def test_a_known_speaker_in_two_splits_is_refused_in_one_line(demo_corpus, tmp_path):
    write_manifest(demo_corpus, tmp_path / "clips.csv", moved="a05")
    done = run_kfold("--manifest", str(tmp_path / "clips.csv"), "--variants", "svm",
                     "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "speakers are in more than one split: a05 (test1, train)" in errors[0]
    assert not (tmp_path / "run" / "prepared").exists()  # refused before any work
